"""HTTP ingress: Open Inference Protocol REST routes, binary tensors, JSON transcoding, routing
and the error statuses, through a real gateway with real clients (requests, curl)."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from examples.models import classify
from tests.http_support import HTTP, PREDICT, ROWS, call, infer_body, iris, text, url


async def test_oip_rest_routes(start_gateway: Any) -> None:
    async with start_gateway([iris(), text()], http=HTTP) as gw:
        # No application named: the gateway answers the health routes for itself.
        r = await call("GET", url(gw, "/v2/health/live"))
        assert (r.status_code, r.json()) == (200, {"live": True})
        r = await call("GET", url(gw, "/v2/health/ready"))
        assert (r.status_code, r.json()) == (200, {"ready": True})
        # Through the application's prefix: its replicas answer.
        for path, want in (("/iris/v2/health/live", {"live": True}),
                           ("/iris/v2/health/ready", {"ready": True}),
                           ("/iris/v2/models/iris/ready", {"name": "iris", "ready": True}),
                           ("/iris/v2/models/iris/versions/1/ready",
                            {"name": "iris", "ready": True})):
            r = await call("GET", url(gw, path))
            assert (r.status_code, r.json()) == (200, want), path
            assert r.headers["x-request-id"]
        r = await call("GET", url(gw, "/iris/v2/models/nope/ready"))
        assert (r.status_code, r.json()) == (400, {"name": "nope", "ready": False})
        r = await call("GET", url(gw, "/iris/v2"))
        assert r.status_code == 200 and r.json()["name"] == "grpc-gateway-demo"
        for path in ("/iris/v2/models/iris", "/iris/v2/models/iris/versions/1"):
            r = await call("GET", url(gw, path))
            assert r.status_code == 200, r.text
            assert r.json() == {
                "name": "iris", "versions": ["1"], "platform": "python",
                "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                            {"name": "score", "datatype": "FP32", "shape": [-1]}]}
        r = await call("GET", url(gw, "/iris/v2/models/nope"))
        assert r.status_code == 404 and r.json() == {"error": "unknown model 'nope'"}

        r = await call("POST", url(gw, "/iris/v2/models/iris/infer"),
                       json=infer_body(id="req-1", parameters={"note": "x"}))
        assert r.status_code == 200, r.text
        doc = r.json()
        labels = [classify(row)[0] for row in ROWS]
        assert doc["model_name"] == "iris" and doc["model_version"] == "1"
        assert doc["id"] == "req-1"
        (label, score) = doc["outputs"]
        assert label == {"name": "label", "datatype": "BYTES", "shape": [2], "data": labels}
        assert score["datatype"] == "FP32" and score["shape"] == [2]
        assert score["data"] == pytest.approx([classify(row)[1] for row in ROWS], rel=1e-6)
        # Only the outputs asked for, and the version in the path.
        r = await call("POST", url(gw, "/iris/v2/models/iris/versions/1/infer"),
                       json=infer_body(outputs=[{"name": "score"}]))
        assert [o["name"] for o in r.json()["outputs"]] == ["score"]
        # The model's own error: its status and its trailing metadata.
        bad = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32",
                           "data": [1, 2, 3]}]}
        r = await call("POST", url(gw, "/iris/v2/models/iris/infer"), json=bad)
        assert r.status_code == 400
        assert r.json() == {"error": "input 'features' must be FP32 [N, 4], got FP32 [1, 3]"}
        assert r.headers["Grpc-Metadata-x-model-error"] == "bad-input"
        r = await call("GET", url(gw, "/iris/v2/models/iris/infer"))
        assert r.status_code == 405 and "use POST" in r.json()["error"]


@pytest.mark.parametrize("body, why", [
    ({"inputs": []}, "'inputs' must be a non-empty list"),
    ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                  "data": [1, 2, 3]}]}, "input 'features': 3 values for shape [1, 4]"),
    ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP99", "data": [1]}]},
     "input 'features': unknown datatype 'FP99'"),
    ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32",
                  "data": [1, 2, 3, "x"]}]}, "input 'features': \"x\" is not a FP32 value"),
    ({"inputs": [{"name": "f", "shape": [1], "datatype": "INT8", "data": [300]}]},
     "input 'f': "),
    ([1, 2], "the infer request must be a JSON object"),
])
async def test_infer_request_errors_are_400_with_a_reason(
    start_gateway: Any, body: Any, why: str
) -> None:
    async with start_gateway([iris(None)], http=HTTP) as gw:
        r = await call("POST", url(gw, "/v2/models/iris/infer"), json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith(why), r.json()


async def test_binary_tensor_extension(start_gateway: Any) -> None:
    flat = [v for row in ROWS for v in row]
    raw = struct.pack(f"<{len(flat)}f", *flat)
    async with start_gateway([iris(None)], http=HTTP) as gw:
        head = json.dumps({
            "inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                        {"name": "score"}]}).encode()
        r = await call("POST", url(gw, "/v2/models/iris/infer"), data=head + raw,
                       headers={"Inference-Header-Content-Length": str(len(head)),
                                "Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        n = int(r.headers["Inference-Header-Content-Length"])
        doc, blob = json.loads(r.content[:n]), r.content[n:]
        label, score = doc["outputs"]
        assert label["parameters"] == {"binary_data_size": len(blob)}
        # BYTES: a 4-byte little-endian length before each element.
        got, pos = [], 0
        while pos < len(blob):
            (size,) = struct.unpack_from("<I", blob, pos)
            got.append(blob[pos + 4:pos + 4 + size].decode())
            pos += 4 + size
        assert got == [classify(row)[0] for row in ROWS]
        assert "data" in score and "parameters" not in score
        # Every output binary.
        head = json.dumps({
            "inputs": [{"name": "features", "shape": [2, 4], "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True}}).encode()
        r = await call("POST", url(gw, "/v2/models/iris/infer"), data=head + raw,
                       headers={"Inference-Header-Content-Length": str(len(head))})
        n = int(r.headers["Inference-Header-Content-Length"])
        outs = json.loads(r.content[:n])["outputs"]
        assert [o["parameters"]["binary_data_size"] for o in outs] == [len(r.content) - n - 8, 8]
        scores = struct.unpack("<2f", r.content[-8:])
        assert scores == pytest.approx([classify(row)[1] for row in ROWS], rel=1e-6)
        # Broken framing: 400s that say why.
        for headers, data, why in (
            ({"Inference-Header-Content-Length": "x"}, head + raw, "must be an integer"),
            ({"Inference-Header-Content-Length": str(len(head))}, head + raw + b"12",
             "2 bytes of binary data are not claimed"),
            ({"Inference-Header-Content-Length": str(len(head))}, head + raw[:-4],
             "runs past the 28 bytes"),
        ):
            r = await call("POST", url(gw, "/v2/models/iris/infer"), data=data,
                           headers=headers)
            assert r.status_code == 400 and why in r.json()["error"], r.text


async def test_json_transcoding_unary_and_server_streaming(start_gateway: Any) -> None:
    async with start_gateway([text(None)], http=HTTP) as gw:
        r = await call("POST", url(gw, PREDICT), json={"text": "good"},
                       headers={"Grpc-Metadata-tenant": "acme"})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["label"] == "positive" and doc["seenMetadata"]["tenant"] == "acme"
        assert r.headers["content-type"].startswith("application/json")
        # An empty body is the empty message.
        r = await call("POST", url(gw, PREDICT))
        assert r.status_code == 200 and r.json()["label"] == "neutral"
        r = await call("POST", url(gw, "/demo.text.TextModel/PredictStream"),
                       json={"text": "bad", "repeat": 3})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(s) for s in r.text.splitlines()]
        assert [d["result"].get("index", 0) for d in lines] == [0, 1, 2]
        assert all(d["result"]["label"] == "negative" for d in lines)
        # A stream failing after its first message: the error is the last line.
        r = await call("POST", url(gw, "/demo.text.TextModel/PredictStream"),
                       json={"text": "x", "repeat": 3, "failCode": 13})
        lines = [json.loads(s) for s in r.text.splitlines()]
        assert r.status_code == 200 and len(lines) == 2 and "result" in lines[0]
        assert lines[1] == {"error": {"code": 13, "status": "INTERNAL",
                                      "message": "failing as asked: INTERNAL"}}
        # Replica status codes map to HTTP statuses.
        for code, status in ((3, 400), (5, 404), (7, 403), (8, 429), (12, 501), (14, 503),
                             (13, 500), (16, 401), (10, 409)):
            r = await call("POST", url(gw, PREDICT), json={"text": "x", "failCode": code})
            assert r.status_code == status, (code, r.status_code)
            assert r.json()["error"].startswith("failing as asked")
        for method in ("PredictBatch", "Chat"):
            r = await call("POST", url(gw, f"/demo.text.TextModel/{method}"), json={})
            assert r.status_code == 501 and "call it over gRPC" in r.json()["error"]
        r = await call("POST", url(gw, PREDICT), json={"nope": 1})
        assert r.status_code == 400
        assert "demo.text.PredictRequest" in r.json()["error"] and "nope" in r.json()["error"]
        r = await call("POST", url(gw, "/demo.text.TextModel/Nope"), json={})
        assert r.status_code == 404 and "no route for POST" in r.json()["error"]
        r = await call("GET", url(gw, PREDICT))
        assert r.status_code == 405


async def test_route_prefix_longest_wins_and_the_header_overrides(start_gateway: Any) -> None:
    apps = [text("/a", name="short", user_config={"prefix": "short:"}),
            text("/a/b", name="long", user_config={"prefix": "long:"}),
            iris(None)]
    async with start_gateway(apps, http=HTTP) as gw:
        async def label(path: str, **kw: Any) -> tuple[int, str]:
            r = await call("POST", url(gw, path), json={"text": "good"}, **kw)
            return r.status_code, (r.json().get("label") or r.json().get("error", ""))

        assert await label("/a" + PREDICT) == (200, "short:positive")
        assert await label("/a/b" + PREDICT) == (200, "long:positive")
        assert await label("/a/bc" + PREDICT) == (404, "no route for POST "
                                                       "'/a/bc/demo.text.TextModel/Predict': "
                                                       "OIP REST is under /v2 and JSON "
                                                       "transcoding at /{package.Service}/"
                                                       "{Method}")
        # No prefix matches and no header: 404 naming the applications and the prefixes.
        status, why = await label(PREDICT)
        assert status == 404
        assert why == ("No application matched: send header 'application' with one of: "
                       "'classifier', 'long', 'short'; or use a route_prefix (/a/b -> 'long', "
                       "/a -> 'short')")
        assert await label(PREDICT, headers={"application": "long"}) == (200, "long:positive")
        status, why = await label(PREDICT, headers={"application": "nope"})
        assert status == 404 and why == ("Application 'nope' not found. Available "
                                         "applications: 'classifier', 'long', 'short'")
        r = await call("GET", url(gw, "/v2/models/iris"), headers={"application": "classifier"})
        assert r.status_code == 200


async def test_413_and_400_with_the_json_position(start_gateway: Any) -> None:
    async with start_gateway([text(None)], http=HTTP,
                             proxy={"port": 0, "max_message_bytes": 1024}) as gw:
        r = await call("POST", url(gw, PREDICT), data=b'{"text": "' + b"x" * 2000 + b'"}')
        assert r.status_code == 413
        assert r.json() == {"error": "the request body is larger than 1024 bytes "
                                     "(proxy.max_message_bytes)"}
        r = await call("POST", url(gw, PREDICT), data=b'{\n  "text": "a",\n  oops}')
        assert r.status_code == 400
        assert r.json() == {"error": "invalid JSON at line 3 column 3 (char 19): Expecting "
                                     "property name enclosed in double quotes"}
        r = await call("POST", url(gw, PREDICT), data=b"\xff\xfe")
        assert r.status_code == 400 and r.json() == {"error": "the body is not UTF-8 (byte 0)"}
        r = await call("GET", url(gw, "/nope"))
        assert r.status_code == 404


async def test_429_when_the_queue_is_full(start_gateway: Any) -> None:
    app = text(None, max_ongoing_requests=1, max_queued_requests=0)
    async with start_gateway([app], http=HTTP) as gw:
        slow = asyncio.ensure_future(call("POST", url(gw, PREDICT),
                                          json={"text": "x", "sleepS": 1.5}))
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while gw.proxy.admitted == 0 and loop.time() < end:
            await asyncio.sleep(0.02)
        r = await call("POST", url(gw, PREDICT), json={"text": "x"})
        assert r.status_code == 429
        assert "saturated" in r.json()["error"] and "max_queued_requests" in r.json()["error"]
        assert (await slow).status_code == 200


async def test_503_while_draining(start_gateway: Any, tmp_path: Path) -> None:
    from gateway.app import Gateway
    from tests.conftest import gateway_config

    config = gateway_config([text(None)], tmp_path, http=HTTP)
    gw = Gateway(config, logs_dir=tmp_path / "logs")
    await gw.start(ready_timeout=30)
    try:
        address = url(gw, PREDICT)
        slow = asyncio.ensure_future(call("POST", address, json={"text": "x", "sleepS": 1.0}))
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while gw.proxy.admitted == 0 and loop.time() < end:
            await asyncio.sleep(0.02)
        stopping = asyncio.ensure_future(gw.stop(grace=5))
        while not gw.proxy.draining and loop.time() < end:
            await asyncio.sleep(0.01)
        r = await call("POST", address, json={"text": "x"})
        assert r.status_code == 503
        assert r.json() == {"error": "Gateway is draining and accepts no new calls"}
        r = await call("GET", url(gw, "/v2/health/ready"))
        assert r.status_code == 503 and "draining" in r.json()["error"]
        assert (await slow).status_code == 200  # the call in flight finishes
        await stopping
    finally:
        await gw.stop(grace=0)


async def test_request_id_in_and_out_and_in_the_log(start_gateway: Any, tmp_path: Path) -> None:
    async with start_gateway([text(None)], http=HTTP) as gw:
        r = await call("POST", url(gw, PREDICT), json={"text": "good"},
                       headers={"x-request-id": "http-rid-1"})
        assert r.headers["x-request-id"] == "http-rid-1"
        assert r.json()["seenMetadata"]["x-request-id"] == "http-rid-1"
        r = await call("POST", url(gw, PREDICT), json={"text": "good"})
        made = r.headers["x-request-id"]
        assert len(made) == 36 and r.json()["seenMetadata"]["x-request-id"] == made
        # Refused before the proxy: still one, made here.
        r = await call("POST", url(gw, PREDICT), data=b"{", headers={"x-request-id": "bad-json"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "bad-json"
        r = await call("POST", url(gw, PREDICT), json={}, headers={"x-request-id": "x" * 600})
        assert r.status_code == 400 and "longer than 512" in r.json()["error"]
        log = tmp_path / "logs" / "gateway.log"
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while loop.time() < end:
            lines = log.read_text().splitlines() if log.exists() else []
            if any("http-rid-1" in s for s in lines) and any("bad-json" in s for s in lines):
                break
            await asyncio.sleep(0.05)
        access = [s for s in lines if "http-rid-1" in s]
        assert access and PREDICT in access[0] and " OK " in access[0], access
        refused = [s for s in lines if "bad-json" in s]
        assert refused and "invalid JSON" in refused[0], refused


async def test_curl_examples(start_gateway: Any) -> None:
    async with start_gateway([iris(), text()], http=HTTP) as gw:
        base = url(gw, "")

        def curl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["curl", "-sS", "-m", "10", *args], capture_output=True,
                                  text=True, timeout=20, check=False)

        body = json.dumps(infer_body())
        out = await asyncio.to_thread(curl, "-X", "POST", f"{base}/iris/v2/models/iris/infer",
                                      "-H", "Content-Type: application/json", "-d", body)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["outputs"][0]["data"] == [classify(r)[0] for r in ROWS]
        out = await asyncio.to_thread(curl, "-N", "-X", "POST",
                                      f"{base}/text/demo.text.TextModel/PredictStream",
                                      "-d", '{"text": "great", "repeat": 2}')
        assert [json.loads(s)["result"]["label"] for s in out.stdout.splitlines()] == [
            "positive", "positive"]
        out = await asyncio.to_thread(curl, "-i", f"{base}/v2/health/ready")
        assert out.stdout.startswith("HTTP/1.1 200")


async def test_hostile_headers_and_paths(start_gateway: Any) -> None:
    async with start_gateway([iris(), text()], http=HTTP) as gw:
        # Grpc-Metadata-* cannot reroute a call or replace its request id.
        r = await call("POST", url(gw, "/text" + PREDICT), json={"text": "a"},
                       headers={"Grpc-Metadata-application": "classifier",
                                "Grpc-Metadata-x-request-id": "forged", "x-request-id": "mine",
                                "Grpc-Metadata-x-bin": "AAAA", "Grpc-Metadata-ok": "yes"})
        assert r.status_code == 200, r.text
        seen = r.json()["seenMetadata"]
        assert seen["application"] == "text" and seen["x-request-id"] == "mine"
        assert seen["ok"] == "yes" and "x-bin" not in seen
        # A value grpc could not send is the client's error, not the gateway's.
        r = await call("POST", url(gw, "/text" + PREDICT), json={},
                       headers={"Grpc-Metadata-k": "caf\xe9"})
        assert r.status_code == 400 and "printable ASCII" in r.json()["error"]
        # Every answer has a request id, the gateway's own health answers too.
        r = await call("GET", url(gw, "/v2/health/live"))
        assert r.status_code == 200 and len(r.headers["x-request-id"]) == 36
        # Deep JSON, a path shaped like a method that does not exist.
        r = await call("POST", url(gw, "/iris/v2/models/iris/infer"),
                       data="[" * 100000 + "]" * 100000)
        assert r.status_code == 400 and r.json() == {"error": "invalid JSON: nested too deeply"}
        r = await call("GET", url(gw, "/junk/x"))
        assert r.status_code == 404 and "no route for GET" in r.json()["error"]
        # A client sending half a body and leaving: nothing logged as an error, still served.
        _, writer = await asyncio.open_connection("127.0.0.1", gw.http.port)
        writer.write(b"POST /text" + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        assert (await call("GET", url(gw, "/v2/health/live"))).status_code == 200
