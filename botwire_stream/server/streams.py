"""The Durable Streams protocol at ``/v1/stream/<path>`` over ``TokenStreams``.

Every refusal is the protocol's status with a short plain-text body, decided before anything is
written (the core validates before its compare-and-set write).
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Mapping

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .. import errors
from ..tokens import NOW, TokenRead, TokenStreams, media_type
from . import protocol, sse
from .cursor import next_cursor
from .headers import COMMON, PREFLIGHT
from .protocol import ProtocolError

__all__ = ["Streams", "error_response", "respond"]

_OFFSET = re.compile(r"-1|now|[0-9]+_[0-9]+")  # ASCII digits: "\d" took "٣_٣", a 500 (non-Latin-1 ETag)
_CONTENT_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+")
_CACHEABLE = "public, max-age=60, stale-while-revalidate=300"


def respond(status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> Response:
    h = {**COMMON, **(headers or {})}
    return Response(body, status, h)


def error_response(exc: BaseException, head: bool = False) -> Response:
    """A refusal: the protocol's status for the error, and a short plain-text body."""
    extra: dict[str, str] = {}
    if isinstance(exc, ProtocolError):
        status, message, extra = exc.status, exc.message, exc.headers
    elif isinstance(exc, errors.StreamClosed):
        status, message = 409, "the stream is closed"
        extra = {"Stream-Closed": "true", "Stream-Next-Offset": exc.next_offset}
    elif isinstance(exc, errors.ProducerFenced):
        status, message, extra = 403, "stale producer epoch", {"Producer-Epoch": str(exc.epoch)}
    elif isinstance(exc, errors.ProducerSeqGap):
        status, message = 409, "producer sequence gap"
        extra = {"Producer-Expected-Seq": str(exc.expected), "Producer-Received-Seq": str(exc.received)}
    elif isinstance(exc, errors.BotWireError):
        status, message = exc.http_status, str(exc).split("\n", 1)[0][:200]
    else:
        raise exc
    return respond(status, b"" if head else message.encode(), {"content-type": "text/plain", **extra})


def _etag(name: str, start: str, got: TokenRead) -> str:
    return f'"{base64.b64encode(name.encode()).decode()}:{start}:{got.next_offset}{":c" if got.closed else ""}"'


def _read_headers(content_type: str, got: TokenRead) -> dict[str, str]:
    h = {"content-type": content_type, "Stream-Next-Offset": got.next_offset}
    if got.up_to_date:
        h["Stream-Up-To-Date"] = "true"
    if got.closed:
        h["Stream-Closed"] = "true"
    return h


# A refused body up to this size is still read (and dropped) before the 413 goes out: a client
# that sends its whole body before it reads the answer (fetch does) otherwise meets a connection
# closed under its upload and never sees the 413 (the Durable Streams suite's 10 MiB POST failed
# so on a loaded machine). Larger ones are cut off at once.
_DRAIN = 64 * 1024 * 1024


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes; 413 past that, once what was sent (up to 64 MiB) is read."""
    length = request.headers.get("content-length")
    declared = int(length) if length is not None and length.isdigit() else 0
    chunks = request.stream()
    parts, size = [], 0
    if declared <= limit:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                break
            parts.append(chunk)
        else:
            return b"".join(parts)
    if max(declared, size) <= _DRAIN:
        async for chunk in chunks:
            size += len(chunk)
            if size > _DRAIN:
                break
    raise ProtocolError(413, f"the body is larger than {limit} bytes")


class Streams:
    """The handlers; ``stop`` is set when the server shuts down (open long-polls and SSE end)."""

    def __init__(self, store: TokenStreams, max_body: int, long_poll: float, sse_lifetime: float, stop: asyncio.Event) -> None:
        self.store = store
        self.max_body = max_body
        self.long_poll = long_poll
        self.sse_lifetime = sse_lifetime
        self.stop = stop

    async def __call__(self, request: Request) -> Response:
        method = request.method
        if method == "OPTIONS":
            return Response(b"", 204, PREFLIGHT)
        try:
            name = protocol.stream_path(request.scope.get("raw_path") or request.url.path.encode())
            if method == "GET":
                return await self.get(request, name)
            if method == "HEAD":
                return await self.head(name)
            if method == "POST":
                return await self.post(request, name)
            if method == "PUT":
                return await self.put(request, name)
            if method == "DELETE":
                await self.store.delete(name)
                return respond(204)
            return respond(405, b"method not allowed", {"content-type": "text/plain", "allow": "GET, HEAD, POST, PUT, DELETE, OPTIONS"})
        except (ProtocolError, errors.BotWireError) as exc:
            return error_response(exc, head=method == "HEAD")

    # -- PUT ------------------------------------------------------------------------------------
    async def put(self, request: Request, name: str) -> Response:
        h = request.headers
        source = h.get("stream-forked-from")
        ct = h.get("content-type")
        if not ct or not _CONTENT_TYPE.match(ct.strip()):
            ct = None if source else "application/octet-stream"
        ttl_text, expires_text = h.get("stream-ttl"), h.get("stream-expires-at")
        if ttl_text is not None and expires_text is not None:
            raise ProtocolError(400, "give Stream-TTL or Stream-Expires-At, not both")
        ttl, expires = protocol.ttl(ttl_text), protocol.expires_at(expires_text)
        fork_offset = h.get("stream-fork-offset")
        if fork_offset is not None and not re.fullmatch(r"[0-9]+_[0-9]+", fork_offset):
            raise ProtocolError(400, "Stream-Fork-Offset is not an offset")
        sub_text = h.get("stream-fork-sub-offset")
        if sub_text is not None and source is None:
            raise ProtocolError(400, "Stream-Fork-Sub-Offset needs Stream-Forked-From")
        sub = protocol.sub_offset(sub_text)
        body = await read_body(request, self.max_body)
        created, info = await self.store.create(
            name,
            content_type=ct,
            ttl=ttl,
            expires_at=expires,
            data=body,
            closed=protocol.closed_flag(h.get("stream-closed")),
            fork_from=protocol.source_path(source) if source else None,
            fork_offset=fork_offset,
            fork_sub_offset=sub,
        )
        out = {"content-type": info.content_type, "Stream-Next-Offset": info.next_offset}
        if created:
            out["location"] = str(request.url.replace(query=None, fragment=None))
        if info.closed:
            out["Stream-Closed"] = "true"
        return respond(201 if created else 200, b"", out)

    # -- HEAD -----------------------------------------------------------------------------------
    async def head(self, name: str) -> Response:
        info = await self.store.info(name)
        out = {
            "content-type": info.content_type,
            "Stream-Next-Offset": info.next_offset,
            "cache-control": "no-store",
        }
        if info.closed:
            out["Stream-Closed"] = "true"
        if info.ttl is not None:
            out["Stream-TTL"] = str(info.ttl)
        if info.expires_at is not None:
            out["Stream-Expires-At"] = info.expires_at
        return Response(b"", 200, {**COMMON, **out})

    # -- POST -----------------------------------------------------------------------------------
    async def post(self, request: Request, name: str) -> Response:
        h = request.headers
        close = protocol.closed_flag(h.get("stream-closed"))
        producer = protocol.producer(h)
        body = await read_body(request, self.max_body)
        ct = h.get("content-type")
        if not body and not close:
            raise ProtocolError(400, "an append needs a body (or Stream-Closed: true)")
        if body and not ct:
            raise ProtocolError(400, "an append needs a Content-Type")
        done = await self.store.append(
            name, body, content_type=ct, close=close, producer=producer, stream_seq=h.get("stream-seq")
        )
        out = {"Stream-Next-Offset": done.next_offset}
        if done.closed:
            out["Stream-Closed"] = "true"
        if producer is not None:
            out["Producer-Epoch"] = str(done.producer_epoch if done.producer_epoch is not None else producer[1])
            out["Producer-Seq"] = str(done.producer_seq if done.producer_seq is not None else producer[2])
        # 200 only for a producer's new data; a close-only request and a duplicate get 204
        status = 200 if producer is not None and body and not done.duplicate else 204
        return respond(status, b"", out)

    # -- GET ------------------------------------------------------------------------------------
    async def get(self, request: Request, name: str) -> Response:
        q = request.query_params
        offsets = q.getlist("offset")
        if len(offsets) > 1:
            raise ProtocolError(400, "give one offset")
        offset = offsets[0] if offsets else None
        if offset is not None and not _OFFSET.fullmatch(offset):
            raise ProtocolError(400, "malformed offset")
        live = q.get("live")
        if live in ("long-poll", "sse") and offset is None:
            raise ProtocolError(400, f"live={live} needs an offset")
        cursor = q.get("cursor")
        if live == "sse":
            return await self.sse(name, offset or "-1", cursor)
        start = offset or "-1"
        if offset == NOW and live != "long-poll":
            got = await self.store.read(name, NOW)
            out = {**_read_headers(got.content_type, got), "Stream-Up-To-Date": "true", "cache-control": "no-store"}
            return respond(200, got.data, out)
        got = await self.store.read(name, start)
        ct = got.content_type
        out = _read_headers(ct, got)
        if live == "long-poll":
            if not got.chunks and got.up_to_date:
                if not got.closed:
                    got = await self.store.wait(
                        name, got.next_offset if start == NOW else start, self.long_poll, stop=self.stop, created=got.created
                    )
                if not got.chunks:
                    out = {"Stream-Next-Offset": got.next_offset, "Stream-Up-To-Date": "true", "Stream-Cursor": next_cursor(cursor)}
                    if got.closed:
                        out["Stream-Closed"] = "true"
                    return respond(204, b"", out)
                out = _read_headers(ct, got)
            out["Stream-Cursor"] = next_cursor(cursor)
        etag = _etag(name, start, got)
        out["etag"] = etag
        if request.headers.get("if-none-match") == etag:
            return respond(304, b"", {"etag": etag})
        if not got.up_to_date:
            out["cache-control"] = _CACHEABLE
        return respond(200, got.data, out)

    # -- SSE ------------------------------------------------------------------------------------
    async def sse(self, name: str, offset: str, cursor: str | None) -> Response:
        first = await self.store.read(name, offset)  # errors (404, 410) before streaming
        ct = media_type(first.content_type)
        b64 = not (ct.startswith("text/") or ct == "application/json")
        headers = {**COMMON, "content-type": "text/event-stream", "cache-control": "no-cache", "connection": "keep-alive"}
        if b64:
            headers["Stream-SSE-Data-Encoding"] = "base64"
        return StreamingResponse(self._events(name, first, cursor, b64), 200, headers)

    async def _events(self, name: str, got: TokenRead, cursor: str | None, b64: bool) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.sse_lifetime
        keepalive = min(self.long_poll, 15.0)
        while True:
            # one data event per read (a JSON array, or the bytes), then its control event
            # in one write: a client that stops reading at the first "event: control" it sees
            # (the suite's reader does, and a payload may hold that text) still gets the real one
            data = sse.data_event(got.data, base64_encoded=b64) if got.chunks else b""
            yield data + sse.control(got.next_offset, cursor=next_cursor(cursor), up_to_date=got.up_to_date, closed=got.closed)
            if got.closed or self.stop.is_set() or loop.time() >= end:
                return
            try:
                if got.up_to_date:
                    got = await self.store.wait(
                        name, got.next_offset, min(keepalive, end - loop.time()), stop=self.stop, created=got.created
                    )
                else:
                    nxt = await self.store.read(name, got.next_offset)
                    if nxt.created != got.created:
                        return  # deleted and created again: not this reader's stream
                    got = nxt
            except (errors.StreamNotFound, errors.StreamDeleted):
                return
