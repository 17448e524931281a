"""``ChatBackend`` over ``/v1/ns/{namespace}/chats``; messages cross as JSON bytes
(``msgspec.Raw``), and a conversation's live feed is SSE resumed with ``Last-Event-ID``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from .. import errors
from .._backend import LogEntry
from ..models import SessionInfo
from ..settings import ConnectOptions
from .client import Http, SseFeed, acquire, seg

__all__ = ["HttpChat", "HttpChatLog", "open_chat"]

# What the server checks (its own ChatLog's limit, 413 value_too_large); the client's check is
# only there to refuse before sending, so it is the largest body the server takes.
_MAX_MESSAGE = 64 * 1024 * 1024


class _Append(msgspec.Struct, omit_defaults=True):
    message: msgspec.Raw | None = None
    messages: list[msgspec.Raw] | None = None
    ttl: float | None = None


class _Seqs(msgspec.Struct):
    seqs: list[int]


class _Entry(msgspec.Struct):
    seq: int
    time: datetime
    message: msgspec.Raw


class _Messages(msgspec.Struct):
    messages: list[_Entry]


class _Count(msgspec.Struct):
    count: int


class _Session(msgspec.Struct):
    session_id: str
    message_count: int
    last_activity: datetime


class _Sessions(msgspec.Struct):
    sessions: list[_Session]


class LogFeed(SseFeed[LogEntry]):
    """A conversation's live entries over SSE (``/events``), resumed after the last sequence."""

    def _decode(self, data: bytes) -> tuple[int, LogEntry]:
        e = msgspec.json.decode(data, type=_Entry)
        return e.seq, LogEntry(e.seq, e.time, bytes(e.message))


class HttpChatLog:
    def __init__(self, backend: HttpChat, session_id: str, ttl: int | None) -> None:
        self._backend, self.session_id, self._ttl = backend, session_id, ttl
        self._path = f"{backend.base}/chats/{seg(session_id)}"

    @property
    def max_message(self) -> int:
        return _MAX_MESSAGE

    async def _post(self, body: _Append, what: str) -> list[int]:
        r = await self._backend.http.request("POST", self._path + "/messages", content=msgspec.json.encode(body), what=what)
        return msgspec.json.decode(r.content, type=_Seqs).seqs

    async def append(self, data: bytes, msg_id: str | None = None) -> int:
        # msg_id: not carried over HTTP (only botwire serve, on NATS, appends with one)
        return (await self._post(_Append(message=msgspec.Raw(data), ttl=self._ttl), "append"))[0]

    async def extend(self, payloads: list[bytes], total: int) -> list[int]:
        return await self._post(_Append(messages=[msgspec.Raw(p) for p in payloads], ttl=self._ttl), "extend")

    async def entries(self, after: int | None, last: int | None) -> list[LogEntry]:
        params: dict[str, Any] = {}
        if after is not None:
            params["after"] = after
        if last is not None:
            params["last"] = last
        r = await self._backend.http.request("GET", self._path + "/messages", params=params)
        return [LogEntry(e.seq, e.time, bytes(e.message)) for e in msgspec.json.decode(r.content, type=_Messages).messages]

    async def read(self, after: int | None, last: int | None) -> list[bytes]:
        return [e.data for e in await self.entries(after, last)]

    async def count(self) -> int:
        r = await self._backend.http.request("GET", self._path + "/count")
        return msgspec.json.decode(r.content, type=_Count).count

    async def clear(self) -> None:
        await self._backend.http.request("DELETE", self._path + "/messages", what="clear")

    async def fork(self, target: HttpChatLog, upto: int | None, origin: str) -> None:
        body = msgspec.json.encode({"session_id": target.session_id, "upto": upto})
        await self._backend.http.request("POST", self._path + "/fork", content=body, what="fork")

    def watch(self, after: int | None) -> LogFeed:
        return LogFeed(self._backend.http, self._path + "/events", {}, after)

    async def close(self) -> None:
        await self._backend.close()


class HttpChat:
    def __init__(self, http: Http, namespace: str) -> None:
        self.http = http
        self.base = f"/v1/ns/{namespace}"

    def log(self, session_id: str, ttl: int | None) -> HttpChatLog:
        return HttpChatLog(self, session_id, ttl)

    async def sessions(
        self, pattern: str, *, limit: int | None, offset: int, before: tuple[datetime, str] | None
    ) -> list[SessionInfo]:
        params: dict[str, Any] = {"pattern": pattern, "offset": offset}
        if limit is not None:
            params["limit"] = limit
        if before is not None:
            params["before_time"], params["before_session"] = before[0].isoformat(), before[1]
        r = await self.http.request("GET", f"{self.base}/chats", params=params)
        return [SessionInfo(s.session_id, s.message_count, s.last_activity) for s in msgspec.json.decode(r.content, type=_Sessions).sessions]

    async def close(self) -> None:
        await self.http.close()


async def open_chat(opts: ConnectOptions, namespace: str, *, replicas: int | None, timeout: float) -> HttpChat:
    if replicas not in (None, 1):
        raise errors.InvalidArgument("replicas= is set by the server over HTTP; leave it out")
    return HttpChat(acquire(opts, timeout), namespace)
