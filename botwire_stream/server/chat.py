"""Conversations as read-only JSON Durable Streams at ``/v1/stream/chat/<namespace>/<session>``.

Each message of an ``AsyncChatHistory`` log is one JSON message of the stream; offsets are the
log's sequences (``format_offset``), so a client resumes exactly where it stopped. Catch-up,
long-poll and SSE work as for token streams; a conversation is never closed. Writes get 405.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .. import errors
from ..chat import AsyncChatHistory
from ..models import Entry
from ..tokens import NOW, format_offset, parse_offset
from . import NATS_TIMEOUT, sse
from .cursor import next_cursor
from .headers import COMMON, PREFLIGHT
from .protocol import ProtocolError
from .streams import error_response, respond

__all__ = ["Conversations"]

CHAT_PREFIX = "chat/"
_JSON = "application/json"


def _body(entries: list[Entry]) -> bytes:
    return msgspec.json.encode([e.message for e in entries])


def _retrieve(task: asyncio.Future[Entry]) -> None:
    if not task.cancelled():
        task.exception()


class Conversations:
    def __init__(self, connect: dict[str, str | None], long_poll: float, sse_lifetime: float, stop: asyncio.Event) -> None:
        self._connect = connect
        self.long_poll = long_poll
        self.sse_lifetime = sse_lifetime
        self.stop = stop

    def _chat(self, name: str) -> AsyncChatHistory:
        rest = name[len(CHAT_PREFIX) :]
        namespace, sep, session = rest.partition("/")
        if not sep or not session:
            raise ProtocolError(404, "a conversation is at /v1/stream/chat/<namespace>/<session>")
        # ``name`` is already percent-decoded (once): decoding again would let 'a%41' read 'aA'
        return AsyncChatHistory(session, namespace=namespace, timeout=NATS_TIMEOUT, **self._connect)  # type: ignore[arg-type]

    async def __call__(self, request: Request, name: str) -> Response:
        method = request.method
        if method == "OPTIONS":
            return Response(b"", 204, PREFLIGHT)
        if method not in ("GET", "HEAD"):
            return respond(405, b"conversations are read-only here", {"content-type": "text/plain", "allow": "GET, HEAD, OPTIONS"})
        try:
            chat = self._chat(name)
        except (ProtocolError, errors.BotWireError) as exc:
            return error_response(exc, head=method == "HEAD")
        streaming = False
        try:
            if method == "HEAD":
                tail = await self._tail(chat)
                return respond(200, b"", {"content-type": _JSON, "Stream-Next-Offset": format_offset(tail), "cache-control": "no-store"})
            response = await self._get(request, name, chat)
            streaming = isinstance(response, StreamingResponse)
            return response
        except (ProtocolError, errors.BotWireError) as exc:
            return error_response(exc, head=method == "HEAD")
        finally:
            if not streaming:
                await chat.close()

    @staticmethod
    async def _tail(chat: AsyncChatHistory) -> int:
        last = await chat.entries(last=1)
        return last[-1].seq if last else 0

    async def _get(self, request: Request, name: str, chat: AsyncChatHistory) -> Response:
        q = request.query_params
        offsets = q.getlist("offset")
        if len(offsets) > 1 or (offsets and offsets[0] == ""):
            raise ProtocolError(400, "give one offset")
        offset = offsets[0] if offsets else "-1"
        live = q.get("live")
        if live in ("long-poll", "sse") and not offsets:
            raise ProtocolError(400, f"live={live} needs an offset")
        after = await self._tail(chat) if offset == NOW else parse_offset(offset)
        cursor = q.get("cursor")
        if live == "sse":
            return StreamingResponse(
                self._events(chat, after, cursor),
                200,
                {**COMMON, "content-type": "text/event-stream", "cache-control": "no-cache"},
            )
        entries = [] if offset == NOW and live != "long-poll" else await chat.entries(after=after or None)
        out = {"content-type": _JSON, "Stream-Up-To-Date": "true"}
        if live == "long-poll":
            out["Stream-Cursor"] = next_cursor(cursor)
            if not entries:
                entries = await self._wait(chat, after, self.long_poll)
                if not entries:
                    return respond(204, b"", {**out, "Stream-Next-Offset": format_offset(after)})
        # Nothing read: the reader stays where it asked. (It was the tail, read again here: a
        # message appended between the two reads was then behind the offset handed out and never
        # delivered; the chat page, which reads a new conversation as it posts the first question,
        # missed that question and its answer's stream in 9 of 200 tries.)
        end = entries[-1].seq if entries else after
        out["Stream-Next-Offset"] = format_offset(end)
        if offset == NOW:
            out["cache-control"] = "no-store"
        else:
            tag = f'"{base64.b64encode(name.encode()).decode()}:{offset}:{format_offset(end)}"'
            out["etag"] = tag
            if request.headers.get("if-none-match") == tag:
                return respond(304, b"", {"etag": tag})
        return respond(200, _body(entries), out)

    async def _wait(self, chat: AsyncChatHistory, after: int, timeout: float) -> list[Entry]:
        """The entries after ``after`` once there is one, or [] at ``timeout`` or shutdown."""
        # after=0 (an empty conversation) must not mean "from now": a first message appended
        # between the caller's read and this watch's start would wait out the whole long-poll
        watch = chat.watch(after)
        try:
            await watch.start()
            first = asyncio.ensure_future(watch.__anext__())
            # a read cancelled as the watch closes ends with StopAsyncIteration, not CancelledError:
            # retrieved here, else asyncio logged "Task exception was never retrieved" with a
            # traceback for many long-polls that timed out or were ended by a shutdown
            first.add_done_callback(_retrieve)
            stop = asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait([first, stop], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                if not first.done():
                    first.cancel()
            if first.done() and not first.cancelled() and first.exception() is None:
                return [first.result()] + await chat.entries(after=first.result().seq)
            return []
        finally:
            await watch.aclose()

    async def _events(self, chat: AsyncChatHistory, after: int, cursor: str | None) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.sse_lifetime
        try:
            entries = await chat.entries(after=after or None)
            while True:
                data = b""
                if entries:
                    after = entries[-1].seq
                    data = sse.data_event(_body(entries), base64_encoded=False)
                yield data + sse.control(format_offset(after), cursor=next_cursor(cursor), up_to_date=True)
                if self.stop.is_set() or loop.time() >= end:
                    return
                entries = await self._wait(chat, after, min(15.0, self.long_poll, end - loop.time()))
        finally:
            await chat.close()

