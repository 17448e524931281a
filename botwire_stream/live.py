"""Live subscriptions shared by ``AsyncMemory.watch`` and ``AsyncChatHistory.watch``.

The backend's ``Feed`` delivers stored records in order and resumes after reconnects, with no
gap and no repeat; it raises ``ServerUnavailable`` when the server stays away, never ending
silently. This iterator opens the feed on first use (``async with`` or ``start``: subscribed
when it returns), turns each record into what the user sees, and closes the feed; ``aclose``
also wakes a reader that is blocked waiting (from the sync face's thread, say), which then stops.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, Self, TypeVar

from ._backend import Feed

__all__ = ["LiveIterator"]

R = TypeVar("R")
T = TypeVar("T")


class LiveIterator(ABC, Generic[R, T]):
    """An async iterator of ``T`` over a backend feed of ``R``, opened on first use."""

    def __init__(self, open_feed: Callable[[], Awaitable[Feed[R]]]) -> None:
        self._open_feed = open_feed
        self._feed: Feed[R] | None = None
        self._closed = False

    @abstractmethod
    def _convert(self, record: R) -> T | None:
        """The item for ``record``, or None to skip it."""

    async def start(self) -> Self:
        """Subscribe now: what is written after this returns is delivered."""
        if self._feed is None and not self._closed:
            feed = await self._open_feed()
            if self._closed:  # closed while it opened
                await feed.aclose()
                return self
            self._feed = feed
        if self._feed is not None:
            await self._feed.start()
        return self

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        feed = self._feed
        if feed is None:
            await self.start()
            feed = self._feed
            if feed is None:
                raise StopAsyncIteration
        while True:
            record: R = await feed.__anext__()  # StopAsyncIteration once closed
            item = self._convert(record)
            if item is not None:
                return item

    async def aclose(self) -> None:
        """Stop the subscription; a reader blocked in ``__anext__`` stops iterating."""
        self._closed = True
        if self._feed is not None:
            await self._feed.aclose()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
