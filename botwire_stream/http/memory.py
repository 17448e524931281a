"""``MemoryBackend`` over ``/v1/ns/{namespace}/keys``: values cross as the stored JSON bytes
(``msgspec.Raw`` both ways), never decoded here."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import msgspec

from .. import errors
from .._backend import ChangeFeed, Current, KeyChange, KeyRevision
from ..models import Op
from ..settings import ConnectOptions
from .client import Http, SseFeed, acquire, seg

__all__ = ["HttpMemory", "open_memory"]

_PAGE = 10_000  # the server's largest page


class _KeyValue(msgspec.Struct):
    key: str
    value: msgspec.Raw
    revision: int


class _Set(msgspec.Struct, omit_defaults=True):
    value: msgspec.Raw
    ttl: float | None = None
    revision: int | None = None


class _Written(msgspec.Struct):
    revision: int


class _Deleted(msgspec.Struct):
    deleted: bool


class _Page(msgspec.Struct):
    keys: list[str]
    next: str | None


class _Rev(msgspec.Struct):
    revision: int
    op: Op
    value: msgspec.Raw
    has_value: bool
    time: datetime


class _Revisions(msgspec.Struct):
    revisions: list[_Rev]


class _Change(msgspec.Struct):
    key: str
    op: Op
    value: msgspec.Raw
    has_value: bool
    revision: int
    time: datetime


def _bytes(raw: msgspec.Raw, has_value: bool) -> bytes | None:
    return bytes(raw) if has_value else None


class KeyFeed(SseFeed[KeyChange]):
    """Live changes over SSE (``/watch?pattern=``), resumed after the last revision delivered."""

    def _decode(self, data: bytes) -> tuple[int, KeyChange]:
        c = msgspec.json.decode(data, type=_Change)
        return c.revision, KeyChange(c.key, c.op, _bytes(c.value, c.has_value), c.revision, c.time)


class _NoChanges:
    """``changes()`` over HTTP: never coherent, so a read cache serves no hits and reads the
    server every time (correct, not faster)."""

    def __init__(self) -> None:
        self._closed = asyncio.Event()

    async def start(self) -> object:
        return self

    def coherent(self) -> object | None:
        return None

    async def __anext__(self) -> KeyChange:
        await self._closed.wait()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._closed.set()


class HttpMemory:
    def __init__(self, http: Http, namespace: str) -> None:
        self._http = http
        self._base = f"/v1/ns/{namespace}"

    def _key(self, key: str) -> str:
        return f"{self._base}/keys/{seg(key)}"

    async def get(self, key: str) -> Current | None:
        r = await self._http.request("GET", self._key(key), ok404=True)
        if r.status_code == 404:
            last = r.headers.get("x-revision")  # a delete or expiry: what a conditional write names
            return Current(int(last), None) if last and last.isdigit() else None
        got = msgspec.json.decode(r.content, type=_KeyValue)
        return Current(got.revision, bytes(got.value))

    async def contains(self, key: str) -> bool:
        r = await self._http.request("HEAD", self._key(key), ok404=True)
        return r.status_code == 200

    async def put(
        self, key: str, data: bytes, *, ttl: int | None, expected: int | None = None,
        replaced: Current | None = None, what: str = "set",
    ) -> int:
        body = msgspec.json.encode(_Set(msgspec.Raw(data), ttl, expected))
        r = await self._http.request("PUT", self._key(key), content=body, what=what)
        return msgspec.json.decode(r.content, type=_Written).revision

    async def delete(self, key: str) -> bool:
        r = await self._http.request("DELETE", self._key(key), what="delete")
        return msgspec.json.decode(r.content, type=_Deleted).deleted

    async def list_keys(self, pattern: str, *, limit: int | None = None, after: str | None = None) -> list[str]:
        out: list[str] = []
        while limit is None or len(out) < limit:
            want = _PAGE if limit is None else min(_PAGE, limit - len(out))
            if want == 0:
                break
            params: dict[str, Any] = {"pattern": pattern, "limit": want}
            if after is not None:
                params["after"] = after
            page = msgspec.json.decode((await self._http.request("GET", f"{self._base}/keys", params=params)).content, type=_Page)
            out += page.keys
            if page.next is None:
                break
            after = page.next
        return out

    async def revisions(self, key: str) -> list[KeyRevision]:
        r = await self._http.request("GET", self._key(key) + "/revisions")
        got = msgspec.json.decode(r.content, type=_Revisions)
        return [KeyRevision(x.revision, x.op, _bytes(x.value, x.has_value), x.time) for x in got.revisions]

    def watch(self, pattern: str, after: int | None = None) -> KeyFeed:
        return KeyFeed(self._http, f"{self._base}/watch", {"pattern": pattern}, after)

    def changes(self) -> ChangeFeed:
        return _NoChanges()

    async def close(self) -> None:
        await self._http.close()


async def open_memory(opts: ConnectOptions, namespace: str, *, history: int | None, replicas: int | None, timeout: float) -> HttpMemory:
    """The namespace over HTTP (``history`` and ``replicas`` are the server's settings there)."""
    if history is not None and history != 16:
        raise errors.InvalidArgument("history= is set by the server over HTTP; leave it out")
    return HttpMemory(acquire(opts, timeout), namespace)
