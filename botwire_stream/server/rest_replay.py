"""Replay and time travel over REST: ``/v1/ns/{namespace}/replay`` and ``/v1/ns/{namespace}/past/...``.

- ``GET /replay?start=&end=&keys=&conversations=``: every event still kept, oldest first, as
  NDJSON (one ``EventOut`` per line), streamed as the library's replay reads them (one batch of
  the log in memory at a time, sent as the client reads). ``start``/``end``: a sequence (digits)
  or an ISO-8601 time (no zone: UTC); ``keys``/``conversations``: globs, ``*`` when absent, none
  when given empty. An error met after the first line ends the stream with one line
  ``{"error": {"code", "message"}}``.
- ``GET /past/keys/{key}?at=T``: the key's value as of ``T`` (``PastValue``).
- ``GET /past/chats/{session}?at=T``: the conversation's messages as of ``T`` (``PastMessages``).

A moment older than what the server keeps: 410 ``before_retention`` (``BeforeRetention`` in the
client). Auth and quotas as for every ``/v1/ns/`` read (``server.auth``: GET needs read).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .. import errors, keys
from .._backend import RawEvent
from ..audit import check_past, check_replay, parse_when, raw_events
from .headers import COMMON
from .rest import ErrorBody, ErrorResponse, Namespaces, RestError, json_response

__all__ = ["EventOut", "PastEntry", "PastMessages", "PastValue", "ReplayRoutes"]

_NULL = msgspec.Raw(b"null")


class EventOut(msgspec.Struct):
    """One NDJSON line of ``/replay``: ``source`` memory (a key) or chat (a conversation), its
    sequence in that log, time, ``kind`` (set, delete, purge, expire; append, clear, expire,
    summary), ``key`` (the key or session id), ``value`` (meaningful with ``has_value``: the
    value, message or summary as stored), ``origin`` (host/pid; null for the server's own),
    ``upto`` (what a summary covers)."""

    source: Literal["memory", "chat"]
    seq: int
    time: datetime
    kind: str
    key: str
    value: msgspec.Raw
    has_value: bool
    origin: str | None
    upto: int | None


class PastValue(msgspec.Struct):
    """A key as of ``at``: ``value`` meaningful only with ``has_value`` (none: not set then)."""

    key: str
    at: datetime
    value: msgspec.Raw
    has_value: bool


class PastEntry(msgspec.Struct):
    seq: int
    time: datetime
    message: msgspec.Raw


class PastMessages(msgspec.Struct):
    session_id: str
    at: datetime
    messages: list[PastEntry]


def _raw(data: bytes | None) -> tuple[msgspec.Raw, bool]:
    """``data`` as JSON to pass through; what is not valid JSON (never written by the library)
    as no value, so that one stored oddity cannot break the stream's lines."""
    if data is None:
        return _NULL, False
    try:
        msgspec.json.decode(data, type=msgspec.Raw)  # validates, copies nothing
    except msgspec.DecodeError:
        return _NULL, False
    return msgspec.Raw(data), True


def _line(e: RawEvent) -> bytes:
    value, has = _raw(e.data)
    return msgspec.json.encode(EventOut(e.source, e.seq, e.time, e.kind, e.name, value, has, e.origin, e.upto)) + b"\n"


def _bound(request: Request, name: str) -> int | datetime | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    if text.isascii() and text.isdigit():
        if len(text) > 19:
            raise errors.InvalidArgument(f"{name} is too large a sequence: {text!r}")
        return int(text)
    return parse_when(text)


def _glob(request: Request, name: str) -> str | None:
    text = request.query_params.get(name)
    return "*" if text is None else (text or None)


def _at(request: Request) -> datetime:
    text = request.query_params.get("at")
    if not text:
        raise errors.InvalidArgument("give at=<ISO-8601 time>, e.g. at=2026-11-30T14:02:00Z")
    return check_past(parse_when(text))


class ReplayRoutes:
    def __init__(self, spaces: Namespaces) -> None:
        self.spaces = spaces

    async def __call__(self, request: Request, namespace: str, rest: list[str]) -> Response:
        if request.method != "GET":
            raise RestError(405, "method_not_allowed", "replay and past states are read with GET")
        mem = self.spaces.memory(namespace)
        if rest == ["replay"]:
            lo, hi, k, c = check_replay(
                namespace, _bound(request, "start"), _bound(request, "end"), _glob(request, "keys"), _glob(request, "conversations")
            )
            backend = await mem._replayer()
            events = raw_events(backend, start=lo, end=hi, keys=k, conversations=c)
            first = await anext(events, None)  # a refusal before anything is sent is a status code
            return StreamingResponse(self._lines(first, events), 200, {**COMMON, "content-type": "application/x-ndjson"})
        if len(rest) == 3 and rest[0] == "past" and rest[1] == "keys":
            key, at = keys.check_key(rest[2]), _at(request)
            data = await (await mem._replayer()).key_at(key, at)
            value, has = _raw(data)
            return json_response(PastValue(key, at, value, has))
        if len(rest) == 3 and rest[0] == "past" and rest[1] == "chats":
            session_id, at = keys.check_session_id(rest[2]), _at(request)
            entries = await (await mem._replayer()).log_at(session_id, at)
            return json_response(PastMessages(session_id, at, [PastEntry(e.seq, e.time, msgspec.Raw(e.data)) for e in entries]))
        raise RestError(404, "not_found", "no such route: see /openapi.json")

    @staticmethod
    async def _lines(first: RawEvent | None, events: AsyncIterator[RawEvent]) -> AsyncIterator[bytes]:
        if first is None:
            return
        yield _line(first)
        try:
            async for e in events:
                yield _line(e)
        except errors.BotWireError as exc:  # after the status line: said as the last line
            yield msgspec.json.encode(ErrorResponse(ErrorBody(exc.code, str(exc)[:1000]))) + b"\n"
