"""What ``AsyncMemory`` and ``AsyncChatHistory`` share: a lazily opened backend (``_backend``:
its connection shared, its storage made sure to exist), the check that it is used from its own
event loop, and the open/close/``async with`` lifecycle."""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar

from .errors import Closed, InvalidArgument, WrongEventLoop
from .settings import ConnectOptions

__all__ = ["MAX_TIMEOUT", "StreamClient", "check_options", "check_timeout", "running_loop"]


class _Closable(Protocol):
    async def close(self) -> None: ...


B = TypeVar("B", bound=_Closable)

# The longest timeout=. A write is re-sent (with its message id) until its deadline, which is the
# timeout plus at most 4 s for 64 MiB; the streams' duplicate window (120 s) must still hold the
# first copy then, or a re-send would be stored twice and a read-back
# would miss it (``nats.jetstream.Connection._landed``).
MAX_TIMEOUT = 60.0


def check_timeout(timeout: object) -> float:
    """``timeout=`` as a float: a finite number of seconds in (0, ``MAX_TIMEOUT``], else ``InvalidArgument``."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgument(f"timeout must be a number of seconds, not {timeout!r}")
    seconds = float(timeout)
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT):
        raise InvalidArgument(
            f"timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds (within the server's 2-minute "
            f"duplicate window, so that a re-sent write is never stored twice), not {timeout!r}"
        )
    return seconds


def running_loop() -> asyncio.AbstractEventLoop:
    """The running asyncio loop; ``WrongEventLoop`` when there is none (trio, or a coroutine
    driven by hand), instead of asyncio's bare "no running event loop"."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise WrongEventLoop(
            "botwire-stream's async classes run on an asyncio event loop (asyncio.run, anyio's "
            "asyncio backend), and none is running here (trio?); from other async code, call the sync "
            "Memory/ChatHistory in a worker thread (e.g. trio.to_thread.run_sync)"
        ) from None


def check_options(replicas: object, timeout: object) -> tuple[int | None, float]:
    """``replicas`` (an int from 1 to 5, JetStream's range; None: chosen by the connection, 3 on
    a cluster and 1 on a single server, when a namespace is created) and ``timeout`` (positive, finite
    seconds, at most ``MAX_TIMEOUT``), or ``InvalidArgument`` when the object is made (else: a bare ``TypeError`` at the
    first call for ``timeout="5"``, a JSON error from the server for ``replicas=True``)."""
    if replicas is not None and (type(replicas) is not int or not 1 <= replicas <= 5):
        raise InvalidArgument(f"replicas must be an int from 1 to 5 or None (automatic), not {replicas!r}")
    return replicas, check_timeout(timeout)


class StreamClient(ABC, Generic[B]):
    """Base of the async cores, over a backend ``B``. A client belongs to the event loop that
    first uses it.

    Its connection's futures and reader task live on that loop; used from another loop, a call
    raises ``WrongEventLoop`` before sending anything (nats-py would write on the other loop's
    socket and then fail with "attached to a different loop", the write's fate unknown).
    """

    _timeout: float = 5.0  # each request's timeout (set by the subclass from its ``timeout=``)

    def __init__(self, opts: ConnectOptions) -> None:
        self._opts = opts
        self._conn_: B | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._closed = False

    @property
    def _conn(self) -> B | None:
        """The backend, when open and this is its loop (the fast path of every call)."""
        conn = self._conn_
        if conn is not None and self._loop is not running_loop():
            raise self._wrong_loop()
        return conn

    def _wrong_loop(self) -> WrongEventLoop:
        name = type(self).__name__
        sync = "Memory" if name == "AsyncMemory" else "ChatHistory"
        return WrongEventLoop(
            f"{self!r} belongs to the event loop that first used it and cannot be used from another one; "
            f"create one {name} per event loop (e.g. inside the coroutine given to asyncio.run), "
            f"or use {sync}, which works from any thread or loop"
        )

    @abstractmethod
    async def _open(self) -> B:
        """Open the backend (``_backend.open_memory``/``open_chat``): connected, storage ready."""

    async def _connection(self) -> B:
        conn = self._conn
        if conn is not None:
            return conn
        if self._closed:
            raise Closed(f"{self!r} is closed")
        loop = running_loop()
        if self._opening is None:
            self._opening, self._loop = asyncio.Lock(), loop
        elif self._loop is not loop:
            raise self._wrong_loop()  # still opening on its first loop
        async with self._opening:
            if self._conn_ is None:
                self._conn_ = await self._open()
        assert self._conn_ is not None
        return self._conn_

    async def open(self) -> Self:
        """Connect and make sure the storage exists (the first call does it anyway)."""
        await self._connection()
        return self

    async def close(self) -> None:
        """Release the connection (a shared connection closes with its last user)."""
        conn = self._conn_
        if conn is not None and self._loop is not running_loop():
            assert self._loop is not None
            if not self._loop.is_closed():
                raise self._wrong_loop()
            conn = None  # its loop is gone, and the connection with it: nothing to release
        self._closed = True
        self._conn_ = None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
