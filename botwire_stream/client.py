"""What ``AsyncMemory`` and ``AsyncChatHistory`` share: a lazily acquired shared connection on
which their streams are made sure to exist, and the open/close/``async with`` lifecycle."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

from nats.js.api import StreamConfig

from .errors import BotWireError
from .settings import ConnectOptions
from .transport import Connection, acquire, release


async def open_with_streams(opts: ConnectOptions, configs: list[StreamConfig]) -> Connection:
    """The shared connection for ``opts``, with each stream made sure to exist (released on error)."""
    conn = await acquire(opts)
    try:
        for config in configs:
            await conn.ensure_stream(config)
    except BaseException:
        await release(conn)
        raise
    return conn


class StreamClient(ABC):
    """Base of the async cores. A client belongs to the event loop that first uses it."""

    def __init__(self, opts: ConnectOptions) -> None:
        self._opts = opts
        self._conn: Connection | None = None
        self._opening: asyncio.Lock | None = None
        self._closed = False

    @abstractmethod
    def _streams(self) -> list[StreamConfig]:
        """The streams this client writes to, created on first use when missing."""

    async def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None:
            return conn
        if self._closed:
            raise BotWireError(f"{self!r} is closed")
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._conn is None:
                self._conn = await open_with_streams(self._opts, self._streams())
        assert self._conn is not None
        return self._conn

    async def open(self) -> Self:
        """Connect and make sure the streams exist (the first call does it anyway)."""
        await self._connection()
        return self

    async def close(self) -> None:
        """Release the connection (a shared connection closes with its last user)."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await release(conn)

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
