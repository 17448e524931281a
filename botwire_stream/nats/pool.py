"""Opening a ``Connection`` (with the embedded server's restart hook when it is the embedded
server), and one shared ``Connection`` per event loop and connection settings, reference counted,
and closed with its loop."""

from __future__ import annotations

import asyncio
import socket
import weakref
from collections.abc import AsyncGenerator
from pathlib import Path

from ..errors import ServerNotTrusted, ServerUnavailable
from ..settings import ConnectOptions
from . import embedded
from .connect import _connect, _connect_embedded
from .jetstream import Connection
from .restart import EmbeddedRestart

__all__ = ["acquire", "open_connection", "release"]


async def open_connection(opts: ConnectOptions) -> Connection:
    """A new ``Connection`` for ``opts``; to the embedded server (started if needed), with the
    hook that restarts it."""
    if not opts.embedded:
        assert opts.servers is not None
        nc = await _connect(
            list(opts.servers),
            token=opts.token,
            user=opts.user,
            password=opts.password,
            creds=opts.creds,
            backoff=True,
            ping_interval=opts.ping_interval,
        )
        return Connection(opts, nc, None)
    home = Path(opts.home) if opts.home else embedded.home_dir()
    state, _token = await asyncio.to_thread(embedded.ensure, home)
    try:
        nc = await _connect_embedded(state, timeout=1.0)
    except ServerNotTrusted:
        # Our server (ensure checked its pid and port) shows another certificate than cert.pem:
        # the pair was replaced while it ran. Restart it with the pair on disk, once.
        state = await asyncio.to_thread(embedded.restart, home, state.pid)
        nc = await _connect_embedded(state)
    except ServerUnavailable:  # it died between the check and the connect: start it again
        state, _token = await asyncio.to_thread(embedded.ensure, home, verify=True)
        nc = await _connect_embedded(state)
    return Connection(opts, nc, EmbeddedRestart(home))

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[ConnectOptions, Connection]] = (
    weakref.WeakKeyDictionary()
)
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
_closers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncGenerator[None, None]] = (
    weakref.WeakKeyDictionary()
)


async def _close_at_shutdown(
    loop: asyncio.AbstractEventLoop, pool: dict[ConnectOptions, Connection]
) -> AsyncGenerator[None, None]:
    """Suspended for the life of its loop; closes the loop's pool when the loop shuts down.

    A connection references its loop, so the weak pool alone never lets a finished loop go: with
    ``asyncio.run`` per request and objects left open, each run leaked one socket (30 runs, 30
    sockets; ``gc.collect()`` freed none). An event loop closes the async generators it started
    before it closes (``asyncio.run`` calls ``shutdown_asyncgens``), which runs this ``finally``.
    A loop closed without that is swept when the next loop opens its pool (``_sweep``).
    """
    try:
        yield
    finally:
        _pools.pop(loop, None)  # forget the loop, so it can be freed
        _locks.pop(loop, None)
        _closers.pop(loop, None)  # this generator keeps the loop's finalizer hook, hence the loop
        conns = list(pool.values())
        pool.clear()
        for conn in conns:
            conn.refs = 0
            if loop.is_closed():
                _shut(conn)
            else:
                await conn.close()


def _shut(conn: Connection) -> None:
    """Shut the socket of a connection whose loop closed under it: no coroutine can close it any
    more. The server drops the client at once; the descriptor goes with the garbage collected
    loop (nats-py keeps no public handle on its socket)."""
    writer = getattr(getattr(conn.nc, "_transport", None), "_io_writer", None)
    sock = writer.get_extra_info("socket") if isinstance(writer, asyncio.StreamWriter) else None
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone


def _sweep() -> None:
    """Close the pools of loops closed without ``shutdown_asyncgens`` (``run_until_complete`` then
    ``close()``): each such loop kept its socket open, 20 loops 20 sockets (measured)."""
    try:
        closed = [lp for lp in _closers if lp.is_closed()]
    except RuntimeError:  # another thread's loop changed the registry meanwhile: the next sweep
        return
    for loop in closed:
        closer = _closers.pop(loop, None)
        if closer is None:
            continue  # swept by another thread
        step = closer.aclose()  # its finally awaits nothing for a closed loop: one step
        try:
            step.send(None)
        except StopIteration:
            pass
        # nats-py's tasks (reader, flusher, pings, subscriptions) stay pending on the closed loop;
        # collected as they are, each logs "Task was destroyed but it is pending!" and a
        # RuntimeError: they are ended here, quietly. The application's own tasks are left alone.
        for task in asyncio.all_tasks(loop):
            coro = task.get_coro()
            frame = getattr(coro, "cr_frame", None)
            if frame is not None and str(frame.f_globals.get("__name__", "")).startswith("nats."):
                task._log_destroy_pending = False  # type: ignore[attr-defined]
                try:
                    coro.close()
                except Exception:  # noqa: BLE001 - its cleanup needed the closed loop
                    pass


async def _pool_of(loop: asyncio.AbstractEventLoop) -> dict[ConnectOptions, Connection]:
    pool = _pools.get(loop)
    if pool is None:
        _sweep()
        pool = _pools[loop] = {}
        closer = _close_at_shutdown(loop, pool)
        await closer.__anext__()  # started on this loop, so the loop closes it at shutdown
        _closers[loop] = closer  # a strong reference: collected, it would close the pool now
    return pool


async def acquire(opts: ConnectOptions) -> Connection:
    """The shared connection for ``opts`` on the running loop (opened on first use)."""
    loop = asyncio.get_running_loop()
    pool = await _pool_of(loop)
    conn = pool.get(opts)
    if conn is None or conn.nc.is_closed:
        lock = _locks.setdefault(loop, asyncio.Lock())
        async with lock:
            conn = pool.get(opts)
            if conn is None or conn.nc.is_closed:
                conn = await open_connection(opts)
                pool[opts] = conn
    conn.refs += 1
    return conn


async def release(conn: Connection) -> None:
    """Drop one reference; close the connection when nobody uses it any more."""
    conn.refs -= 1
    if conn.refs > 0:
        return
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop, {})
    if pool.get(conn.opts) is conn:
        del pool[conn.opts]
    await conn.close()

