"""Live subscriptions shared by ``AsyncMemory.watch`` and ``AsyncChatHistory.watch``.

An ordered JetStream consumer delivers new messages in order; ``aclose`` also wakes a reader
that is blocked waiting (from the sync face's thread, say), which then stops iterating.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import nats.errors
from nats.aio.msg import Msg

from .transport import Connection

T = TypeVar("T")


class LiveIterator(ABC, Generic[T]):
    """An async iterator over a JetStream subscription; close it when done."""

    def __init__(self, connect: Callable[[], Awaitable[Connection]]) -> None:
        self._connect = connect
        self._conn: Connection | None = None
        self._sub: Any = None
        self._waiting: asyncio.Task[Any] | None = None
        self._closed = False

    @abstractmethod
    async def _subscribe(self, conn: Connection) -> Any:
        """Create the subscription (a nats-py JetStream push subscription)."""

    @abstractmethod
    async def _convert(self, conn: Connection, msg: Msg) -> T | None:
        """The item for ``msg``, or None to skip it."""

    async def start(self) -> LiveIterator[T]:
        """Subscribe now: what is written after this returns is delivered."""
        if self._sub is None and not self._closed:
            conn = await self._connect()
            self._sub = await conn.call(lambda: self._subscribe(conn))
            self._conn = conn
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
                msg = await sub.next_msg(timeout=None)
            except asyncio.CancelledError:
                if self._closed:
                    break
                raise
            except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
                break
            finally:
                self._waiting = None
            item = await self._convert(conn, msg)
            if item is not None:
                return item
        raise StopAsyncIteration

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

    async def __aenter__(self) -> LiveIterator[T]:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
