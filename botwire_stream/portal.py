"""The blocking portal behind every sync face: one event loop thread per process.

Sync objects (``Memory``, ``ChatHistory``) call their async core through it, so they work from
plain scripts, from many threads, and from inside a running event loop (the calling loop blocks
for the call, as any sync I/O does). Connections opened by sync objects live on this loop and
are shared between them.

The thread runs an anyio ``BlockingPortal`` on asyncio. It is a daemon thread that is stopped at
interpreter exit with bounded waits, so that a call still pending (a sync ``watch`` blocked in
another thread, say) can never hang the exit.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio
from anyio.from_thread import BlockingPortal

from .errors import Closed, WrongEventLoop

__all__ = ["call", "get_portal", "started"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_EXIT_WAIT = 2.0  # seconds the exit waits for the loop to stop
_lock = threading.Lock()
_portal: BlockingPortal | None = None
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_exiting = False  # set at interpreter exit: no new portal may start then


def _run(ready: concurrent.futures.Future[tuple[BlockingPortal, asyncio.AbstractEventLoop]]) -> None:
    async def main() -> None:
        async with BlockingPortal() as portal:
            ready.set_result((portal, asyncio.get_running_loop()))
            await portal.sleep_until_stopped()

    try:
        anyio.run(main, backend="asyncio")
    except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits for the start
        if not ready.done():
            ready.set_exception(exc)


def get_portal() -> BlockingPortal:
    """The process's portal, started on first use."""
    global _portal, _loop, _thread
    portal = _portal
    if portal is not None:
        return portal
    with _lock:
        if _exiting:
            raise Closed("botwire-stream's event loop thread has stopped: the interpreter is exiting")
        if _portal is None:
            ready: concurrent.futures.Future[tuple[BlockingPortal, asyncio.AbstractEventLoop]] = (
                concurrent.futures.Future()
            )
            thread = threading.Thread(target=_run, args=(ready,), name="botwire-stream", daemon=True)
            thread.start()
            _portal, _loop = ready.result()
            _thread = thread
        return _portal


def started() -> bool:
    """Whether the portal's loop runs already."""
    return _loop is not None


async def _await(fn: Callable[[Unpack[Ts]], Awaitable[T]], *args: Unpack[Ts]) -> T:
    return await fn(*args)


def call(fn: Callable[[Unpack[Ts]], Awaitable[T]], *args: Unpack[Ts]) -> T:
    """Run the coroutine function ``fn(*args)`` on the portal's loop and return its result.

    Hot calls go straight to the portal's asyncio loop: ``run_coroutine_threadsafe`` costs about
    a third of ``BlockingPortal.call`` per round trip (measured in ``benchmarks``).
    """
    if _loop is None:
        get_portal()
    assert _loop is not None
    if _thread is not None and threading.get_ident() == _thread.ident:
        # e.g. a sync Memory method called from the function given to Memory.update
        raise WrongEventLoop(
            "a sync botwire-stream method was called from botwire-stream's own event loop thread "
            "(inside a function passed to update()?); it would wait for itself forever"
        )
    future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(_await(fn, *args), _loop)
    try:
        return future.result()
    except concurrent.futures.CancelledError:
        if _exiting:
            raise Closed("botwire-stream's event loop thread stopped: the interpreter is exiting") from None
        raise
    except BaseException:
        future.cancel()
        raise


def _shutdown() -> None:
    """Stop the loop at exit: cancel what is still pending, wait a bounded time, never hang."""
    global _portal, _loop, _thread, _exiting
    with _lock:
        _exiting = True
        portal, loop, thread = _portal, _loop, _thread
        _portal, _loop, _thread = None, None, None
    if portal is None or loop is None or thread is None or not thread.is_alive():
        return
    try:
        stopping = asyncio.run_coroutine_threadsafe(portal.stop(cancel_remaining=True), loop)
        stopping.result(_EXIT_WAIT)
    except BaseException:  # noqa: BLE001 - interpreter exit: best effort
        pass
    thread.join(_EXIT_WAIT)


def _after_fork_in_child() -> None:
    # The portal thread does not exist in a forked child: start a fresh one on next use.
    global _portal, _loop, _thread
    _portal, _loop, _thread = None, None, None


atexit.register(_shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
