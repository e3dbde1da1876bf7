"""Triton's own clients against a gateway, in a process of their own: tritonclient.grpc registers
the `inference` protos in protobuf's default pool, where the gateway's copy already is.

    python tests/triton_clients.py GRPC_ADDRESS HTTP_ADDRESS  -> one JSON document on stdout
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

X = np.array([(5.1, 3.5, 1.4, 0.2), (6.7, 3.0, 5.2, 2.3)], dtype=np.float32)
HEADERS = {"application": "classifier"}
"""Copied per call: tritonclient.http writes Inference-Header-Content-Length into the dict."""


def plain(a: Any) -> Any:
    if a is None:
        return None
    return [v.decode() if isinstance(v, bytes) else v for v in a.tolist()] + [str(a.dtype)]


def grpc_calls(address: str) -> list[Any]:
    c = tgrpc.InferenceServerClient(address)
    try:
        out: list[Any] = [c.is_server_live(headers=dict(HEADERS), client_timeout=10),
                          c.is_model_ready("iris", headers=dict(HEADERS), client_timeout=10)]
        i = tgrpc.InferInput("features", [2, 4], "FP32")
        i.set_data_from_numpy(X)
        r = c.infer("iris", [i], headers=dict(HEADERS), client_timeout=10)
        out.append([plain(r.as_numpy("label")), plain(r.as_numpy("score"))])
        r = c.infer("iris", [i], headers=dict(HEADERS), client_timeout=10,
                    outputs=[tgrpc.InferRequestedOutput("score")])
        out.append([plain(r.as_numpy("label")), plain(r.as_numpy("score"))])
        return out
    finally:
        c.close()


def http_calls(address: str) -> list[Any]:
    c = thttp.InferenceServerClient(address, connection_timeout=10, network_timeout=10)
    try:
        out: list[Any] = [c.is_server_live(headers=dict(HEADERS)),
                          c.is_server_ready(headers=dict(HEADERS)),
                          c.is_model_ready("iris", headers=dict(HEADERS)),
                          c.get_model_metadata("iris", headers=dict(HEADERS))["outputs"]]
        for binary_in in (True, False):
            for binary_out in (True, False, None):
                i = thttp.InferInput("features", [2, 4], "FP32")
                i.set_data_from_numpy(X, binary_data=binary_in)
                outputs = None if binary_out is None else [
                    thttp.InferRequestedOutput("label", binary_data=binary_out),
                    thttp.InferRequestedOutput("score", binary_data=binary_out)]
                r = c.infer("iris", [i], headers=dict(HEADERS), outputs=outputs)
                out.append([plain(r.as_numpy("label")), plain(r.as_numpy("score"))])
        return out
    finally:
        c.close()


if __name__ == "__main__":
    print(json.dumps({"grpc": grpc_calls(sys.argv[1]), "http": http_calls(sys.argv[2])}))
