"""Conversations over REST: ``/v1/ns/{namespace}/chats[/{session}/(messages|count|fork|events)]``.

Each request opens the conversation as an ``AsyncChatHistory`` (over the server's one shared
NATS connection), so a message appended here is what ``ChatHistory(session, namespace=...)``
reads, with the same sequence numbers. A session id is one percent-encoded path segment.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .. import errors
from ..chat import AsyncChatHistory
from ..models import Entry
from .headers import COMMON
from .rest import Namespaces, RestError, decode_body, json_response
from .sse import live_events

__all__ = ["ChatRoutes"]


class AppendBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST .../messages``: one ``message`` or a list of ``messages`` (stored atomically);
    ``ttl``: the conversation expires that many seconds after this write (None: never)."""

    message: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    ttl: float | None = None


class Appended(msgspec.Struct):
    seqs: list[int]


class EntryOut(msgspec.Struct):
    seq: int
    time: datetime
    message: dict[str, Any]


class Messages(msgspec.Struct):
    messages: list[EntryOut]


class Count(msgspec.Struct):
    count: int


class ForkBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST .../fork``: copy the messages up to sequence ``upto`` (None: all) into the new
    conversation ``session_id`` (409 ``conflict`` when it exists)."""

    session_id: str
    upto: int | None = None


class Forked(msgspec.Struct):
    session_id: str


class SessionOut(msgspec.Struct):
    session_id: str
    message_count: int
    last_activity: datetime


class Sessions(msgspec.Struct):
    sessions: list[SessionOut]


def _opt_int(request: Request, name: str, text: str | None = None) -> int | None:
    text = request.query_params.get(name) if text is None else text
    if text is None or text == "":
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 20:  # the library checks the range
        raise errors.InvalidArgument(f"{name} must be an integer >= 0, not {text!r}")
    return int(text)


class ChatRoutes:
    def __init__(self, spaces: Namespaces, sse_lifetime: float, stop: asyncio.Event) -> None:
        self.spaces, self.sse_lifetime, self.stop = spaces, sse_lifetime, stop

    async def __call__(self, request: Request, namespace: str, rest: list[str]) -> Response:
        method = request.method
        if rest == ["chats"]:
            if method != "GET":
                raise RestError(405, "method_not_allowed", "conversations are listed with GET")
            q = request.query_params
            before = None
            if "before_time" in q or "before_session" in q:
                try:
                    before = (datetime.fromisoformat(q.get("before_time", "")), q.get("before_session", ""))
                except ValueError as exc:
                    raise errors.InvalidArgument(f"before_time must be an ISO 8601 time: {exc}") from exc
            found = await AsyncChatHistory.sessions(
                namespace,
                q.get("pattern", "*"),
                limit=_opt_int(request, "limit"),  # absent: every conversation
                offset=_opt_int(request, "offset") or 0,
                before=before,
                **self.spaces.connect,
            )
            return json_response(Sessions([SessionOut(s.session_id, s.message_count, s.last_activity) for s in found]))
        if len(rest) != 3 or rest[0] != "chats":
            raise RestError(404, "not_found", "no such route")
        session, action = rest[1], rest[2]
        ttl: float | None = None
        body: AppendBody | None = None
        if action == "messages" and method == "POST":
            body = await decode_body(request, AppendBody)
            ttl = body.ttl
        chat = self.spaces.chat(namespace, session, ttl)
        streaming = False
        try:
            if action == "messages":
                if method == "GET":
                    entries = await chat.entries(after=_opt_int(request, "after"), last=_opt_int(request, "last"))
                    return json_response(Messages([EntryOut(e.seq, e.time, e.message) for e in entries]))
                if body is not None:
                    if (body.message is None) == (body.messages is None):
                        raise errors.InvalidMessage("give either message (one) or messages (a list)")
                    seqs = [await chat.append(body.message)] if body.message is not None else await chat.extend(body.messages or [])
                    return json_response(Appended(seqs))
                if method == "DELETE":
                    await chat.clear()
                    return json_response(Count(0))
            elif action == "count" and method == "GET":
                return json_response(Count(await chat.count()))
            elif action == "fork" and method == "POST":
                fork = await decode_body(request, ForkBody)
                other = await chat.fork(fork.session_id, fork.upto)
                await other.close()
                return json_response(Forked(other.session_id), 201)
            elif action == "events" and method == "GET":
                after = _opt_int(request, "after", request.headers.get("last-event-id"))
                watch = chat.watch(after)
                await watch.start()
                streaming = True
                return StreamingResponse(
                    self._events(chat, watch), 200, {**COMMON, "content-type": "text/event-stream", "cache-control": "no-cache"}
                )
            else:
                raise RestError(404, "not_found", "no such route")
            raise RestError(405, "method_not_allowed", f"{method} is not allowed here")
        finally:
            if not streaming:
                await chat.close()

    def _events(self, chat: AsyncChatHistory, watch: Any) -> AsyncIterator[bytes]:
        """SSE ``message`` events, ``id`` the sequence: a client resumes with ``Last-Event-ID``."""

        def encode(e: Entry) -> bytes:
            return b"id: %d\nevent: message\ndata:%s\n\n" % (e.seq, msgspec.json.encode(EntryOut(e.seq, e.time, e.message)))

        return live_events(watch, encode, stop=self.stop, lifetime=self.sse_lifetime, closing=chat.close)
