"""Hand-made HTTP/2 for the bad-input corpus: frames built byte by byte (so they can be
wrong on purpose), sent on a raw socket, and what came back classified.

A corpus case (tests/corpus/*.yaml) is a list of `send` steps:
  preface | settings | {text: str} | {hex: str} | {random: {seed, size}}
  {request: {stream, path, application, extra: [[key, value]...], end_headers, split}}
  {data: {stream, text, compressed, declared_length, end_stream, raw_hex}}
  {frame: {type, flags, stream, payload_hex, length}}   (length: the header lies)
  {repeat: {times, steps: [...]}} | {rapid_reset: {count}}
A value in `extra` is a string (UTF-8 on the wire), {hex: ...} (any bytes) or
{repeat: str, times: n}.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import hpack

from gateway.pb import text_model_pb2

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 3, 4, 6, 7, 8, 9)
END_STREAM, END_HEADERS = 0x1, 0x4
MAX_FRAME = 16384
PREDICT = "/demo.text.TextModel/Predict"


def frame(ftype: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def _int(n: int, prefix_bits: int, first: int = 0) -> bytes:
    top = (1 << prefix_bits) - 1
    if n < top:
        return bytes([first | n])
    out = [first | top]
    n -= top
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, no Huffman: any bytes go through as they are."""
    return b"\x00" + _int(len(name), 7) + name + _int(len(value), 7) + value


def _value(v: Any) -> bytes:
    if isinstance(v, dict):
        if "hex" in v:
            return bytes.fromhex(v["hex"])
        return (str(v["repeat"]) * int(v["times"])).encode()
    return str(v).encode("utf-8")


def request_headers(spec: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    path = spec.get("path", PREDICT)
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", _value(path)),
              (b":authority", b"localhost"), (b"content-type", b"application/grpc"),
              (b"te", b"trailers")]
    app = spec.get("application", "text")
    if app is not None:
        fields.append((b"application", _value(app)))
    for item in spec.get("extra", []):
        key, value = item[0], item[1]
        times = int(item[2]) if len(item) > 2 else 1
        for i in range(times):
            k = _value(key).replace(b"{i}", str(i).encode())
            fields.append((k, _value(value)))
    return fields


def headers_frames(stream: int, fields: list[tuple[bytes, bytes]], end_stream: bool = False,
                   end_headers: bool = True) -> bytes:
    block = b"".join(literal(k, v) for k, v in fields)
    chunks = [block[i:i + MAX_FRAME] for i in range(0, len(block), MAX_FRAME)] or [b""]
    out = b""
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        flags = (END_HEADERS if last and end_headers else 0)
        if i == 0:
            out += frame(HEADERS, flags | (END_STREAM if end_stream else 0), stream, chunk)
        else:
            out += frame(CONTINUATION, flags, stream, chunk)
    return out


def grpc_message(body: bytes, compressed: bool = False, declared: int | None = None) -> bytes:
    n = len(body) if declared is None else declared
    return bytes([1 if compressed else 0]) + struct.pack(">I", n) + body


def predict_body(text: str = "hello") -> bytes:
    return text_model_pb2.PredictRequest(text=text).SerializeToString()


def build(steps: list[Any]) -> bytes:
    out = b""
    for step in steps:
        if step == "preface":
            out += PREFACE
        elif step == "settings":
            out += frame(SETTINGS, 0, 0, b"")
        elif "text" in step and len(step) == 1:
            out += step["text"].encode("latin-1")
        elif "hex" in step:
            out += bytes.fromhex(step["hex"])
        elif "random" in step:
            rng = random.Random(step["random"]["seed"])
            out += rng.randbytes(int(step["random"]["size"]))
        elif "request" in step:
            spec = step["request"] or {}
            out += headers_frames(int(spec.get("stream", 1)), request_headers(spec),
                                  end_headers=spec.get("end_headers", True))
        elif "data" in step:
            spec = step["data"] or {}
            if "raw_hex" in spec:
                body = bytes.fromhex(spec["raw_hex"])
            elif "random" in spec:
                rng = random.Random(spec["random"]["seed"])
                body = rng.randbytes(int(spec["random"]["size"]))
            else:
                body = predict_body(spec.get("text", "hello"))
            msg = grpc_message(body, bool(spec.get("compressed")), spec.get("declared_length"))
            flags = END_STREAM if spec.get("end_stream", True) else 0
            out += frame(DATA, flags, int(spec.get("stream", 1)), msg)
        elif "frame" in step:
            f = step["frame"]
            out += frame(int(f["type"]), int(f.get("flags", 0)), int(f.get("stream", 0)),
                         bytes.fromhex(f.get("payload_hex", "")), f.get("length"))
        elif "rapid_reset" in step:
            for i in range(int(step["rapid_reset"]["count"])):
                sid = 2 * i + 1
                out += headers_frames(sid, request_headers({}))
                out += frame(RST_STREAM, 0, sid, struct.pack(">I", 8))  # CANCEL
        elif "repeat" in step:
            out += build(step["repeat"]["steps"]) * int(step["repeat"]["times"])
        else:
            raise ValueError(f"unknown corpus step {step!r}")
    return out


@dataclass
class Outcome:
    """What the gateway did with one case."""

    kind: str = "silent"
    """answered (a response on a stream), rst, goaway, closed (no HTTP/2 answer), silent."""
    grpc_status: str | None = None
    message: str = ""
    frames: list[tuple[int, int, int]] = field(default_factory=list)


def _parse(buf: bytes, out: Outcome, decoder: hpack.Decoder) -> bytes:
    while len(buf) >= 9:
        n = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + n:
            break
        ftype, flags = buf[3], buf[4]
        stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        payload = buf[9:9 + n]
        buf = buf[9 + n:]
        out.frames.append((ftype, flags, stream))
        if ftype == HEADERS and stream:
            out.kind = "answered"
            try:
                for k, v in decoder.decode(payload, raw=True):
                    if k == b"grpc-status":
                        out.grpc_status = v.decode()
                    elif k == b"grpc-message":
                        out.message = v.decode("utf-8", "replace")
            except Exception:
                out.message = "(headers not decodable)"
        elif ftype == RST_STREAM and out.kind != "answered":
            out.kind = "rst"
        elif ftype == GOAWAY and out.kind not in ("answered", "rst"):
            out.kind = "goaway"
    return buf


def replay(port: int, data: bytes, wait_s: float = 3.0) -> Outcome:
    """Send `data`, read until the gateway closes or `wait_s` passes, classify the answer."""
    out = Outcome()
    decoder = hpack.Decoder()
    decoder.max_allowed_table_size = 65536
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        try:
            s.sendall(data)
        except OSError:
            out.kind = "closed"
            return out
        buf = b""
        started = False
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                if out.kind == "silent":
                    out.kind = "closed"
                break
            buf += chunk
            if not started:
                started = True
            buf = _parse(buf, out, decoder)
            if out.grpc_status is not None:
                break
    return out
