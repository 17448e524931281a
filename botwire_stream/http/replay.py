"""``ReplayBackend`` over ``botwire serve``: replay as NDJSON from ``/v1/ns/{namespace}/replay``,
past states from ``/v1/ns/{namespace}/past/...`` (server/rest_replay.py). Values and messages
cross as the stored JSON bytes, never decoded here. Recording summaries and clears and changing
the retention are NATS-only: they raise ``InvalidArgument`` naming that."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal

import msgspec

from .. import errors
from .._backend import Bound, LogEntry, RawEvent, RetentionState
from ..settings import ConnectOptions
from .client import Http, acquire, seg

__all__ = ["HttpReplay", "open_replay"]


class _ErrorBody(msgspec.Struct):
    code: str
    message: str


class _Line(msgspec.Struct):
    """A line of the stream: an event, or the error that ended it."""

    source: Literal["memory", "chat"] | None = None
    seq: int = 0
    time: datetime | None = None
    kind: str = ""
    key: str = ""
    value: msgspec.Raw = msgspec.Raw(b"null")
    has_value: bool = False
    origin: str | None = None
    upto: int | None = None
    error: _ErrorBody | None = None


class _PastValue(msgspec.Struct):
    value: msgspec.Raw
    has_value: bool


class _PastEntry(msgspec.Struct):
    seq: int
    time: datetime
    message: msgspec.Raw


class _PastMessages(msgspec.Struct):
    messages: list[_PastEntry]


_line_decoder = msgspec.json.Decoder(_Line)


def _param(bound: Bound) -> str:
    return "" if bound is None else bound.isoformat() if isinstance(bound, datetime) else str(bound)


async def open_replay(opts: ConnectOptions, namespace: str, *, timeout: float) -> HttpReplay:
    return HttpReplay(acquire(opts, timeout), namespace)


class HttpReplay:
    """One namespace's logs read through the server (a ``_backend.ReplayBackend``)."""

    def __init__(self, http: Http, namespace: str) -> None:
        self.http = http
        self.base = f"/v1/ns/{seg(namespace)}"

    async def _events(self, params: dict[str, Any]) -> AsyncIterator[RawEvent]:
        from .client import _CODES  # the error classes by code, as for every response

        async for line in self.http.lines(self.base + "/replay", params):
            e = _line_decoder.decode(line)
            if e.error is not None:
                raise _CODES.get(e.error.code, errors.ServerUnavailable)(e.error.message)
            assert e.source is not None and e.time is not None
            data = bytes(e.value) if e.has_value else None
            yield RawEvent(e.source, e.seq, e.time, e.kind, e.key, data, e.origin, e.upto)

    def key_events(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[RawEvent]:
        return self._events({"keys": pattern, "conversations": "", "start": _param(start), "end": _param(end)})

    def chat_events(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[RawEvent]:
        return self._events({"keys": "", "conversations": pattern, "start": _param(start), "end": _param(end)})

    async def key_bursts(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[list[RawEvent]]:
        async for event in self.key_events(pattern, start, end):  # one line at a time
            yield [event]

    async def chat_bursts(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[list[RawEvent]]:
        async for event in self.chat_events(pattern, start, end):
            yield [event]

    async def key_at(self, key: str, at: datetime) -> bytes | None:
        r = await self.http.request("GET", f"{self.base}/past/keys/{seg(key)}", params={"at": at.isoformat()})
        past = msgspec.json.decode(r.content, type=_PastValue)
        return bytes(past.value) if past.has_value else None

    async def log_at(self, session_id: str, at: datetime) -> list[LogEntry]:
        r = await self.http.request("GET", f"{self.base}/past/chats/{seg(session_id)}", params={"at": at.isoformat()})
        past = msgspec.json.decode(r.content, type=_PastMessages)
        return [LogEntry(e.seq, e.time, bytes(e.message)) for e in past.messages]

    @staticmethod
    def _nats_only(what: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"{what} is served over NATS only, not over HTTP")

    async def add_summary(self, session_id: str, data: bytes, upto: int) -> int:
        raise self._nats_only("compact")

    async def last_summary(self, session_id: str) -> RawEvent | None:
        raise self._nats_only("the compaction summary")

    async def record_clear(self, session_id: str) -> None:
        raise self._nats_only("recording a clear")

    async def ensure_events(self) -> None:
        return None  # the server's own streams: it keeps them current

    async def retention(self) -> RetentionState:
        raise self._nats_only("retention")

    async def set_retention(self, key_history: int | None, log_messages: int | None, log_age: float | None) -> None:
        raise self._nats_only("retention")

    async def close(self) -> None:
        await self.http.close()
