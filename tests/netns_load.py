"""Bounded load for tests/test_scale_netns.py, run on the client host (inside its network
namespace): `python -m tests.netns_load GW1:PORT,GW2:PORT SECONDS RATE CONCURRENCY`.

Workers split over the gateways call TextModel.Predict at most RATE calls/s in total, with
at most CONCURRENCY in flight, for SECONDS; then one JSON line: calls sent / ok / failed (by
code), per gateway, per replica (the `replica` each answer names), the wall time of each
replica's first and last answer, and the failures (time, code, details; at most 200).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import grpc

from gateway.pb import text_model_pb2, text_model_pb2_grpc

MAX_FAILURES_KEPT = 200


async def main(gateways: list[str], seconds: float, rate: float, concurrency: int) -> None:
    out: dict[str, Any] = {"sent": 0, "ok": 0, "failed": 0, "codes": {}, "per_gateway": {},
                           "per_replica": {}, "first": {}, "last": {}, "failures": [],
                           "start": time.time()}
    channels = [grpc.aio.insecure_channel(g) for g in gateways]
    stubs = [text_model_pb2_grpc.TextModelStub(c) for c in channels]
    end = time.monotonic() + seconds
    interval = concurrency / rate  # per worker

    async def worker(i: int) -> None:
        gw = gateways[i % len(gateways)]
        stub = stubs[i % len(stubs)]
        next_at = time.monotonic()
        while time.monotonic() < end:
            next_at += interval
            out["sent"] += 1
            out["per_gateway"][gw] = out["per_gateway"].get(gw, 0) + 1
            try:
                r = await stub.Predict(text_model_pb2.PredictRequest(text="good"),
                                       metadata=(("application", "text"),), timeout=5)
                out["ok"] += 1
                now = time.time()
                out["per_replica"][r.replica] = out["per_replica"].get(r.replica, 0) + 1
                out["first"].setdefault(r.replica, now)
                out["last"][r.replica] = now
            except grpc.aio.AioRpcError as e:
                out["failed"] += 1
                code = e.code().name
                out["codes"][code] = out["codes"].get(code, 0) + 1
                if len(out["failures"]) < MAX_FAILURES_KEPT:
                    out["failures"].append([time.time(), code, e.details()])
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = time.monotonic()  # behind: no burst to catch up

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    for c in channels:
        await c.close()
    out["end"] = time.time()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    gws, secs, rate, conc = sys.argv[1:5]
    asyncio.run(main(gws.split(","), float(secs), float(rate), int(conc)))
