"""Retries and recovery: one deadline per call, covering its re-sends and any server restart.

Retries and outcomes: every call has one deadline, its ``timeout``, that covers its retries and
any restart of the embedded server. Every write carries a ``Nats-Msg-Id``, and a write is re-sent
only after the connection was lost or replaced, reusing its ids, so the server's duplicate window
drops a second copy. A conditional write or atomic batch re-sent after its first copy landed is
refused by the server (wrong last sequence, duplicate message id: the server checks those before
its duplicate window); the client then asks the duplicate window whether the write's message id
was stored (``jetstream.Connection._landed``). A write whose outcome is still unknown at the
deadline raises ``OutcomeUnknown``.

On a cluster a write is also re-sent, with the same ids, when its acknowledgement has not come
within ``_RESEND_AFTER``: a stream leader that died or lost its quorum answers nothing, and a
write proposed to it is never acknowledged even once a new leader is elected (measured: writes
in flight when the leader was killed waited out their whole 5 s timeout; re-sent, they complete
as soon as the new leader is in place). A JetStream API 503 (the meta or stream leader is being
elected) is retried within the call's deadline like a lost connection.

With the embedded server, a dead or hung server is restarted and the call retried, a full disk
raises ``StorageFull``, and a server left unable to write by a full disk is restarted once space
is back: all through the ``ServerRestart`` hook the connection is given (``restart.py``); a
connection without one (any other server) never takes those paths. Every NATS failure leaves
``call`` translated (``nats.errors.translate``).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ..errors import BotWireError, OutcomeUnknown, QuotaExceeded, ServerUnavailable, StorageFull
from ..settings import ConnectOptions
from .connect import _close_soon
from .errors import translate
from .replies import _ReplyMux, _Resend, route_replies

__all__ = ["HEADROOM", "READ_FIRST", "SAFE", "RetryingConnection", "ServerRestart"]

T = TypeVar("T")

# What a request that got no answer in time raises (nats-py's own timer, or the call's deadline).
_TIMEOUTS = (asyncio.TimeoutError, nats.errors.TimeoutError)

_RETRYABLE = (
    nats.js.errors.ServiceUnavailableError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
    ConnectionError,
)


class _Unacknowledged(_Resend):
    """A write to a cluster got no acknowledgement within ``_RESEND_AFTER``: send it again now."""


class _NoPeers(nats.errors.NoRespondersError):
    """The cluster could not place a new stream's replicas (10005: a server is down or rejoining,
    or none has the placement tags): tried again until the deadline, then ``ServerUnavailable``."""

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description


class _Busy(nats.errors.NoRespondersError):
    """The server refused a publish for lack of room (nothing stored): send it again later."""


HEADROOM = 16 * 1024  # room for headers under the server's max_payload
# The embedded server is checked when a request waits longer than this, and restarted when it does
# not greet a new connection within _GREETING_WAIT. Its accept loop answers in well under 1 ms even
# while it stores hundreds of MiB (a PING on the busy connection itself can wait seconds then), so a
# server silent for a second is stopped (SIGSTOP, a frozen VM) rather than busy.
_PROBE_AFTER = 1.0
_GREETING_WAIT = 1.0  # embedded._answers' timeout
# A write to a cluster unanswered for this long is re-sent (same Nats-Msg-Id, so stored once): an
# R3 publish is acknowledged in 0.8 ms at p99 on loopback (notes/nats-facts.md), so half a second
# of silence means a leader election, not a slow write. A write that is merely slow converges all the
# same: once it is stored, its re-sends are answered at once from the duplicate window.
_RESEND_AFTER = 0.5


class ServerRestart(Protocol):
    """What a connection to a server it may restart (the embedded one) is given, so that
    ``RetryingConnection`` itself knows nothing of that server (``restart.EmbeddedRestart``)."""

    async def revive(self, nc: NATS) -> NATS | None:
        """Start the server again if needed; a new client, or None when ``nc`` is back."""

    async def hung(self) -> bool:
        """Whether the server does not greet a new connection."""

    async def restart(self, pid: int) -> None:
        """Stop server ``pid`` and start a new one."""

    async def disk_wedged(self) -> int:
        """The pid of a server left unable to write by a disk that has space again, or 0."""

    async def limit_grew(self) -> int:
        """The pid of a server whose storage limit freed space would raise, or 0."""

    def limit_error(self) -> StorageFull:
        """The error for a write refused at the storage limit."""

    async def disk_full(self) -> StorageFull | None:
        """At a call's deadline: the error for a full disk, or None."""

    async def store_full(self) -> StorageFull | None:
        """When creating a stream failed: the error for a full disk, or None."""


class _Write:
    """What a write is, for its ``OutcomeUnknown`` message; whether the current try reached the
    socket, and whether any try ended without an answer (it may have been stored)."""

    __slots__ = ("what", "advice", "sent", "unknown", "resent", "on_sent")

    def __init__(self, what: str, advice: str, on_sent: Callable[[], None] | None = None) -> None:
        self.what = what
        self.advice = advice
        self.on_sent = on_sent  # called each time a try of a single-message write is handed to nats-py
        self.sent = False
        self.unknown = False
        self.resent = 0  # re-sends for want of an acknowledgement (on a cluster)


SAFE = "repeating the call is safe"
READ_FIRST = "read it back before repeating the call, which could store it twice"


class RetryingConnection:
    """A NATS connection whose ``call`` retries, recovers and translates (the base of ``Connection``)."""

    def __init__(self, opts: ConnectOptions, nc: NATS, restart: ServerRestart | None) -> None:
        self.opts = opts
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.restart = restart
        self.refs = 0
        self._ready_streams: set[str] = set()
        self._recovering: asyncio.Future[None] | None = None
        self._healing: asyncio.Task[None] | None = None  # a hung-server check left running by _fail
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
            await route_replies(self.nc, mux)  # its replies skip nats-py's per-message work (replies.py)
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
            if write.on_sent is not None:
                write.on_sent()
            await self._acks_or_resend(mux, [(reply, future)], write)
        msg = await future
        hdr = msg.headers
        if hdr is not None and hdr.get("Status") == "503" and not msg.data:
            raise nats.errors.NoRespondersError
        return msg

    async def _acks_or_resend(
        self, mux: _ReplyMux, waiting: list[tuple[str, asyncio.Future[Msg]]], write: _Write
    ) -> None:
        """On a cluster: wait up to ``_RESEND_AFTER`` for the acknowledgements of a write's
        messages, else give them up and raise ``_Unacknowledged`` so that ``call`` re-sends the
        write with its ids (a leader election swallows writes silently; see the module docstring).
        Elsewhere, nothing: the caller awaits its replies until the deadline."""
        if self.restart is not None or not self.nc._server_info.get("cluster"):
            return
        futures = {f for _, f in waiting}
        try:
            await asyncio.wait(futures, timeout=_RESEND_AFTER)
        finally:
            for reply, future in waiting:
                if not future.done():  # given up (or the call's deadline): nobody awaits it
                    mux.waiting.pop(reply[len(mux.prefix) :], None)
                    future.cancel()
        if any(f.cancelled() for f in futures):
            write.resent += 1
            write.unknown = True
            raise _Unacknowledged()

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

    def generation(self) -> tuple[int, int]:
        """Changes whenever the connection is replaced or reconnects (subscriptions may be lost)."""
        return id(self.nc), self.nc.stats["reconnects"]

    async def recover(self) -> None:
        """Restart the embedded server if it died or hangs, and wait until the connection is back."""
        restart = self.restart
        if restart is None:
            return
        if self._recovering is not None:
            return await asyncio.shield(self._recovering)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._recovering = fut
        try:
            new = await restart.revive(self.nc)
            if new is not None:
                old = self.nc
                self.nc = new
                self.js = self.nc.jetstream()
                if self._mux is not None:
                    self._mux.fail_all(_Resend())
                    self._mux = None
                # Closing a client stuck reconnecting to whatever took over the old port can hang
                # (its TLS transport waits for the stranger; measured > 30 s): do not wait for it.
                await _close_soon(old)
            self._ready_streams.clear()
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._recovering = None

    async def _limit_grew(self) -> bool:
        """After the embedded server refused a write for its storage limit: restart it when freed
        space allows a higher limit (True: the caller retries)."""
        assert self.restart is not None
        pid = await self.restart.limit_grew()
        if not pid:
            return False
        try:
            await self.restart.restart(pid)
            await self.recover()
        except Exception as exc:
            raise translate(exc) from exc
        return True

    async def _attempt(self, fn: Callable[[], Awaitable[T]], remaining: float) -> T:
        """One try of ``fn``, cut at ``remaining`` seconds. On the embedded server, when the budget
        allows, a request still unanswered after ``_PROBE_AFTER`` seconds checks the server: one
        that does not greet a new connection hangs (stopped, frozen), and one that met a full disk
        that has space again cannot write; either is restarted, and ``fn`` is re-sent (with a
        shorter budget the call just times out)."""
        restart = self.restart
        if restart is None or remaining <= _PROBE_AFTER + _GREETING_WAIT:
            async with asyncio.timeout(remaining):  # a timer, no extra task (unlike wait_for)
                return await fn()
        loop = asyncio.get_running_loop()
        end = loop.time() + remaining
        task = asyncio.current_task()
        assert task is not None
        hung: list[bool] = []
        probes: list[asyncio.Future[None]] = []
        finished = False

        async def probe() -> None:
            if await restart.hung() and not finished:
                hung.append(True)
                task.cancel()
            elif (wedged := await restart.disk_wedged()) and not finished:
                await restart.restart(wedged)
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
        await asyncio.wait_for(self.recover(), max(end - loop.time(), 0.001))
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
                if self.restart is not None and not self.nc.is_connected:
                    # The embedded server went away: restart it now rather than after a timeout.
                    await asyncio.wait_for(self.recover(), remaining)
                    remaining = max(deadline - loop.time(), 0.001)
                if write is not None:
                    write.sent = False
                return await self._attempt(fn, remaining)
            except QuotaExceeded as exc:
                if self.restart is None or type(exc) is not QuotaExceeded or not str(exc).startswith("insufficient"):
                    raise
                if not limit_checked and await self._limit_grew():
                    limit_checked = True
                    continue  # restarted with the higher limit that the freed space allows
                raise self.restart.limit_error() from exc
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
                if isinstance(exc, _Unacknowledged):
                    continue  # it waited _RESEND_AFTER already: re-send at once
                if self.nc.is_connected:
                    await asyncio.sleep(wait)
                elif self.restart is None:  # nats-py reconnects by itself: re-send once it has
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
        restart = self.restart
        if restart is None or not (exc is None or isinstance(exc, _TIMEOUTS)):
            return False
        try:
            pid = await restart.disk_wedged()
            if not pid:
                return False
            await restart.restart(pid)
            await self.recover()
        except Exception:  # noqa: BLE001 - the call fails with its own error
            return False
        return True

    async def _fail(self, exc: BaseException | None, timeout: float, write: _Write | None) -> BaseException:
        """The error a call ends with; on the embedded server, a full disk says so (``StorageFull``:
        nats-server does not store, nor answer, a write it could not write)."""
        if self.restart is not None and (exc is None or isinstance(exc, _TIMEOUTS)):
            full = await self.restart.disk_full()
            if full is not None:
                return full
            self._heal_later()
        return self._failed(exc, timeout, write)

    def _heal_later(self) -> None:
        """After a call to the embedded server timed out: check in the background whether the server
        hangs, and restart it if so. The in-call probe needs more than 2 s of timeout; without this,
        a client whose timeout is shorter failed every call for good against a stopped server
        (measured: SIGSTOP, timeout=1). The failing call still ends at its deadline."""
        restart = self.restart
        if restart is None or (self._healing is not None and not self._healing.done()):
            return

        async def heal() -> None:
            if await restart.hung():
                await self.recover()

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
        if isinstance(exc, _NoPeers):
            return ServerUnavailable(
                f"the cluster could not place the namespace's replicas within {timeout:g} s ({exc.description}): "
                "a server is down or restarting, or no server has the placement tags; retry once all are up, "
                "or ask for fewer replicas (replicas=, ?replicas=N, BOTWIRE_REPLICAS)"
            )
        if isinstance(exc, _Busy):
            return QuotaExceeded(
                f"the server had no room for the {write.what if write else 'write'} within {timeout:g} s (its "
                "ingest queue is full or too many batches are in flight); nothing was stored: retrying later is safe"
            )
        if exc is None or isinstance(exc, (*_TIMEOUTS, _Resend)):
            return ServerUnavailable(
                f"the NATS server did not answer within {timeout:g} s; is it running and reachable?"
            )
        return translate(exc)

