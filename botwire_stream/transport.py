"""The NATS transport: shared connections, JetStream requests, and the raw APIs nats-py lacks.

One ``Connection`` per event loop and connection settings is shared by every ``AsyncMemory`` and
``AsyncChatHistory`` opened with them (reference counted). It adds what nats-py 2.16 does not
offer: batch and multi-last direct gets, atomic batch publishes, headers-only pulls, and one
shared reply inbox for requests. Every NATS failure leaves here translated by
``errors.translate``; with the embedded server, a dead server is restarted and the call retried,
a full disk raises ``StorageFull``, and a server left unable to write by a full disk is restarted
once space is back.
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
from .errors import BotWireError, ServerNotTrusted, ServerUnavailable, StorageFull, Unauthorized, translate
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


class _ReplyMux:
    """Routes each reply on one wildcard inbox straight to the future of its request.

    Passed to ``nc.subscribe(..., future=...)``: nats-py then hands every message to
    ``set_result`` from its reader, skipping the per-subscription queue and task that
    ``nc.request`` goes through. Timeouts are swept by one timer, armed only while requests wait,
    instead of one timer per request. Together: lower latency and about twice the request
    throughput (``benchmarks``).
    """

    def __init__(self, prefix: str, loop: asyncio.AbstractEventLoop) -> None:
        self.prefix = prefix
        self._n = len(prefix)
        self._loop = loop
        self._next = 0
        self._timer: asyncio.TimerHandle | None = None
        self.waiting: dict[str, tuple[asyncio.Future[Msg], float]] = {}

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
        self.waiting[token] = (future, self._loop.time() + timeout)
        if self._timer is None:
            self._timer = self._loop.call_later(_SWEEP_EVERY, self._sweep)
        return self.prefix + token, future

    def _sweep(self) -> None:
        now = self._loop.time()
        expired = [t for t, (f, deadline) in self.waiting.items() if deadline <= now or f.done()]
        for token in expired:
            future, _ = self.waiting.pop(token)
            if not future.done():
                future.set_exception(nats.errors.TimeoutError())
        self._timer = self._loop.call_later(_SWEEP_EVERY, self._sweep) if self.waiting else None

    def fail_all(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self.waiting = self.waiting, {}
        for future, _ in waiting.values():
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
            mux = _ReplyMux(self.nc.new_inbox() + ".", asyncio.get_running_loop())
            await self.nc.subscribe(mux.prefix + "*", future=mux)  # type: ignore[arg-type]
            self._mux = mux
        return mux

    async def request(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None, timeout: float = 5.0
    ) -> Msg:
        """One request/reply over the shared reply inbox (raises nats-py errors; callers translate)."""
        mux = self._mux or await self._replies()
        reply, future = mux.expect(timeout)
        await self.nc.publish(subject, data, reply=reply, headers=dict(headers) if headers else None)
        msg = await future
        hdr = msg.headers
        if hdr is not None and hdr.get("Status") == "503" and not msg.data:
            raise nats.errors.NoRespondersError
        return msg

    async def close(self) -> None:
        """Close the NATS connection; requests still waiting fail."""
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

    async def _recover(self) -> None:
        """Restart the embedded server if it died, and wait until the connection is back."""
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
            if not self.nc.is_connected:
                old = self.nc
                self.nc = await _connect_embedded(state)
                self.js = self.nc.jetstream()
                if self._mux is not None:
                    self._mux.fail_all(nats.errors.ConnectionClosedError())
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

    async def _check_disk(self, *, restart: bool) -> bool:
        """After a request to the embedded server timed out: was its disk full?

        Raises ``StorageFull`` while the disk is full. Once space is back, a server that met the
        full disk is restarted (True: the caller retries), since nats-server keeps failing writes
        to the streams it could not write, without a reply, until it restarts. The write that timed
        out was not stored: nats-server replies to every write it stores.
        """
        assert self.home is not None
        try:  # a server that answers pings is not hung: JetStream's silence was a failed store
            await self.nc.flush(timeout=1)
        except Exception:  # noqa: BLE001 - gone or hung: not a disk matter
            return False
        state = await asyncio.to_thread(embedded.status, self.home)
        if state is None:
            return False
        free = await asyncio.to_thread(embedded.free_bytes, self.home)
        if free < embedded.MIN_FREE:
            self._full_pid = state.pid
            raise embedded.disk_full_error(self.home, free)
        if self._full_pid != state.pid and not await asyncio.to_thread(
            embedded.log_says_disk_full, self.home, state.pid
        ):
            return False
        if not restart:  # it failed again right after a restart: this write does not fit
            raise StorageFull(
                f"disk full: the disk holding {self.home} has too little space for this write "
                f"({free} bytes free); it was not stored"
            )
        await asyncio.to_thread(embedded.restart, self.home, state.pid)
        self._full_pid = 0
        await self._recover()
        return True

    async def call(self, fn: Callable[[], Awaitable[T]], *, retries: int = 0) -> T:
        """Run ``fn`` with errors translated.

        On the embedded server a dead server is restarted and ``fn`` retried once. ``retries``
        allows that many more attempts (with backoff) for idempotent calls, such as publishes that
        carry a ``Nats-Msg-Id``, so that they ride out a reconnect or a cluster leader election.
        """
        delay = 0.1
        attempt = 0
        disk_checked = False
        if self.home is not None and not self.nc.is_connected:
            # The embedded server went away: restart it now rather than after a request timeout.
            try:
                await self._recover()
            except Exception as exc:
                raise translate(exc) from exc
        while True:
            try:
                return await fn()
            except BotWireError:
                raise
            except _RETRYABLE as exc:
                if self.home is not None and isinstance(exc, asyncio.TimeoutError):
                    try:
                        if await self._check_disk(restart=not disk_checked):
                            disk_checked = True
                            continue  # restarted a server wedged by a full disk: try again
                    except Exception as err:
                        raise translate(err) from exc
                if attempt >= max(retries, 1 if self.home is not None else 0):
                    raise translate(exc) from exc
                attempt += 1
                if self.home is not None:
                    try:
                        await self._recover()
                    except Exception as rexc:
                        raise translate(rexc) from exc
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            except Exception as exc:
                new = translate(exc)
                if new is exc:
                    raise
                raise new from exc

    # -- streams --------------------------------------------------------------------------------
    async def ensure_stream(self, config: StreamConfig) -> None:
        """Create the stream unless this connection already knows it exists."""
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

        await self.call(run)
        self._ready_streams.add(name)

    # -- publishing -----------------------------------------------------------------------------
    async def publish(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        *,
        idempotent: bool = False,
    ) -> int:
        """Publish to JetStream and wait for the ack; return the stream sequence.

        ``idempotent``: the headers carry a ``Nats-Msg-Id``, so the publish may be retried.
        """

        async def run() -> int:
            msg = await self.request(subject, data, headers, timeout)
            ack = _ack_decoder.decode(msg.data)
            if ack.error is not None:
                _raise_api_error(ack.error)
            return ack.seq

        return await self.call(run, retries=5 if idempotent else 0)

    async def publish_pipelined(
        self, items: Sequence[tuple[str, bytes, Mapping[str, str]]], timeout: float = 5.0, *, idempotent: bool = False
    ) -> list[int]:
        """Publish several messages back to back, then wait for all their acks; their sequences.

        Not atomic: each message is stored or refused on its own (the first error is raised).
        """

        async def run() -> list[int]:
            mux = self._mux or await self._replies()
            futures = []
            for subject, data, headers in items:
                reply, future = mux.expect(timeout)
                futures.append(future)
                await self.nc.publish(subject, data, reply=reply, headers=dict(headers))
            seqs = []
            for future in futures:
                ack = _ack_decoder.decode((await future).data)
                if ack.error is not None:
                    _raise_api_error(ack.error)
                seqs.append(ack.seq)
            return seqs

        return await self.call(run, retries=5 if idempotent else 0)

    async def publish_batch(
        self, subject: str, payloads: Sequence[bytes], headers: Sequence[Mapping[str, str]], timeout: float = 10.0
    ) -> int:
        """Publish ``payloads`` as one atomic batch (all stored or none); return the last sequence."""
        batch_id = self.new_id()
        n = len(payloads)

        async def run() -> int:
            for i, (payload, extra) in enumerate(zip(payloads, headers, strict=True), 1):
                h = dict(extra)
                h["Nats-Batch-Id"] = batch_id
                h["Nats-Batch-Sequence"] = str(i)
                if i < n:
                    await self.nc.publish(subject, payload, headers=h)
                else:
                    h["Nats-Batch-Commit"] = "1"
                    msg = await self.request(subject, payload, h, timeout)
                    ack = _ack_decoder.decode(msg.data)
                    if ack.error is not None:
                        _raise_api_error(ack.error)
                    return ack.seq
            raise AssertionError("empty batch")

        return await self.call(run)

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

        return await self.call(run)

    async def direct_batch(self, stream: str, request: Mapping[str, Any], timeout: float = 10.0) -> Batch:
        """One batch direct get (``batch``, ``seq``, ``next_by_subj``, ``multi_last``, ``no_hdr``...).

        Returns the messages of one reply batch and its end-of-batch figures; page with ``seq``.
        """
        body = msgspec.json.encode({k: v for k, v in request.items() if v is not None})

        async def run() -> Batch:
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

        return await self.call(run)

    async def read_subject(
        self,
        stream: str,
        subject: str,
        *,
        start_seq: int = 1,
        page: int = 1000,
        headers: bool = True,
        known: int | None = None,
    ) -> list[Msg]:
        """Every message on ``subject`` from ``start_seq`` on, in order, by paged batch direct gets,
        however many bytes they hold.

        ``headers=False`` asks the server to leave out per-message headers: about twice as fast for
        long reads, but the messages then carry neither sequence nor time. ``known``: how many
        messages followed ``start_seq`` at some moment before the call; once that many are read,
        all of them are (they have the lowest sequences), which saves the closing request.
        """
        out: list[Msg] = []
        seq = start_seq
        while True:
            req: dict[str, Any] = {"next_by_subj": subject, "seq": seq, "batch": page}
            if not headers:
                req["no_hdr"] = True
            batch = await self.direct_batch(stream, req)
            out.extend(batch.msgs)
            # A reply also ends at the server's byte cap (its max_pending, 64 MiB by default), so
            # fewer messages than asked does not mean the end. With headers the end-of-batch
            # pending count is exact; with no_hdr the server never decrements it (nats-server
            # 2.15), so 0 is still the end but anything else needs the next page: an empty
            # reply (one small round trip) is then the end.
            if not batch.msgs or not batch.last_seq or batch.pending == 0:
                return out
            if known is not None and len(out) >= known:
                return out
            seq = batch.last_seq + 1

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

        return await self.call(run)

    async def subject_counts(self, stream: str, subject_filter: str) -> dict[str, int]:
        """How many messages each subject matching ``subject_filter`` holds (one request per
        100,000 subjects: the server sends at most that many per stream info reply, sorted, and
        nats-py's ``stream_info`` asks for the first page only)."""

        async def run() -> dict[str, int]:
            counts: dict[str, int] = {}
            while True:
                req: dict[str, Any] = {"subjects_filter": subject_filter}
                if counts:
                    req["offset"] = len(counts)
                resp = await self.request(f"$JS.API.STREAM.INFO.{stream}", msgspec.json.encode(req), None, 10.0)
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

        return await self.call(run)

    async def purge(self, stream: str, subject: str, *, before_seq: int | None = None) -> None:
        """Remove the messages on ``subject`` (below ``before_seq`` when given)."""

        async def run() -> None:
            req: dict[str, Any] = {"filter": subject}
            if before_seq is not None:
                req["seq"] = before_seq
            resp = await self.request(f"$JS.API.STREAM.PURGE.{stream}", msgspec.json.encode(req), None, 10.0)
            info = msgspec.json.decode(resp.data)
            if "error" in info:
                err = info["error"]
                raise nats.js.errors.APIError(
                    code=err.get("code"), err_code=err.get("err_code"), description=err.get("description")
                )

        await self.call(run)


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


def pinned_context(ca_file: str) -> ssl.SSLContext:
    """A TLS context that trusts ``ca_file`` alone (and checks the server's name or IP against it)."""
    return ssl.create_default_context(cafile=ca_file)


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
    if connecting.done() and not connecting.cancelled() and connecting.exception() is not None:
        raise translate(connecting.exception())  # type: ignore[arg-type]
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


async def _close_at_shutdown(pool: dict[ConnectOptions, Connection]) -> AsyncGenerator[None, None]:
    """Suspended for the life of its loop; closes the loop's pool when the loop shuts down.

    A connection references its loop, so the weak pool alone never lets a finished loop go: with
    ``asyncio.run`` per request and objects left open, each run leaked one socket (30 runs, 30
    sockets; ``gc.collect()`` freed none). An event loop closes the async generators it started
    before it closes (``asyncio.run`` calls ``shutdown_asyncgens``), which runs this ``finally``.
    """
    try:
        yield
    finally:
        loop = asyncio.get_running_loop()  # the loop shutting down: forget it, so it can be freed
        _pools.pop(loop, None)
        _locks.pop(loop, None)
        _closers.pop(loop, None)  # this generator keeps the loop's finalizer hook, hence the loop
        conns = list(pool.values())
        pool.clear()
        for conn in conns:
            conn.refs = 0
            await conn.close()


async def _pool_of(loop: asyncio.AbstractEventLoop) -> dict[ConnectOptions, Connection]:
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = {}
        closer = _close_at_shutdown(pool)
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
