"""The NATS transport: shared connections, JetStream requests, and the raw APIs nats-py lacks.

One ``Connection`` per event loop and connection settings is shared by every ``AsyncMemory`` and
``AsyncChatHistory`` opened with them (reference counted). It adds what nats-py 2.16 does not
offer: batch and multi-last direct gets, atomic batch publishes, headers-only pulls, and one
shared reply inbox for requests. Every NATS failure leaves here translated by
``errors.translate``; with the embedded server, a dead or hung server is restarted and the call
retried, a full disk raises ``StorageFull``, and a server left unable to write by a full disk is
restarted once space is back.

Retries and outcomes: every call has one deadline, its ``timeout``, that covers its retries and
any restart of the embedded server. Every write carries a ``Nats-Msg-Id``, and a write is re-sent
only after the connection was lost or replaced, reusing its ids, so the server's duplicate window
drops a second copy. A conditional write or atomic batch re-sent after its first copy landed is
refused by the server (wrong last sequence, duplicate message id: the server checks those before
its duplicate window); the client then asks the duplicate window whether the write's message id
was stored (``_landed``). A write whose outcome is still unknown at the deadline raises
``OutcomeUnknown``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import ssl
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from . import embedded
from .errors import (
    BotWireError,
    InvalidArgument,
    OutcomeUnknown,
    QuotaExceeded,
    ServerNotTrusted,
    ServerUnavailable,
    StorageFull,
    Unauthorized,
    translate,
)
from .settings import ConnectOptions, redact

T = TypeVar("T")

ORIGIN = f"{socket.gethostname()}/{os.getpid()}"


def _reset_origin() -> None:
    global ORIGIN
    ORIGIN = f"{socket.gethostname()}/{os.getpid()}"


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_origin)
_RETRYABLE = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
    ConnectionError,
)


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Resend(nats.errors.ConnectionClosedError):
    """The connection was lost or replaced while a request waited: its reply will never come."""


class _Busy(nats.errors.NoRespondersError):
    """The server refused a publish for lack of room (nothing stored): send it again later."""


# API errors of a publish that mean nothing was stored and the same publish may be sent again:
# 10167 the stream's ingest queue is full (429), 10210 too many atomic batches in flight (429),
# 10176 an atomic batch lost a staged message (dropped by a full ingest queue) or timed out.
_BUSY_CODES = frozenset({10167, 10210, 10176})
_WRONG_LAST = 10071
_WRONG_LAST_MSG_ID = 10070
_DUPLICATE_IN_BATCH = 10201


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


def _raise_api_error(err: _ApiError) -> None:
    raise translate(
        nats.js.errors.APIError(code=err.code, err_code=err.err_code, description=err.description)
    )


def origin_headers() -> dict[str, str]:
    """Headers that say who wrote an event (host/pid), for replay and audit."""
    return {"Botwire-Origin": ORIGIN}


class SubjectPurged(BotWireError):
    """``read_subject(snapshot=True)``: the subject lost what was read so far (a purge, a rollup)
    while it was read; read it again."""


class Batch:
    """One batch direct get reply: its messages, how many more match, the last sequence sent,
    the snapshot sequence of a multi-last get (page on with ``up_to_seq``), and whether the
    server refused a multi-last get for matching too many subjects (413)."""

    __slots__ = ("msgs", "pending", "last_seq", "up_to_seq", "too_many")

    def __init__(self, msgs: list[Msg], pending: int, last_seq: int) -> None:
        self.msgs = msgs
        self.pending = pending
        self.last_seq = last_seq
        self.up_to_seq = 0
        self.too_many = False


HEADROOM = 16 * 1024  # room for headers under the server's max_payload
_SWEEP_EVERY = 0.25  # seconds between checks for requests that timed out
# The embedded server is checked when a request waits longer than this, and restarted when it does
# not greet a new connection within _GREETING_WAIT. Its accept loop answers in well under 1 ms even
# while it stores hundreds of MiB (a PING on the busy connection itself can wait seconds then), so a
# server silent for a second is stopped (SIGSTOP, a frozen VM) rather than busy.
_PROBE_AFTER = 1.0
_GREETING_WAIT = 1.0  # embedded._answers' timeout


class _Write:
    """What a write is, for its ``OutcomeUnknown`` message; whether the current try reached the
    socket, and whether any try ended without an answer (it may have been stored)."""

    __slots__ = ("what", "advice", "sent", "unknown")

    def __init__(self, what: str, advice: str) -> None:
        self.what = what
        self.advice = advice
        self.sent = False
        self.unknown = False


SAFE = "repeating the call is safe"
READ_FIRST = "read it back before repeating the call, which could store it twice"


class _ReplyMux:
    """Routes each reply on one wildcard inbox straight to the future of its request.

    Passed to ``nc.subscribe(..., future=...)``: nats-py then hands every message to
    ``set_result`` from its reader, skipping the per-subscription queue and task that
    ``nc.request`` goes through. Timeouts are swept by one timer, armed only while requests wait,
    instead of one timer per request. Together: lower latency and about twice the request
    throughput (``benchmarks``).
    """

    def __init__(self, prefix: str, loop: asyncio.AbstractEventLoop, nc: NATS) -> None:
        self.prefix = prefix
        self._n = len(prefix)
        self._loop = loop
        self._nc = nc
        self._next = 0
        self._timer: asyncio.TimerHandle | None = None
        # token -> (future, deadline, reconnect count when sent)
        self.waiting: dict[str, tuple[asyncio.Future[Msg], float, int]] = {}

    def cancelled(self) -> bool:  # the subscription's "future" is never done
        return False

    def done(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        entry = self.waiting.pop(msg.subject[self._n :], None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

    def expect(self, timeout: float) -> tuple[str, asyncio.Future[Msg]]:
        """A reply subject and the future its reply will resolve."""
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[Msg] = self._loop.create_future()
        self.waiting[token] = (future, self._loop.time() + timeout, self._nc.stats["reconnects"])
        if self._timer is None:
            self._timer = self._loop.call_later(_SWEEP_EVERY, self._sweep)
        return self.prefix + token, future

    def _sweep(self) -> None:
        now = self._loop.time()
        gen = self._nc.stats["reconnects"]
        lost = not self._nc.is_connected
        # A lost connection loses the replies of the requests sent on it: fail them now (to be
        # re-sent once connected) instead of letting them wait out their whole timeout.
        expired = [
            t for t, (f, deadline, g) in self.waiting.items() if deadline <= now or f.done() or g != gen or lost
        ]
        for token in expired:
            future, deadline, g = self.waiting.pop(token)
            if not future.done():
                future.set_exception(nats.errors.TimeoutError() if deadline <= now else _Resend())
        self._timer = self._loop.call_later(_SWEEP_EVERY, self._sweep) if self.waiting else None

    def fail_all(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self.waiting = self.waiting, {}
        for future, _, _ in waiting.values():
            if not future.done():
                future.set_exception(exc)


class _BatchCollector:
    """Collects the replies of one batch direct get until its end-of-batch status."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.batch = Batch([], 0, 0)
        self.done_future: asyncio.Future[None] = loop.create_future()

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, m: Msg) -> None:
        hdr = m.headers
        st = hdr.get("Status") if hdr else None
        if st is None:
            self.batch.msgs.append(m)
            return
        done = self.done_future
        if done.done():
            return
        assert hdr is not None
        if st == "204":
            self.batch.pending = int(hdr.get("Nats-Num-Pending", 0))
            self.batch.last_seq = int(hdr.get("Nats-Last-Sequence", 0))
            self.batch.up_to_seq = int(hdr.get("Nats-UpTo-Sequence", 0))
            done.set_result(None)
        elif st == "404":
            done.set_result(None)
        elif st == "413":
            self.batch.too_many = True
            done.set_result(None)
        else:
            done.set_exception(nats.js.errors.APIError(code=int(st), description=hdr.get("Description", "")))


class Connection:
    """A NATS connection with JetStream, shared through ``acquire``/``release``."""

    def __init__(self, opts: ConnectOptions, nc: NATS, home: Path | None) -> None:
        self.opts = opts
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.home = home
        self.refs = 0
        self._ready_streams: set[str] = set()
        self._recovering: asyncio.Future[None] | None = None
        self._healing: asyncio.Task[None] | None = None  # a hung-server check left running by _fail
        self._full_pid = 0  # the embedded server seen with a full disk (its streams then stay wedged)
        self._mux: _ReplyMux | None = None
        self._id_prefix = secrets.token_urlsafe(12) + "-"  # 96 random bits: unique across processes
        self._id_count = itertools.count(1)

    def new_id(self) -> str:
        """A unique id for message and batch ids: a random prefix and a counter (cheap, no lock)."""
        return self._id_prefix + str(next(self._id_count))

    async def _replies(self) -> _ReplyMux:
        mux = self._mux
        if mux is None:
            mux = _ReplyMux(self.nc.new_inbox() + ".", asyncio.get_running_loop(), self.nc)
            await self.nc.subscribe(mux.prefix + "*", future=mux)  # type: ignore[arg-type]
            self._mux = mux
        return mux

    async def request(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        write: _Write | None = None,
    ) -> Msg:
        """One request/reply over the shared reply inbox (raises nats-py errors; callers translate).

        ``write`` is marked sent once the request is handed to nats-py (it may reach the server).
        """
        mux = self._mux or await self._replies()
        reply, future = mux.expect(timeout)
        await self.nc.publish(subject, data, reply=reply, headers=dict(headers) if headers else None)
        if write is not None:
            write.sent = True
        msg = await future
        hdr = msg.headers
        if hdr is not None and hdr.get("Status") == "503" and not msg.data:
            raise nats.errors.NoRespondersError
        return msg

    async def close(self) -> None:
        """Close the NATS connection; requests still waiting fail."""
        if self._healing is not None:
            self._healing.cancel()
        if self._mux is not None:
            self._mux.fail_all(nats.errors.ConnectionClosedError())
            self._mux = None
        if not self.nc.is_closed:
            await _close_soon(self.nc)

    @property
    def max_body(self) -> int:
        """The largest message body this server takes, leaving room for our headers."""
        return self.nc.max_payload - HEADROOM

    # -- connecting -----------------------------------------------------------------------------
    @staticmethod
    async def open(opts: ConnectOptions) -> Connection:
        if not opts.embedded:
            assert opts.servers is not None
            nc = await _connect(
                list(opts.servers), token=opts.token, user=opts.user, password=opts.password, creds=opts.creds
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
        return Connection(opts, nc, home)

    def generation(self) -> tuple[int, int]:
        """Changes whenever the connection is replaced or reconnects (subscriptions may be lost)."""
        return id(self.nc), self.nc.stats["reconnects"]

    async def _recover(self) -> None:
        """Restart the embedded server if it died or hangs, and wait until the connection is back."""
        if self.home is None:
            return
        if self._recovering is not None:
            return await asyncio.shield(self._recovering)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._recovering = fut
        try:
            state, _token = await asyncio.to_thread(embedded.ensure, self.home, verify=True)
            url = self.nc.connected_url
            same = url is not None and url.port == state.port and not self.nc.is_closed
            if same:
                for _ in range(200):  # nats-py reconnects by itself to the same port
                    if self.nc.is_connected:
                        break
                    await asyncio.sleep(0.025)
            if not same or not self.nc.is_connected:
                old = self.nc
                self.nc = await _connect_embedded(state)
                self.js = self.nc.jetstream()
                if self._mux is not None:
                    self._mux.fail_all(_Resend())
                    self._mux = None
                # Closing a client stuck reconnecting to whatever took over the old port can hang
                # (its TLS transport waits for the stranger; measured > 30 s): do not wait for it.
                closing = asyncio.ensure_future(old.close())
                _closing.add(closing)
                closing.add_done_callback(_closing.discard)
                closing.add_done_callback(lambda f: f.cancelled() or f.exception())
                await asyncio.wait({closing}, timeout=1.0)
            self._ready_streams.clear()
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._recovering = None

    async def _disk_wedged(self) -> int:
        """Whether the embedded server (which greets new connections: it is not hung) met a full
        disk and space is back. nats-server 2.15 then keeps failing writes to the streams it could
        not write, without a reply, until it restarts (measured); such a write was not stored.
        Returns that server's pid, or 0."""
        assert self.home is not None
        state = await asyncio.to_thread(embedded.status, self.home)
        if state is None:
            return 0
        free = await asyncio.to_thread(embedded.free_bytes, self.home)
        if free < embedded.MIN_FREE:
            self._full_pid = state.pid
            return 0  # still full: the call ends in StorageFull at its deadline
        if self._full_pid == state.pid or await asyncio.to_thread(embedded.log_says_disk_full, self.home, state.pid):
            return state.pid
        return 0

    async def _limit_grew(self) -> bool:
        """After the embedded server refused a write for its storage limit: restart it when freed
        space allows a higher limit (True: the caller retries). nats-server fixes the limit at
        start, so without a restart the space freed since would never be used."""
        assert self.home is not None
        state = await asyncio.to_thread(embedded.status, self.home)
        if state is None or not await asyncio.to_thread(embedded.store_limit_grew, self.home):
            return False
        try:
            await asyncio.to_thread(embedded.restart, self.home, state.pid)
            await self._recover()
        except Exception as exc:
            raise translate(exc) from exc
        return True

    def _limit_error(self) -> StorageFull:
        assert self.home is not None
        return StorageFull(
            f"disk full: the embedded server keeps a quarter of the disk holding {self.home} free, and "
            "its data fills the rest; this write was not stored; free space (delete keys or conversations, "
            "or other files), and writes work again by themselves"
        )

    async def _disk_full(self) -> StorageFull | None:
        """At a call's deadline on the embedded server: ``StorageFull`` when its disk is full."""
        assert self.home is not None
        try:
            free = await asyncio.to_thread(embedded.free_bytes, self.home)
        except OSError:
            return None
        if free >= embedded.MIN_FREE:
            return None
        state = await asyncio.to_thread(embedded.status, self.home)
        if state is not None:
            self._full_pid = state.pid
        return embedded.disk_full_error(self.home, free)

    async def _attempt(self, fn: Callable[[], Awaitable[T]], remaining: float) -> T:
        """One try of ``fn``, cut at ``remaining`` seconds. On the embedded server, when the budget
        allows, a request still unanswered after ``_PROBE_AFTER`` seconds checks the server: one
        that does not greet a new connection hangs (stopped, frozen), and one that met a full disk
        that has space again cannot write; either is restarted, and ``fn`` is re-sent (with a
        shorter budget the call just times out)."""
        if self.home is None or remaining <= _PROBE_AFTER + _GREETING_WAIT:
            async with asyncio.timeout(remaining):  # a timer, no extra task (unlike wait_for)
                return await fn()
        loop = asyncio.get_running_loop()
        end = loop.time() + remaining
        task = asyncio.current_task()
        assert task is not None
        hung: list[bool] = []
        probes: list[asyncio.Future[None]] = []
        finished = False
        home = self.home

        async def probe() -> None:
            if await asyncio.to_thread(embedded.hung, home) and not finished:
                hung.append(True)
                task.cancel()
            elif (wedged := await self._disk_wedged()) and not finished:
                await asyncio.to_thread(embedded.restart, home, wedged)
                self._full_pid = 0
                hung.append(True)
                task.cancel()

        # A timer rather than a task per call: the probe costs nothing unless a request is slow.
        timer = loop.call_later(_PROBE_AFTER, lambda: probes.append(asyncio.ensure_future(probe())))
        try:
            async with asyncio.timeout(remaining):
                return await fn()
        except asyncio.CancelledError:
            if not hung or task.uncancel() > 0:  # cancelled by someone else too
                raise
        finally:
            finished = True
            timer.cancel()
            for running in probes:
                running.cancel()
        await asyncio.wait_for(self._recover(), max(end - loop.time(), 0.001))
        raise _Resend()

    async def call(
        self, fn: Callable[[], Awaitable[T]], *, timeout: float = 5.0, write: _Write | None = None
    ) -> T:
        """Run ``fn`` with errors translated, retried until ``timeout`` seconds have passed in all.

        A lost connection (nats-py reconnects by itself, or the embedded server is restarted) or a
        server not ready yet make ``fn`` run again; every try shares the one deadline. ``write``
        describes a write: when it was sent and is still unconfirmed at the deadline, the call
        raises ``OutcomeUnknown`` with its advice instead of ``ServerUnavailable``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.05
        last: BaseException | None = None
        unwedged = False
        limit_checked = False
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                if not unwedged and await self._unwedge(last):
                    unwedged, deadline = True, loop.time() + timeout  # one more try, on the new server
                    continue
                raise await self._fail(last, timeout, write)
            try:
                if self.home is not None and not self.nc.is_connected:
                    # The embedded server went away: restart it now rather than after a timeout.
                    await asyncio.wait_for(self._recover(), remaining)
                    remaining = max(deadline - loop.time(), 0.001)
                if write is not None:
                    write.sent = False
                return await self._attempt(fn, remaining)
            except QuotaExceeded as exc:
                if self.home is None or type(exc) is not QuotaExceeded or not str(exc).startswith("insufficient"):
                    raise
                if not limit_checked and await self._limit_grew():
                    limit_checked = True
                    continue  # restarted with the higher limit that the freed space allows
                raise self._limit_error() from exc
            except BotWireError:
                raise
            except _RETRYABLE as exc:
                last = exc
                if write is not None and write.sent and not isinstance(exc, _Busy):
                    write.unknown = True
                wait = min(delay, deadline - loop.time())
                if wait <= 0:
                    if not unwedged and await self._unwedge(exc):
                        unwedged, deadline = True, loop.time() + timeout  # one more try, on the new server
                        continue
                    raise await self._fail(exc, timeout, write) from exc
                delay = min(delay * 2, 1.0)
                if self.nc.is_connected:
                    await asyncio.sleep(wait)
                elif self.home is None:  # nats-py reconnects by itself: re-send once it has
                    if self.nc.is_closed:
                        raise await self._fail(exc, timeout, write) from exc
                    while not self.nc.is_connected and loop.time() < deadline:
                        await asyncio.sleep(0.025)
            except Exception as exc:
                new = translate(exc)
                if new is exc:
                    raise
                raise new from exc

    async def _unwedge(self, exc: BaseException | None) -> bool:
        """At the deadline of a call to the embedded server that timed out: when the server met a
        full disk and space is back (it then keeps failing writes without a reply until it
        restarts; such a write was not stored), restart it and say so (True: try once more).

        The hung-server probe does this within the deadline when the timeout leaves room (> 2 s);
        this covers shorter timeouts, at the cost of one more timeout."""
        if self.home is None or not (exc is None or isinstance(exc, (asyncio.TimeoutError, nats.errors.TimeoutError))):
            return False
        try:
            pid = await self._disk_wedged()
            if not pid:
                return False
            await asyncio.to_thread(embedded.restart, self.home, pid)
            self._full_pid = 0
            await self._recover()
        except Exception:  # noqa: BLE001 - the call fails with its own error
            return False
        return True

    async def _fail(self, exc: BaseException | None, timeout: float, write: _Write | None) -> BaseException:
        """The error a call ends with; on the embedded server, a full disk says so (``StorageFull``:
        nats-server does not store, nor answer, a write it could not write)."""
        if self.home is not None and (exc is None or isinstance(exc, (asyncio.TimeoutError, nats.errors.TimeoutError))):
            full = await self._disk_full()
            if full is not None:
                return full
            self._heal_later()
        return self._failed(exc, timeout, write)

    def _heal_later(self) -> None:
        """After a call to the embedded server timed out: check in the background whether the server
        hangs, and restart it if so. The in-call probe needs more than 2 s of timeout; without this,
        a client whose timeout is shorter failed every call for good against a stopped server
        (measured: SIGSTOP, timeout=1). The failing call still ends at its deadline."""
        if self.home is None or (self._healing is not None and not self._healing.done()):
            return
        home = self.home

        async def heal() -> None:
            if await asyncio.to_thread(embedded.hung, home):
                await self._recover()

        task = asyncio.ensure_future(heal())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._healing = task

    @staticmethod
    def _failed(exc: BaseException | None, timeout: float, write: _Write | None) -> BaseException:
        if write is not None and write.unknown:
            return OutcomeUnknown(
                f"the server did not confirm the {write.what} within {timeout:g} s (it stalled or "
                f"restarted): it may or may not be stored; {write.advice}"
            )
        if isinstance(exc, _Busy):
            return QuotaExceeded(
                f"the server had no room for the {write.what if write else 'write'} within {timeout:g} s (its "
                "ingest queue is full or too many batches are in flight); nothing was stored: retrying later is safe"
            )
        if exc is None or isinstance(exc, (asyncio.TimeoutError, nats.errors.TimeoutError, _Resend)):
            return ServerUnavailable(
                f"the NATS server did not answer within {timeout:g} s; is it running and reachable?"
            )
        return translate(exc)

    # -- streams --------------------------------------------------------------------------------
    async def ensure_stream(self, config: StreamConfig, timeout: float = 5.0) -> None:
        """Create the stream unless this connection already knows it exists (within ``timeout``)."""
        name = config.name
        assert name is not None
        if name in self._ready_streams:
            return

        async def run() -> None:
            # One request: creating a stream that exists with the same config is a no-op, and
            # one that exists with another config (10058) is used as it is.
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:
                    raise
            except nats.js.errors.APIError as exc:
                # 10049 "error creating store for stream": what a full disk gives (measured)
                if exc.err_code == 10049 and self.home is not None:
                    free = await asyncio.to_thread(embedded.free_bytes, self.home)
                    if free < embedded.MIN_FREE:
                        raise embedded.disk_full_error(self.home, free) from exc
                raise

        await self.call(run, timeout=timeout)
        self._ready_streams.add(name)

    # -- publishing -----------------------------------------------------------------------------
    def _ids(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        """A copy of ``headers`` with a ``Nats-Msg-Id`` (kept when the caller gave one)."""
        h = dict(headers) if headers else {}
        h.setdefault("Nats-Msg-Id", self.new_id())
        return h

    async def publish(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        *,
        what: str = "write",
        advice: str = READ_FIRST,
    ) -> int:
        """Publish to JetStream and wait for the ack; return the stream sequence.

        Carries a ``Nats-Msg-Id`` and is re-sent with it after a lost connection (see the module
        docstring). A conditional publish (``Nats-Expected-Last-Subject-Sequence``) refused on a
        re-send is read back: found, its sequence is returned; not found, ``Conflict`` is raised.
        """
        h = self._ids(headers)
        expected = h.get("Nats-Expected-Last-Subject-Sequence")
        write = _Write(what, advice)
        tries = 0

        async def run() -> int:
            nonlocal tries
            tries += 1
            msg = await self.request(subject, data, h, timeout, write)
            ack = _ack_decoder.decode(msg.data)
            if ack.error is not None:
                if tries > 1 and expected is not None and ack.error.err_code == _WRONG_LAST:
                    found = await self._landed(subject, h["Nats-Msg-Id"], timeout)
                    if found is not None:
                        return found
                if ack.error.err_code in _BUSY_CODES:
                    raise _Busy  # dropped by a full ingest queue: nothing stored
                _raise_api_error(ack.error)
            return ack.seq

        return await self.call(run, timeout=timeout, write=write)

    async def publish_pipelined(
        self,
        items: Sequence[tuple[str, bytes, Mapping[str, str]]],
        timeout: float = 5.0,
        *,
        what: str = "write",
        advice: str = READ_FIRST,
    ) -> list[int]:
        """Publish several unconditional messages back to back, then wait for all their acks.

        Not atomic: each message is stored or refused on its own (the first error is raised).
        Each carries a ``Nats-Msg-Id``, so a re-send after a lost connection stores none twice.
        """
        prepared = [(subject, data, self._ids(headers)) for subject, data, headers in items]
        write = _Write(what, advice)

        async def run() -> list[int]:
            mux = self._mux or await self._replies()
            futures = []
            for subject, data, headers in prepared:
                reply, future = mux.expect(timeout)
                futures.append(future)
                await self.nc.publish(subject, data, reply=reply, headers=headers)
                write.sent = True
            seqs = []
            for future in futures:
                ack = _ack_decoder.decode((await future).data)
                if ack.error is not None:
                    _raise_api_error(ack.error)
                seqs.append(ack.seq)
            return seqs

        return await self.call(run, timeout=timeout, write=write)

    async def publish_batch(
        self,
        subject: str,
        payloads: Sequence[bytes],
        headers: Sequence[Mapping[str, str]],
        timeout: float = 10.0,
        *,
        expected: int | None = None,
        what: str = "batch",
        advice: str = READ_FIRST,
    ) -> int:
        """Publish ``payloads`` as one atomic batch (all stored or none); return the last sequence.

        ``expected``: the batch is stored only if the subject's last sequence is this (0: empty).
        Every message carries a ``Nats-Msg-Id``. A batch the server dropped for lack of room
        (ingest queue full, too many batches in flight: nothing stored) is sent again, under a new
        batch id, until the deadline. A batch re-sent after a lost connection that the server
        refuses as a duplicate (or, conditional, as a wrong last sequence) is read back.
        """
        n = len(payloads)
        if n == 0:
            raise AssertionError("empty batch")
        hs = [self._ids(x) for x in headers]
        if expected is not None:
            hs[0]["Nats-Expected-Last-Subject-Sequence"] = str(expected)
        write = _Write(what, advice)
        tries = 0

        async def run() -> int:
            nonlocal tries
            tries += 1
            batch_id = self.new_id()
            for i, (payload, h) in enumerate(zip(payloads, hs, strict=True), 1):
                h["Nats-Batch-Id"] = batch_id
                h["Nats-Batch-Sequence"] = str(i)
                if i < n:
                    await self.nc.publish(subject, payload, headers=h)
                    write.sent = True
            hs[-1]["Nats-Batch-Commit"] = "1"
            msg = await self.request(subject, payloads[-1], hs[-1], timeout, write)
            ack = _ack_decoder.decode(msg.data)
            if ack.error is None:
                return ack.seq
            code = ack.error.err_code
            if tries > 1 and (code == _DUPLICATE_IN_BATCH or (code == _WRONG_LAST and expected is not None)):
                found = await self._landed(subject, hs[-1]["Nats-Msg-Id"], timeout)
                if found is not None:
                    return found
            if code in _BUSY_CODES:
                raise _Busy  # nothing stored: send it again after a pause
            _raise_api_error(ack.error)
            raise AssertionError("unreachable")

        return await self.call(run, timeout=timeout, write=write)

    async def _landed(self, subject: str, msg_id: str, timeout: float) -> int | None:
        """The sequence of the message stored with ``msg_id`` (None: not stored), by a probe the
        server never stores: the same ``Nats-Msg-Id`` with an impossible
        ``Nats-Expected-Last-Msg-Id``. The server checks its duplicate window (2 min, kept even
        after the message itself was rolled up or removed) before that condition, so a duplicate
        is answered with the original's sequence and anything else refused (10070)."""
        probe = {"Nats-Msg-Id": msg_id, "Nats-Expected-Last-Msg-Id": "botwire-probe-" + self.new_id()}
        msg = await self.request(subject, b"", probe, timeout)
        ack = _ack_decoder.decode(msg.data)
        if ack.duplicate:
            return ack.seq
        if ack.error is not None and ack.error.err_code == _WRONG_LAST_MSG_ID:
            return None
        if ack.error is not None:
            _raise_api_error(ack.error)
        raise OutcomeUnknown(f"a read-back probe on {subject} was stored (seq {ack.seq}); please report this")

    # -- reading --------------------------------------------------------------------------------
    async def direct_get_last(self, stream: str, subject: str, timeout: float = 5.0) -> Msg | None:
        """The last message on ``subject`` (one request), or None when the subject is empty."""

        async def run() -> Msg | None:
            msg = await self.request(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"", None, timeout)
            hdr = msg.headers
            if hdr is not None and "Status" in hdr:
                if hdr["Status"] == "404":
                    return None
                raise nats.js.errors.APIError(code=int(hdr["Status"]), description=hdr.get("Description", ""))
            return msg

        return await self.call(run, timeout=timeout)

    async def direct_batch(self, stream: str, request: Mapping[str, Any], timeout: float = 10.0) -> Batch:
        """One batch direct get (``batch``, ``seq``, ``next_by_subj``, ``multi_last``, ``no_hdr``...).

        Returns the messages of one reply batch and its end-of-batch figures; page with ``seq``.
        """
        body = msgspec.json.encode({k: v for k, v in request.items() if v is not None})
        return await self.call(lambda: self._direct_batch_once(stream, body, timeout), timeout=timeout)

    async def _direct_batch_once(self, stream: str, body: bytes, timeout: float) -> Batch:
        collector = _BatchCollector(asyncio.get_running_loop())
        inbox = self.nc.new_inbox()
        # future=: nats-py hands each reply to the collector from its reader, with no queue
        sub = await self.nc.subscribe(inbox, future=collector)  # type: ignore[arg-type]
        try:
            await self.nc.publish(f"$JS.API.DIRECT.GET.{stream}", body, reply=inbox)
            await asyncio.wait_for(collector.done_future, timeout)
        finally:
            await sub.unsubscribe()
        return collector.batch

    async def read_subject(
        self,
        stream: str,
        subject: str,
        *,
        start_seq: int = 1,
        page: int = 1000,
        headers: bool = True,
        known: int | None = None,
        snapshot: bool = False,
        timeout: float = 10.0,
    ) -> list[Msg]:
        """Every message on ``subject`` from ``start_seq`` on, in order, by paged batch direct gets,
        however many bytes they hold.

        ``headers=False`` asks the server to leave out per-message headers: about twice as fast for
        long reads, but the messages then carry neither sequence nor time. ``known``: how many
        messages followed ``start_seq`` at some moment before the call; once that many are read,
        all of them are (they have the lowest sequences), which saves the closing request.
        ``snapshot``: a read that got messages after its first reply, or whose first reply surely
        left some behind, ends by asking for the first message again: one of the first reply must
        still be there (a purge or rollup removes every message of the subject), else
        ``SubjectPurged``. Without it, reads racing a ``clear()`` and an append returned old
        messages followed by the new one (9 of 40 reads of 9,000 messages) or the first 10,000 of
        25,000 old ones. Reads whose first reply holds everything skip it.
        ``timeout`` bounds each page's request.
        """
        out: list[Msg] = []
        seq = start_seq
        first_reply_end = 0  # the last sequence of the first reply
        check = False  # whether the first reply must be checked for at the end
        while True:
            req: dict[str, Any] = {"next_by_subj": subject, "seq": seq, "batch": page}
            if not headers:
                req["no_hdr"] = True
            batch = await self.direct_batch(stream, req, timeout)
            out.extend(batch.msgs)
            check = check or (first_reply_end > 0 and bool(batch.msgs))
            # A reply also ends at the server's byte cap (its max_pending, 64 MiB by default), so
            # fewer messages than asked does not mean the end. With headers the end-of-batch
            # pending count is exact; with no_hdr the server never decrements it (nats-server
            # 2.15), so 0 is still the end but anything else needs the next page: an empty
            # reply (one small round trip) is then the end.
            if not batch.msgs or not batch.last_seq or batch.pending == 0:
                break
            if known is not None and len(out) >= known:
                break
            if not first_reply_end:
                first_reply_end = batch.last_seq
                # Surely more left: a full page, or more pending than the reply holds (no_hdr's
                # count includes the reply's own messages unless the stream grew meanwhile).
                check = len(batch.msgs) >= page or batch.pending > (0 if headers else len(batch.msgs))
            seq = batch.last_seq + 1
        if snapshot and check:
            first = {"next_by_subj": subject, "seq": start_seq, "batch": 1, "no_hdr": True}
            probe = await self.direct_batch(stream, first, timeout)
            if not probe.msgs or probe.last_seq > first_reply_end:
                raise SubjectPurged(f"{subject} was purged or rolled up while it was read")
        return out

    async def pull_headers(
        self, stream: str, filter_subject: str, *, last_per_subject: bool, timeout: float = 10.0
    ) -> list[Msg]:
        """The headers of the messages on subjects matching ``filter_subject``, in stream order, by
        one ephemeral pull consumer: all of them, or only the last of each subject.

        Costs two requests plus the messages. Creating a ``last_per_subject`` consumer costs the
        server time that grows with the stream; one over every matching message does not.
        """

        async def run() -> list[Msg]:
            cfg = {
                "stream_name": stream,
                "config": {
                    "deliver_policy": "last_per_subject" if last_per_subject else "all",
                    "ack_policy": "none",
                    "filter_subject": filter_subject,
                    "headers_only": True,
                    "inactive_threshold": 5_000_000_000,
                    "mem_storage": True,
                    "num_replicas": 1,
                },
            }
            resp = await self.request(f"$JS.API.CONSUMER.CREATE.{stream}", msgspec.json.encode(cfg), None, timeout)
            info = msgspec.json.decode(resp.data)
            if "error" in info:
                err = info["error"]
                raise nats.js.errors.APIError(
                    code=err.get("code"), err_code=err.get("err_code"), description=err.get("description")
                )
            name, pending = info["name"], info["num_pending"]
            msgs: list[Msg] = []
            try:
                if pending:
                    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

                    async def on_msg(m: Msg) -> None:
                        if m.headers and "Status" in m.headers and not m.data and m.reply == "":
                            if not done.done():
                                done.set_result(None)
                            return
                        msgs.append(m)
                        if len(msgs) >= pending and not done.done():
                            done.set_result(None)

                    inbox = self.nc.new_inbox()
                    sub = await self.nc.subscribe(inbox, cb=on_msg)
                    try:
                        req = msgspec.json.encode({"batch": pending, "no_wait": True})
                        await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", req, reply=inbox)
                        await asyncio.wait_for(done, timeout)
                    finally:
                        await sub.unsubscribe()
            finally:  # fire and forget: the consumer would also vanish after inactive_threshold
                await self.nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"")
            return msgs

        return await self.call(run, timeout=timeout)

    async def subject_counts(self, stream: str, subject_filter: str, timeout: float = 5.0) -> dict[str, int]:
        """How many messages each subject matching ``subject_filter`` holds (one request per
        100,000 subjects: the server sends at most that many per stream info reply, sorted, and
        nats-py's ``stream_info`` asks for the first page only)."""

        async def run() -> dict[str, int]:
            counts: dict[str, int] = {}
            while True:
                req: dict[str, Any] = {"subjects_filter": subject_filter}
                if counts:
                    req["offset"] = len(counts)
                resp = await self.request(f"$JS.API.STREAM.INFO.{stream}", msgspec.json.encode(req), None, timeout)
                info = msgspec.json.decode(resp.data)
                if "error" in info:
                    err = info["error"]
                    raise nats.js.errors.APIError(
                        code=err.get("code"), err_code=err.get("err_code"), description=err.get("description")
                    )
                page = (info.get("state") or {}).get("subjects") or {}
                before = len(counts)
                counts.update(page)
                if len(counts) == before or len(counts) >= info.get("total", 0):
                    return counts

        return await self.call(run, timeout=timeout)

    async def purge(
        self, stream: str, subject: str, *, before_seq: int | None = None, timeout: float = 10.0
    ) -> None:
        """Remove the messages on ``subject`` (below ``before_seq`` when given)."""

        async def run() -> None:
            req: dict[str, Any] = {"filter": subject}
            if before_seq is not None:
                req["seq"] = before_seq
            resp = await self.request(f"$JS.API.STREAM.PURGE.{stream}", msgspec.json.encode(req), None, timeout)
            info = msgspec.json.decode(resp.data)
            if "error" in info:
                err = info["error"]
                raise nats.js.errors.APIError(
                    code=err.get("code"), err_code=err.get("err_code"), description=err.get("description")
                )

        await self.call(run, timeout=timeout)


CONNECT_TIMEOUT = 5.0
_closing: set[asyncio.Future[None]] = set()  # old clients still closing in the background


async def _close_soon(nc: NATS, wait: float = 1.0) -> None:
    """Close ``nc``, waiting at most ``wait`` seconds; the rest of the close goes on in the background.

    nats-py's close waits for the TLS transport to close, which never happens when the peer does not
    answer: a SIGSTOP'd server (a `botwire get` took > 100 s), or a client left reconnecting after
    a failed handshake (a new certificate, a stranger on the old port: `Memory.close()` hung for good).
    """
    closing = asyncio.ensure_future(nc.close())
    _closing.add(closing)
    closing.add_done_callback(_closing.discard)
    closing.add_done_callback(lambda f: f.cancelled() or f.exception())
    await asyncio.wait({closing}, timeout=wait)


class _PlainTextRefused(nats.errors.Error):
    """A ``tls://`` server did not set up TLS: the CONNECT (with credentials) was not sent."""


class _Client(NATS):
    """nats-py's client, which never sends CONNECT (and its credentials) in clear to a ``tls://`` URL.

    nats-py 2.16 upgrades to TLS only when the server's INFO says ``tls_required`` (or with
    ``tls_handshake_first``); otherwise it sends CONNECT in clear even for ``tls://``. This check runs
    on every connect and reconnect, just before CONNECT is written.
    """

    def _connect_command(self) -> bytes:
        server = self._current_server
        if (
            server is not None
            and server.uri.scheme == "tls"
            and not (self.options.get("tls_handshake_first") or self._server_info.get("tls_required"))
        ):
            raise _PlainTextRefused(
                f"{redact(server.uri.geturl())} does not offer TLS, so no credentials were sent; "
                "use nats:// to connect without TLS, or enable TLS on the server"
            )
        data: bytes = super()._connect_command()
        return data


class _QuietTlsEof(logging.Filter):
    """Drops asyncio's warning "returning true from eof_received() has no effect when using ssl",
    logged (to stderr when logging is not set up) each time a TLS server closes a nats-py stream
    connection: it says nothing to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("returning true from eof_received()")


logging.getLogger("asyncio").addFilter(_QuietTlsEof())


pinned_context = embedded.pinned_context


async def _connect_embedded(state: embedded.ServerState, timeout: float = CONNECT_TIMEOUT) -> NATS:
    """Connect to the embedded server: TLS first, trusting its own certificate only, and the token
    read from its file at every (re)connect, after the server proved it holds the certificate's key.

    The server gets a new token at each start, so a client that reconnects after a restart
    presents the new one; one that reaches an impostor on the old port sends it nothing.
    """
    home = Path(state.home)
    try:
        context = pinned_context(state.ca_file)
    except (OSError, ssl.SSLError) as exc:  # removed or spoiled since ensure() looked: start again
        raise ServerUnavailable(f"cannot read the embedded server's certificate {state.ca_file}: {exc}") from exc
    last = [embedded.load_token(home) or ""]

    def token() -> str:
        last[0] = embedded.load_token(home) or last[0]
        return last[0]

    return await _connect(
        [state.url], token=token, timeout=timeout, tls=context, tls_handshake_first=True
    )


async def _connect(
    servers: list[str],
    *,
    token: str | Callable[[], str] | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    timeout: float = CONNECT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
    tls_handshake_first: bool = False,
) -> NATS:
    """Connect, reconnecting forever afterwards, but failing the first connect fast.

    nats-py retries a first connect forever when reconnects are unlimited, even on a refused
    token; here a refused credential raises ``Unauthorized`` at once, a server that cannot be
    verified (``tls://`` without TLS, a certificate we do not trust) ``ServerNotTrusted`` at once,
    and an unreachable server ``ServerUnavailable`` after ``timeout`` seconds.
    """
    kwargs: dict[str, Any] = {}
    if tls is not None:
        kwargs["tls"] = tls
        kwargs["tls_handshake_first"] = tls_handshake_first
    if token:
        kwargs["token"] = token
    if user:
        kwargs["user"] = user
        kwargs["password"] = password
    if creds:
        kwargs["user_credentials"] = creds
    nc = _Client()
    refused = asyncio.Event()
    last_error: list[BaseException] = []
    untrusted: list[BaseException] = []

    async def on_error(exc: Exception) -> None:  # nats-py would log every reconnect attempt
        last_error[:] = [exc]
        if isinstance(exc, (_PlainTextRefused, ssl.SSLCertVerificationError)):
            untrusted[:] = [exc]
            refused.set()
        elif isinstance(exc, nats.errors.AuthorizationError) or "authorization" in str(exc).lower():
            refused.set()

    connecting = asyncio.ensure_future(
        nc.connect(
            servers=servers,
            connect_timeout=2,
            reconnect_time_wait=0.1,  # type: ignore[arg-type]  # seconds; a float works
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            error_cb=on_error,
            name=f"botwire-stream {ORIGIN}",
            **kwargs,
        )
    )
    watching = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({connecting, watching}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
    if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
        return nc
    connecting.cancel()
    await _close_soon(nc)  # a hung (SIGSTOP'd) server would hold the close (measured: > 100 s)
    where = redact(", ".join(servers))
    if untrusted:
        if isinstance(untrusted[0], _PlainTextRefused):
            raise ServerNotTrusted(str(untrusted[0]))
        raise ServerNotTrusted(
            f"{where} did not present a certificate we trust ({untrusted[0]}), so no credentials were sent"
        )
    if refused.is_set():
        raise Unauthorized(
            f"{where} refused the credentials; check token=/user=/creds= or BOTWIRE_TOKEN/BOTWIRE_CREDS"
        )
    if connecting.done() and not connecting.cancelled() and (failure := connecting.exception()) is not None:
        if creds and not isinstance(failure, (nats.errors.Error, OSError, asyncio.TimeoutError)):
            # nats-py parses the creds file only when the server asks for a signature, and fails
            # with a TypeError or ValueError on a file that holds no user JWT and seed (measured).
            raise InvalidArgument(
                f"the creds file {creds!r} is not a NATS .creds file (a user JWT and its nkey seed): {failure!r}"
            ) from failure
        raise translate(failure)
    detail = f": {redact(str(last_error[0]) or type(last_error[0]).__name__)}" if last_error else ""
    raise ServerUnavailable(f"cannot connect to {where} within {timeout:.0f} s{detail}; is the server running?")


# -- the shared pool ---------------------------------------------------------------------------
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
                conn = await Connection.open(opts)
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
