"""The NATS side of a watch: an ordered JetStream consumer that resumes after reconnects
(``_backend.Feed``, behind both ``AsyncMemory.watch`` and ``AsyncChatHistory.watch``).

An ordered JetStream consumer delivers new messages in order. The iterator remembers the stream
sequence after the last message it received; when the connection is lost or replaced (a server
restart, the embedded server restarted on another port) it subscribes again from there, so a
watch neither skips nor repeats a message. When no connection comes back within three times the
owner's timeout it raises ``ServerUnavailable`` rather than blocking or ending silently.
``aclose`` also wakes a reader that is blocked waiting (from the sync face's thread, say), which
then stops iterating.
"""

from __future__ import annotations

import asyncio
import itertools
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

import nats.errors
from nats.aio.msg import Msg

from ..errors import BotWireError, Closed, ServerUnavailable
from .errors import translate
from .jetstream import Connection

__all__ = ["ResumingFeed"]

T = TypeVar("T")

# How often a waiting watch checks its connection (a lost one is noticed within this).
_CHECK_EVERY = 0.5
# Messages received but not yet taken from the subscription beyond which a feed is behind
# (nats-py drops messages past 512Ki: a "slow consumer"); its reader is then not coherent.
_BEHIND = 1000
_SUBSCRIPTIONS = itertools.count(1)  # a token per subscription, unique in the process


class ResumingFeed(ABC, Generic[T]):
    """An async iterator over a JetStream subscription that resumes after reconnects."""

    def __init__(self, conn: Connection, stream: str, timeout: float) -> None:
        self._connect_to = conn
        self._stream = stream
        self._timeout = timeout
        self._grace = 3 * timeout
        self._conn: Connection | None = None
        self._sub: Any = None
        self._gen: tuple[int, int] | None = None
        self._next_seq: int | None = None  # the stream sequence to (re)start from
        self._waiting: asyncio.Task[Any] | None = None
        self._closed = False
        self._alive = 0.0  # when the server last answered or delivered (loop time)
        self._subscription = 0  # the current subscription's token for ``coherent``

    @abstractmethod
    async def _subscribe(self, conn: Connection, start_seq: int) -> Any:
        """Create the subscription from ``start_seq`` (a nats-py JetStream push subscription)."""

    @abstractmethod
    async def _convert(self, conn: Connection, msg: Msg) -> T | None:
        """The item for ``msg``, or None to skip it."""

    def _first_seq(self) -> int | None:
        """Where to start (None: after the stream's last message, when the watch starts)."""
        return None

    async def start(self) -> ResumingFeed[T]:
        """Subscribe now: what is written after this returns is delivered."""
        if self._sub is None and not self._closed:
            conn = self._connect_to
            if self._next_seq is None:
                self._next_seq = self._first_seq()
            if self._next_seq is None:
                info = await conn.call(lambda: conn.js.stream_info(self._stream), timeout=self._timeout)
                self._next_seq = info.state.last_seq + 1
            start = self._next_seq
            self._gen = conn.generation()
            self._sub = await conn.call(lambda: self._subscribe(conn, start), timeout=self._timeout)
            self._conn = conn
            self._subscription = next(_SUBSCRIPTIONS)
            self._alive = asyncio.get_running_loop().time()
        return self

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        if self._sub is None:
            await self.start()
        while not self._closed:
            sub, conn = self._sub, self._conn
            assert conn is not None
            self._waiting = asyncio.current_task()
            try:
                if sub is None or conn.generation() != self._gen or not conn.nc.is_connected:
                    await self._resume(conn)
                    continue
                msg = await sub.next_msg(timeout=_CHECK_EVERY)
            except nats.errors.TimeoutError:
                try:
                    await self._check_alive(conn)
                except asyncio.CancelledError:
                    if self._closed:
                        break
                    raise
                continue
            except asyncio.CancelledError:
                if self._closed:
                    break
                raise
            except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
                if self._closed:
                    break
                self._gen = None  # resume on the next turn
                continue
            finally:
                self._waiting = None
            self._alive = asyncio.get_running_loop().time()
            if msg.reply and msg.reply.startswith("$JS.ACK."):
                self._next_seq = msg.metadata.sequence.stream + 1
            item = await self._convert(conn, msg)
            if item is not None:
                return item
        raise StopAsyncIteration

    def coherent(self) -> object | None:
        """``_backend.ChangeFeed.coherent``: a token while subscribed on the live connection and
        not behind; after a reconnect or a restart the feed subscribes again, with a new token."""
        sub, conn = self._sub, self._conn
        if (
            sub is None
            or conn is None
            or self._closed
            or not conn.nc.is_connected
            or conn.generation() != self._gen
            or sub.pending_msgs > _BEHIND
        ):
            return None
        return self._subscription

    async def _check_alive(self, conn: Connection) -> None:
        """After ``timeout`` seconds with nothing delivered, ask the server something (one small
        request). A stopped server (SIGSTOP, a frozen VM) keeps its connection open, and nats-py
        would notice only by its pings, minutes later: meanwhile the watch would block for good.
        An embedded server that does not greet a new connection is restarted (the watch then
        resumes); any other server silent for 3 x the timeout raises ``ServerUnavailable``."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._alive < self._timeout or not conn.nc.is_connected:
            return
        try:
            await conn.request("$JS.API.INFO", b"", None, self._timeout)
            self._alive = loop.time()
            return
        except (nats.errors.Error, asyncio.TimeoutError, OSError):
            pass
        if conn.restart is not None and await conn.restart.hung():
            await asyncio.wait_for(conn.recover(), self._grace)  # replaced: the next turn resumes
            self._gen = None
            self._alive = loop.time()
        elif loop.time() - self._alive > self._grace:
            raise ServerUnavailable(
                f"the server has not answered the watch for {self._grace:g} s (3 x the timeout); "
                "start a new watch with the last sequence you received"
            )

    async def _resume(self, conn: Connection) -> None:
        """Subscribe again from the last delivered sequence once the connection is back."""
        old, self._sub = self._sub, None
        if old is not None:
            try:
                await old.unsubscribe()
            except Exception:  # noqa: BLE001 - the old connection may be gone
                pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace
        last: BaseException | None = None
        while not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                detail = f" ({translate(last)})" if last is not None else ""
                raise ServerUnavailable(
                    f"the watch lost its connection and could not resume within {self._grace:g} s{detail}; "
                    "start a new watch with the last sequence you received"
                )
            if conn.nc.is_closed and conn.refs <= 0:
                raise Closed(
                    "the watch's connection was closed with its Memory/ChatHistory; close the watch first"
                )
            try:
                if not conn.nc.is_connected:
                    if conn.restart is None:  # nats-py reconnects by itself
                        await asyncio.sleep(min(0.05, remaining))
                        continue
                    await asyncio.wait_for(conn.recover(), remaining)  # restart the embedded server
                self._gen = conn.generation()
                assert self._next_seq is not None
                self._sub = await asyncio.wait_for(self._subscribe(conn, self._next_seq), remaining)
                self._subscription = next(_SUBSCRIPTIONS)
                return
            except (BotWireError, nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
                if isinstance(exc, BotWireError) and not isinstance(exc, ServerUnavailable):
                    raise
                last = exc
                await asyncio.sleep(min(0.1, max(deadline - loop.time(), 0)))

    async def aclose(self) -> None:
        """Stop the subscription; a reader blocked in ``__anext__`` stops iterating."""
        self._closed = True
        sub, self._sub = self._sub, None
        waiting = self._waiting
        if waiting is not None and waiting is not asyncio.current_task():
            waiting.cancel()
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass

