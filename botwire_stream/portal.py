"""The event loop behind every sync face: one asyncio loop per process, run by whoever needs it.

Sync objects (``Memory``, ``ChatHistory``) call their async core on this loop, so they work from
plain scripts, from many threads, and from inside a running event loop (the calling loop blocks
for the call, as any sync I/O does). Connections opened by sync objects live on this loop and
are shared between them.

Who runs the loop: a thread that calls with no event loop of its own running takes the loop and
runs it itself for the call (``run_until_complete``), so a call costs no thread hand-off: handing
each call to a loop thread and back cost two thread wake-ups, 1.6-1.9x the async core's p50 for a
``get`` (measured in ``benchmarks``, ``kv-latency``; a leaner hand-off saved nothing measurable).
While one thread runs it, calls from other threads (and from threads with a running loop of their
own) are handed to it and wait; when it returns, one of them takes over. When no call has run for
``_IDLE`` seconds, the daemon thread ``botwire-stream`` runs the loop until the next call, so that
watches keep receiving, pings are answered and background work (a server restart) goes on between
calls; the next call stops it and then runs the loop itself.

Ctrl-C while the main thread runs the loop cancels that call (as ``asyncio.run`` does) instead of
interrupting whatever the loop was doing. At interpreter exit every task is cancelled and the
loop is closed with bounded waits, so that a call still pending (a sync ``watch`` blocked in
another thread, say) can never hang the exit.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's enum wrappers cost ~10 µs a call (cProfile)
import asyncio
import atexit
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, TypeVarTuple, Unpack

from .errors import Closed, WrongEventLoop

__all__ = ["call", "get_portal", "started"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_EXIT_WAIT = 2.0  # seconds the exit waits for the loop to stop
# How long the loop must have been free before the background thread runs it. Between calls of a
# busy caller the loop is free for microseconds; taken by the background thread, the next call
# pays the old hand-off once. 10 ms keeps that rare and delays background work by at most that.
_IDLE = 0.01
_cond = threading.Condition(threading.Lock())  # guards the state below
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None  # the background thread
_runner: int | None = None  # ident of the thread running the loop now (None: nobody)
_released = 0.0  # time.monotonic() when the loop was last released
_waiting = 0  # calls waiting for another thread to run them (from threads with a loop of their own)
_handing = 0  # calls waiting in _hand_over: a release wakes them (and only then notifies)
_wake = threading.Event()  # wakes the background thread before its next look (exit, _waiting)
_exiting = False  # set at interpreter exit: no new loop may start then
_handed: set[asyncio.Task[Any]] = set()  # tasks of calls handed to the loop's runner (loop thread only)


def get_portal() -> asyncio.AbstractEventLoop:
    """The process's loop (and its background thread), started on first use."""
    global _loop, _thread
    loop = _loop
    if loop is not None:
        return loop
    with _cond:
        if _exiting:
            raise Closed("botwire-stream's event loop has stopped: the interpreter is exiting")
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=_background, args=(loop,), name="botwire-stream", daemon=True)
            _loop, _thread = loop, thread
            thread.start()
        return _loop


def started() -> bool:
    """Whether the loop exists already."""
    return _loop is not None


def _take(me: int) -> bool:
    """Become the loop's runner if nobody is (``_cond`` held)."""
    global _runner
    if _runner is None:
        _runner = me
        return True
    return False


def _release() -> None:
    global _runner, _released
    with _cond:
        _runner = None
        _released = time.monotonic()
        if _handing:
            _cond.notify_all()  # a waiting caller takes over (or learns its call is done)
        if _waiting:
            _wake.set()  # calls from threads with a loop of their own: the background thread runs them


def _background(loop: asyncio.AbstractEventLoop) -> None:
    """Run the loop whenever it has been free for ``_IDLE`` seconds, until a call stops it."""
    me = threading.get_ident()
    while True:
        # It polls rather than being notified at each release: waking it on every call cost
        # more than the hand-off it saves (measured, kv-latency); a poll costs ~100 wake-ups/s
        # while calls run, none while it runs the loop.
        while True:
            with _cond:
                if _exiting or _loop is not loop:
                    return
                idle = time.monotonic() - _released
                if _runner is None and (idle >= _IDLE or _waiting):
                    _take(me)
                    break
            _wake.wait(_IDLE - idle if _runner is None else 10 * _IDLE)
            _wake.clear()
        try:
            loop.run_forever()
        except BaseException:  # noqa: BLE001 - SystemExit out of a call's task: that call has it
            pass  # the thread must live on, or calls from threads with their own loop would wait forever
        finally:
            _release()


def _stop_background() -> None:
    # Scheduled by a caller that found the background thread running the loop; runs on the loop.
    if _thread is not None and threading.get_ident() == _thread.ident and _loop is not None:
        _loop.stop()


def _exiting_error() -> Closed:
    return Closed("botwire-stream's event loop stopped: the interpreter is exiting")


class _Guard:
    """Ctrl-C while the main thread makes a call: as ``asyncio.Runner``, the first one cancels the
    call (the core undoes what it must) instead of interrupting whatever the loop runs, and makes
    the call raise ``KeyboardInterrupt``; a second one raises at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] | None = None
        self.hit = False

    def watch(self, future: asyncio.Future[Any]) -> None:
        self.future = future
        if self.hit:
            self.loop.call_soon_threadsafe(future.cancel)

    def __call__(self, signum: int, frame: object) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        if self.future is not None:
            self.loop.call_soon_threadsafe(self.future.cancel)


def call(fn: Callable[[Unpack[Ts]], Awaitable[T]], *args: Unpack[Ts]) -> T:
    """Run the coroutine function ``fn(*args)`` on the process's loop and return its result."""
    loop = _loop or get_portal()
    own = asyncio._get_running_loop()  # None when no loop runs in this thread (no exception raised)
    if own is loop:
        # e.g. a sync Memory method called from the function given to Memory.update
        raise WrongEventLoop(
            "a sync botwire-stream method was called from botwire-stream's own event loop thread "
            "(inside a function passed to update()?); it would wait for itself forever"
        )
    guard, old = None, None
    if (
        own is None
        and threading.current_thread() is threading.main_thread()
        and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
    ):
        guard = _Guard(loop)
        old = _signal.signal(_signal.SIGINT, guard)
    try:
        return _call(loop, own is None, guard, fn, args)
    except asyncio.CancelledError:
        if guard is not None and guard.hit:
            raise KeyboardInterrupt from None
        if _exiting:
            raise _exiting_error() from None
        raise
    finally:
        if old is not None:
            _signal.signal(_signal.SIGINT, old)


async def _await(fn: Callable[[Unpack[Ts]], Awaitable[T]], *args: Unpack[Ts]) -> T:
    return await fn(*args)


def _call(
    loop: asyncio.AbstractEventLoop,
    may_run: bool,
    guard: _Guard | None,
    fn: Callable[[Unpack[Ts]], Awaitable[T]],
    args: tuple[Unpack[Ts]],
) -> T:
    me = threading.get_ident()
    if may_run:
        with _cond:
            mine = _take(me)
        if mine:
            try:
                task = loop.create_task(_await(fn, *args))
                if guard is not None:
                    guard.watch(task)
                return _run(loop, task)
            finally:
                _release()
    return _hand_over(loop, me, may_run, guard, fn, args)


def _run(loop: asyncio.AbstractEventLoop, future: asyncio.Future[T]) -> T:
    """Run the loop in this thread (the runner) until ``future`` is done.

    A task that ends with ``SystemExit``/``KeyboardInterrupt`` (update's fn raised it) breaks out
    of whichever thread runs the loop; when that task is another thread's call, its caller gets
    the exception (``_handed``) and this thread's call goes on (tests/test_qa_portal.py)."""
    try:
        while True:
            try:
                return loop.run_until_complete(future)
            except (KeyboardInterrupt, SystemExit) as exc:
                if future.done() or not any(t.done() and not t.cancelled() and t.exception() is exc for t in _handed):
                    raise
    finally:
        if not future.done():  # left by an exception out of the loop itself: do not leave it running
            future.cancel()


def _hand_over(
    loop: asyncio.AbstractEventLoop,
    me: int,
    may_run: bool,
    guard: _Guard | None,
    fn: Callable[[Unpack[Ts]], Awaitable[T]],
    args: tuple[Unpack[Ts]],
) -> T:
    """The loop is run by another thread (or this thread runs a loop of its own): schedule the
    call there and wait; take the loop over if it is released before the call is done."""
    global _waiting, _handing
    done: asyncio.Future[T] = loop.create_future()  # only created here; completed on the loop

    def start() -> None:
        if done.done():  # cancelled before it started
            return
        task = loop.create_task(_await(fn, *args))
        _handed.add(task)

        def finish(t: asyncio.Task[T]) -> None:
            _handed.discard(t)
            if not done.done():
                if t.cancelled():
                    done.cancel()
                elif (exc := t.exception()) is not None:
                    done.set_exception(exc)
                else:
                    done.set_result(t.result())

        task.add_done_callback(finish)
        done.add_done_callback(lambda d: task.cancel() if d.cancelled() and not task.done() else None)

    def wake_waiters(_: asyncio.Future[T]) -> None:
        with _cond:
            _cond.notify_all()

    done.add_done_callback(wake_waiters)
    loop.call_soon_threadsafe(start)
    if guard is not None:
        guard.watch(done)
    stop_asked = False
    try:
        with _cond:
            _handing += 1
            if not may_run:
                _waiting += 1  # the background thread runs the loop for this call at once
                _wake.set()
            try:
                while not done.done():
                    if may_run and _take(me):
                        break
                    if may_run and not stop_asked and _thread is not None and _runner == _thread.ident:
                        stop_asked = True  # the background thread has it: stop it, then run it here
                        loop.call_soon_threadsafe(_stop_background)
                    _cond.wait()
                else:
                    return _result(done)
            finally:
                _handing -= 1
                if not may_run:
                    _waiting -= 1
    except BaseException:
        loop.call_soon_threadsafe(done.cancel)  # Ctrl-C while waiting (off the main thread's guard)
        raise
    try:
        # Through a task: run_until_complete(done) would never return if done ended with
        # SystemExit/KeyboardInterrupt (asyncio expects those to have broken out of the loop already).
        return _run(loop, loop.create_task(_wait(done)))
    finally:
        _release()


async def _wait(done: asyncio.Future[T]) -> T:
    return await done


def _result(done: asyncio.Future[T]) -> T:
    if done.cancelled():
        if _exiting:
            raise _exiting_error()
        raise asyncio.CancelledError
    return done.result()


async def _close(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=_EXIT_WAIT)
    await asyncio.wait_for(loop.shutdown_asyncgens(), _EXIT_WAIT)  # closes the pools' connections


def _shutdown() -> None:
    """Stop the loop at exit: cancel what is still pending, wait a bounded time, never hang."""
    global _exiting, _loop, _thread
    with _cond:
        _exiting = True
        loop, thread = _loop, _thread
        _cond.notify_all()
    _wake.set()
    if loop is None or loop.is_closed():
        return
    me = threading.get_ident()
    deadline = time.monotonic() + _EXIT_WAIT
    with _cond:
        while not _take(me):  # a watch blocked in another thread runs it: cancel everything there
            loop.call_soon_threadsafe(_cancel_all, loop)
            if thread is not None and _runner == thread.ident:
                loop.call_soon_threadsafe(loop.stop)
            left = deadline - time.monotonic()
            if left <= 0:
                return  # still held: leave it to the interpreter
            _cond.wait(min(left, 0.1))
    try:
        loop.run_until_complete(asyncio.wait_for(_close(loop), _EXIT_WAIT))
        loop.close()
    except BaseException:  # noqa: BLE001 - interpreter exit: best effort
        pass
    finally:
        with _cond:
            _loop, _thread = None, None
        _release()
    if thread is not None:
        thread.join(_EXIT_WAIT)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    for t in asyncio.all_tasks(loop):
        t.cancel()


def _after_fork_in_child() -> None:
    # Neither the background thread nor a runner exists in a forked child, and the lock may have
    # been held at the fork: start afresh on next use (the parent's loop is left alone).
    global _loop, _thread, _runner, _cond, _wake, _waiting, _handing, _handed
    _loop, _thread, _runner, _waiting, _handing, _handed = None, None, None, 0, 0, set()
    _cond, _wake = threading.Condition(threading.Lock()), threading.Event()


atexit.register(_shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
