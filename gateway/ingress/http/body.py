"""Reading an HTTP request body: bounded in size (after inflating), in time, and in encodings.

aiohttp's own decompression inflates a whole received chunk before its size limit is checked
(a small gzip bomb grows ~8x past the limit in memory), so the listener turns it off and the
body is read here: raw chunks with a running count, `Content-Encoding: gzip`/`deflate` inflated
with zlib's `max_length` so no more than the limit (plus one byte) is ever produced, 413 as soon
as either count passes the limit. Other encodings are 415. The whole read has a deadline
(`http.body_timeout_s`): a client trickling its body is answered 408 and its slot freed.
"""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

from gateway.ingress.http.errors import RestError

_INFLATE = frozenset({"gzip", "x-gzip", "deflate"})


def too_large(limit: int) -> RestError:
    return RestError(413, f"the request body is larger than {limit} bytes "
                          "(proxy.max_message_bytes)")


def _encoding(request: web.BaseRequest) -> str:
    enc = request.headers.get("Content-Encoding", "identity").strip().lower()
    if enc in ("", "identity"):
        return "identity"
    if enc in _INFLATE:
        return enc
    raise RestError(415, f"Content-Encoding {enc[:40]!r} is not supported: send the body "
                         "uncompressed, or with gzip or deflate")


async def read_body(request: web.BaseRequest, limit: int, timeout_s: float) -> bytes:
    """The request body (inflated), or RestError 408 / 413 / 415 / 400."""
    enc = _encoding(request)
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    try:
        async with asyncio.timeout(timeout_s):
            if request.headers.get("Expect", "").lower() == "100-continue":
                # curl asks before sending a body over 1 MiB; aiohttp's router would answer,
                # the low-level server does not (and the client would wait a second).
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return await _read(request, limit, enc)
    except TimeoutError:
        raise RestError(408, f"the request body did not arrive within {timeout_s:g} s "
                             "(http.body_timeout_s)") from None


async def _read(request: web.BaseRequest, limit: int, enc: str) -> bytes:
    parts: list[bytes] = []
    raw = total = 0
    inflater = None if enc == "identity" else zlib.decompressobj(zlib.MAX_WBITS | 32)
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        raw += len(chunk)
        if raw > limit:
            raise too_large(limit)
        if inflater is None:
            parts.append(chunk)
            total = raw
            continue
        data = chunk
        while data:
            try:
                out = inflater.decompress(data, limit - total + 1)
            except zlib.error as e:
                raise RestError(400, f"the {enc} body cannot be inflated: {e}") from None
            total += len(out)
            if total > limit:
                raise too_large(limit)
            parts.append(out)
            data = inflater.unconsumed_tail
            if inflater.eof:
                break
    if inflater is not None and raw and not inflater.eof:
        raise RestError(400, f"the {enc} body is truncated")
    return b"".join(parts)
