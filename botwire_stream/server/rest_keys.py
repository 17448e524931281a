"""Keys over REST: ``/v1/ns/{namespace}/keys[/{key}[/revisions]]`` and ``/v1/ns/{namespace}/watch``.

Values cross as the JSON the library stores (``codec``): the server passes the stored bytes
through (``msgspec.Raw``) and never decodes them, so a value set over HTTP is what
``Memory(namespace).get`` returns, and the other way round. A key is one path segment,
percent-encoded (``user%3A42`` or ``user:42``; ``a%2Fb`` is the key ``a/b``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .. import codec, errors, keys
from .._backend import Feed, KeyChange
from ..live import LiveIterator
from ..memory import MAX_VALUE_BYTES
from ..models import Op
from ..times import ttl_seconds
from .headers import COMMON
from .rest import Namespaces, RestError, decode_body, json_response, rest_error
from .sse import live_events

__all__ = ["KeyRoutes"]

MAX_PAGE = 10_000
# the largest stream sequence: NATS parses a larger expected sequence or start as no number at all
# (a write conditional on revision 2**64 was stored as a create; a watch after it got a 500: QA-9)
MAX_REVISION = 2**63 - 1


class SetKey(msgspec.Struct, forbid_unknown_fields=True):
    """``PUT`` body: the value (any JSON), ``ttl`` seconds (None: forever), and ``revision``:
    write only over that revision (0: only when the key holds none), else 409 ``conflict``."""

    value: msgspec.Raw
    ttl: float | None = None
    revision: int | None = None


class KeyValue(msgspec.Struct):
    key: str
    value: msgspec.Raw
    revision: int


class Written(msgspec.Struct):
    key: str
    revision: int


class Deleted(msgspec.Struct):
    key: str
    deleted: bool


class KeyPage(msgspec.Struct):
    """Sorted keys; ``next``: pass it as ``after`` for the next page (None: no more)."""

    keys: list[str]
    next: str | None


_NULL = msgspec.Raw(b"null")


class RevisionOut(msgspec.Struct):
    """``value`` is meaningful only with ``has_value`` (a stored ``null`` is a value; a delete,
    an expiry or a value the revision does not carry has none)."""

    revision: int
    op: Op
    value: msgspec.Raw
    has_value: bool
    time: datetime


class Revisions(msgspec.Struct):
    key: str
    revisions: list[RevisionOut]


class ChangeOut(msgspec.Struct):
    """One SSE ``change`` event's data (its ``id`` is the revision)."""

    key: str
    op: Op
    value: msgspec.Raw
    has_value: bool
    revision: int
    time: datetime


def _int(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
        raise errors.InvalidArgument(f"{name} must be an integer from {low} to {high}, not {text!r}")
    return int(text)


class _Watch(LiveIterator[KeyChange, KeyChange]):
    """A backend key feed as stored records (the value's JSON passes through undecoded)."""

    def __init__(self, feed: Feed[KeyChange]) -> None:
        async def open_feed() -> Feed[KeyChange]:
            return feed

        super().__init__(open_feed)

    def _convert(self, record: KeyChange) -> KeyChange:
        return record


class KeyRoutes:
    def __init__(self, spaces: Namespaces, sse_lifetime: float, stop: asyncio.Event) -> None:
        self.spaces, self.sse_lifetime, self.stop = spaces, sse_lifetime, stop

    async def __call__(self, request: Request, namespace: str, rest: list[str]) -> Response:
        method = request.method
        mem = self.spaces.memory(namespace)
        if rest == ["keys"] and method == "GET":
            pattern = request.query_params.get("pattern", "*")
            limit = _int(request, "limit", 1000, 1, MAX_PAGE)
            after = request.query_params.get("after")
            found = await mem.list_keys(pattern, limit=limit, after=after)
            return json_response(KeyPage(found, found[-1] if limit is not None and len(found) == limit else None))
        if rest == ["watch"] and method == "GET":
            pattern = request.query_params.get("pattern", "*")
            keys.pattern_filter(pattern)
            last = request.headers.get("last-event-id") or request.query_params.get("after")
            resume = None
            if last is not None:
                if not last.isascii() or not last.isdigit() or len(last) > 20 or int(last) > MAX_REVISION:
                    raise errors.InvalidArgument(f"Last-Event-ID (after) must be a revision, not {last!r}")
                resume = int(last)
            backend = await mem._connection()
            watch = _Watch(backend.watch(pattern, resume))
            await watch.start()  # subscribed before the response starts: later writes are delivered
            return StreamingResponse(self._events(watch), 200, {**COMMON, "content-type": "text/event-stream", "cache-control": "no-cache"})
        if len(rest) not in (2, 3) or rest[0] != "keys" or (len(rest) == 3 and rest[2] != "revisions"):
            raise RestError(404, "not_found", "no such route")
        key = keys.check_key(rest[1])
        if len(rest) == 3:
            if method != "GET":
                raise RestError(405, "method_not_allowed", "revisions are read with GET")
            backend = await mem._connection()
            revs = [
                RevisionOut(r.revision, r.op, _NULL if r.data is None else msgspec.Raw(r.data), r.data is not None, r.time)
                for r in await backend.revisions(key)
            ]
            return json_response(Revisions(key, revs))
        if method in ("GET", "HEAD"):
            backend = await mem._connection()
            current = await backend.get(key)
            if current is None or current.data is None:
                # x-revision: the delete or expiry that is the key's last record, which a
                # conditional write must name (a create over it is "revision": that number)
                headers = {} if current is None else {"x-revision": str(current.revision)}
                if method == "HEAD":
                    return Response(b"", 404, {**COMMON, **headers})
                return rest_error(RestError(404, "not_found", f"no value under {key!r}"), headers)
            if method == "HEAD":
                return Response(b"", 200, {**COMMON, "x-revision": str(current.revision)})
            return json_response(KeyValue(key, msgspec.Raw(current.data), current.revision))
        if method == "PUT":
            body = await decode_body(request, SetKey)
            raw = memoryview(body.value)  # the value's text inside the request body, not copied
            if len(raw) > MAX_VALUE_BYTES:
                raise errors.ValueTooLarge(f"the value is {len(raw)} bytes; the limit is {MAX_VALUE_BYTES}")
            ttl = ttl_seconds(body.ttl)
            if body.revision is not None and not 0 <= body.revision <= MAX_REVISION:
                raise errors.InvalidArgument(f"revision must be from 0 to {MAX_REVISION}, not {body.revision}")
            # msgspec.Raw keeps the text as sent, which may hold what the library never stores
            # (invalid UTF-8 in a string, 1e999 read as infinity): decoded and encoded as the
            # library does, so InvalidValue refuses those, and the stored bytes are canonical
            try:
                value = codec.decode(raw)
            except msgspec.DecodeError as exc:
                raise errors.InvalidValue(f"the value is not valid JSON: {exc}") from exc
            expected_revision = body.revision
            raw.release()
            del body  # the request body goes before the value is encoded: at most two copies at once
            data = codec.encode(value)
            del value
            what = "set" if expected_revision is None else "conditional set"
            replaced = None
            if expected_revision:  # what the write replaces, so that a chunked value's chunks are reclaimed
                current = await (await mem._connection()).get(key)
                replaced = current if current is not None and current.revision == expected_revision else None
            revision = await mem._write(key, data, ttl, expected=expected_revision, replaced=replaced, what=what)
            return json_response(Written(key, revision))
        if method == "DELETE":
            return json_response(Deleted(key, await mem.delete(key)))
        raise RestError(405, "method_not_allowed", f"{method} is not allowed here")

    def _events(self, watch: _Watch) -> AsyncIterator[bytes]:
        """SSE ``change`` events, ``id`` the revision: a client resumes with ``Last-Event-ID``."""

        def encode(change: KeyChange) -> bytes:
            value = msgspec.Raw(change.data) if change.data is not None else _NULL
            data = msgspec.json.encode(ChangeOut(change.key, change.op, value, change.data is not None, change.revision, change.time))
            return b"id: %d\nevent: change\ndata:%s\n\n" % (change.revision, data)

        return live_events(watch, encode, stop=self.stop, lifetime=self.sse_lifetime)
