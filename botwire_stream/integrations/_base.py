"""What every framework adapter needs: one async core per event loop, and their lifecycle.

An adapter (langchain today; crewai, autogen, langgraph, mcp next) wraps ``AsyncMemory`` or
``AsyncChatHistory``. A core caches its connection, and a connection belongs to the event loop
that opened it, while a framework calls an adapter from many loops (its own, ``asyncio.run`` per
request, and our sync portal's loop for its sync methods). So an adapter:

1. builds its cores through ``PerLoop(factory)`` (or ``memory_cores`` for an ``AsyncMemory``),
   calling the factory once in ``__init__`` so that bad arguments raise there, without connecting;
2. inherits ``LoopBound`` for ``close()`` (the portal's core), ``aclose()`` (the calling loop's)
   and ``with``/``async with``;
3. writes each method once, async, as ``await self._cores.get().method(...)``, and its sync twin
   as ``portal.call(self.amethod, ...)``;
4. uses ``map_bounded`` for multi-key operations (bounded concurrency, first error cancels).

Internal: the names here may change between versions.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Final, Generic, Protocol, TypeVar

from ..client import running_loop
from ..memory import AsyncMemory
from ..portal import call

__all__ = ["LoopBound", "PerLoop", "map_bounded", "memory_cores"]

T = TypeVar("T")
A = TypeVar("A")
_CONCURRENCY: Final = 32  # requests in flight at once for multi-key operations


class _Closeable(Protocol):
    async def close(self) -> None: ...


C = TypeVar("C", bound=_Closeable)


class PerLoop(Generic[C]):
    """One async core per event loop, made on first use on that loop.

    A core caches its connection, and a connection belongs to the loop that opened it, so a core
    must never be used from another loop. Cores of loops that are gone are dropped with them.
    """

    def __init__(self, factory: Callable[[], C]) -> None:
        self._factory = factory
        self._cores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, C] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self) -> C:
        """The core of the running loop."""
        loop = running_loop()
        core = self._cores.get(loop)
        if core is None:
            with self._lock:
                core = self._cores.get(loop)
                if core is None:
                    # A core references its loop, so the weak dict alone never forgets a finished
                    # loop (asyncio.run per request); the pool closed their connections already.
                    for done in [other for other in self._cores if other.is_closed()]:
                        del self._cores[done]
                    core = self._factory()
                    self._cores[loop] = core
        return core

    async def close(self) -> None:
        """Close the running loop's core (a later call opens a new one)."""
        with self._lock:
            core = self._cores.pop(running_loop(), None)
        if core is not None:
            await core.close()


def memory_cores(namespace: str, url: str | None, connect_options: dict[str, Any]) -> PerLoop[AsyncMemory]:
    """One ``AsyncMemory`` per event loop; the arguments are checked now, without connecting."""

    def make() -> AsyncMemory:
        return AsyncMemory(namespace, url=url, **connect_options)

    make()
    return PerLoop(make)


class LoopBound(Generic[C]):
    """``close``/``aclose`` and the context managers of the adapters, over a ``PerLoop``."""

    _cores: PerLoop[C]

    def close(self) -> None:
        """Release the connection used by the sync methods."""
        call(self._cores.close)

    async def aclose(self) -> None:
        """Release the connection used by the async methods on the calling event loop."""
        await self._cores.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def map_bounded(fn: Callable[[A], Awaitable[T]], items: Sequence[A], limit: int = _CONCURRENCY) -> list[T]:
    """``[await fn(x) for x in items]`` with up to ``limit`` in flight; the first error cancels the rest."""
    if len(items) <= 1:
        return [await fn(x) for x in items]
    sem = asyncio.Semaphore(limit)

    async def one(x: A) -> T:
        async with sem:
            return await fn(x)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(x)) for x in items]
    return [t.result() for t in tasks]
