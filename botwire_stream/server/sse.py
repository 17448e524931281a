"""Server-sent events: for Durable Streams one ``data`` event per append, each followed by a
``control`` event; for the REST API's live feeds (keys, conversations) the response body loop."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec

__all__ = ["control", "data_event", "live_events"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

_LINES = re.compile(r"\r\n|\r|\n")


def _event(kind: str, payload: str) -> bytes:
    # Every line of the payload gets its own data: line, so no payload can inject an event:
    # line (a lone \r ends a line for SSE parsers too). No space after "data:": a client strips
    # exactly one, which would eat a payload's own leading space.
    lines = "\n".join("data:" + line for line in _LINES.split(payload))
    return f"event: {kind}\n{lines}\n\n".encode()


def data_event(chunk: bytes, *, base64_encoded: bool) -> bytes:
    text = base64.b64encode(chunk).decode() if base64_encoded else chunk.decode("utf-8", "replace")
    return _event("data", text)


def control(next_offset: str, *, cursor: str | None = None, up_to_date: bool = False, closed: bool = False) -> bytes:
    body: dict[str, object] = {"streamNextOffset": next_offset}
    if closed:
        body["streamClosed"] = True
    else:
        if cursor is not None:
            body["streamCursor"] = cursor
        if up_to_date:
            body["upToDate"] = True
    return _event("control", msgspec.json.encode(body).decode())


class _Live(Protocol[T_co]):
    def __anext__(self) -> Awaitable[T_co]: ...
    async def aclose(self) -> None: ...


async def live_events(
    watch: _Live[T], encode: Callable[[T], bytes], *, stop: asyncio.Event, lifetime: float,
    closing: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[bytes]:
    """A REST live feed's SSE body: ``: live`` (the watch is subscribed), then ``encode(item)``
    per item of ``watch``, a ``: keep-alive`` comment after 15 s without one; it ends when
    ``stop`` is set (shutdown) or after ``lifetime`` seconds (the client reopens with
    ``Last-Event-ID``). ``watch``, then ``closing``, are closed however it ends."""
    loop = asyncio.get_running_loop()
    end = loop.time() + lifetime
    try:
        yield b": live\n\n"
        while not stop.is_set() and loop.time() < end:
            nxt = asyncio.ensure_future(watch.__anext__())
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait([nxt, stopped], timeout=min(15.0, end - loop.time()), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            if not nxt.done():
                nxt.cancel()
                yield b": keep-alive\n\n"
                continue
            yield encode(nxt.result())
    finally:
        await watch.aclose()
        if closing is not None:
            await closing()
