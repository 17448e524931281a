"""The blocking portal behind every sync face: one event loop thread per process.

Sync objects (``Memory``, ``ChatHistory``) call their async core through it, so they work from
plain scripts, from many threads, and from inside a running event loop (the calling loop blocks
for the call, as any sync I/O does). Connections opened by sync objects live on this loop and
are shared between them.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TypeVar, TypeVarTuple, Unpack

from anyio.from_thread import BlockingPortal, start_blocking_portal

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_lock = threading.Lock()
_portal: BlockingPortal | None = None
_cm: AbstractContextManager[BlockingPortal] | None = None
_loop: asyncio.AbstractEventLoop | None = None
_exiting = False  # set at interpreter exit: no new portal may start then


def get_portal() -> BlockingPortal:
    """The process's portal, started on first use."""
    global _portal, _cm, _loop
    portal = _portal
    if portal is not None:
        return portal
    with _lock:
        if _exiting:
            raise RuntimeError("botwire-stream's event loop thread has stopped: the interpreter is exiting")
        if _portal is None:
            _cm = start_blocking_portal("asyncio", name="botwire-stream")
            portal = _cm.__enter__()
            _loop = portal.call(_running_loop)
            _portal = portal
        return _portal


async def _await(fn: Callable[[Unpack[Ts]], Awaitable[T]], *args: Unpack[Ts]) -> T:
    return await fn(*args)


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def started() -> bool:
    """Whether the portal's loop runs already."""
    return _loop is not None


def call(fn: Callable[[Unpack[Ts]], Awaitable[T]], *args: Unpack[Ts]) -> T:
    """Run the coroutine function ``fn(*args)`` on the portal's loop and return its result.

    Hot calls go straight to the portal's asyncio loop: ``run_coroutine_threadsafe`` costs about
    a third of ``BlockingPortal.call`` per round trip (measured in ``benchmarks``).
    """
    if _loop is None:
        get_portal()
    assert _loop is not None
    future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(_await(fn, *args), _loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


def _shutdown() -> None:
    global _portal, _cm, _loop, _exiting
    with _lock:
        _exiting = True
        cm, _cm, _portal, _loop = _cm, None, None, None
    if cm is not None:
        try:
            cm.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _after_fork_in_child() -> None:
    # The portal thread does not exist in a forked child: start a fresh one on next use.
    global _portal, _cm, _loop
    _portal, _cm, _loop = None, None, None


atexit.register(_shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
