"""The raw JetStream API the cores use, with typed (msgspec) responses: the ``Connection``.

It adds what nats-py 2.16 does not offer: batch and multi-last direct gets, atomic batch
publishes, headers-only pulls, paged subject counts, and requests over one shared reply inbox.
Every method runs through ``RetryingConnection.call`` and honours its ``timeout``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import Placement, StreamConfig

from ..errors import OutcomeUnknown, ServerUnavailable
from ..settings import ConnectOptions
from .errors import ApiError, StreamNotFound, SubjectPurged, raise_api_error
from .replies import Batch, parse_headers
from .retry import READ_FIRST, RetryingConnection, ServerRestart, _Busy, _NoPeers, _Unacknowledged, _Write

__all__ = ["Connection"]

T = TypeVar("T")

# API errors of a publish that mean nothing was stored and the same publish may be sent again:
# 10167 the stream's ingest queue is full (429), 10210 too many atomic batches in flight (429),
# 10176 an atomic batch lost a staged message (dropped by a full ingest queue) or timed out.
_BUSY_CODES = frozenset({10167, 10210, 10176})
_WRONG_LAST = 10071
_WRONG_LAST_MSG_ID = 10070
_DUPLICATE_IN_BATCH = 10201
_NO_PEERS = 10005  # "no suitable peers for placement"
_STREAM_NOT_FOUND = 10059
_GONE_CHECK = 0.25  # seconds the check for a deleted stream waits (a call's retries go on after it)
# a read of a stream on a cluster unanswered this long asks whether the stream was deleted
_GONE_AFTER = 1.0
_LEADER_TRY = 1.0  # seconds a read from the stream leader waits before it is asked again


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: ApiError | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


class _ConsumerCreated(msgspec.Struct):
    """A ``$JS.API.CONSUMER.CREATE`` response (the fields we use)."""

    name: str = ""
    num_pending: int = 0
    error: ApiError | None = None


class _StreamState(msgspec.Struct):
    subjects: dict[str, int] | None = None
    last_seq: int = 0


class _StreamInfo(msgspec.Struct):
    """A ``$JS.API.STREAM.INFO`` response with ``subjects_filter`` (one page of subject counts)."""

    state: _StreamState | None = None
    total: int = 0
    error: ApiError | None = None


class _Purged(msgspec.Struct):
    """A ``$JS.API.STREAM.PURGE`` response."""

    success: bool = False
    purged: int = 0
    error: ApiError | None = None


class _StoredMsg(msgspec.Struct):
    """The ``message`` of a ``$JS.API.STREAM.MSG.GET`` response (``hdrs`` and ``data`` are
    base64 in the JSON: msgspec decodes them into bytes)."""

    subject: str
    seq: int
    hdrs: bytes = b""
    data: bytes = b""
    time: str = ""


class _MsgGot(msgspec.Struct):
    message: _StoredMsg | None = None
    error: ApiError | None = None


_consumer_decoder = msgspec.json.Decoder(_ConsumerCreated)
_stored_decoder = msgspec.json.Decoder(_MsgGot)
_info_decoder = msgspec.json.Decoder(_StreamInfo)
_purge_decoder = msgspec.json.Decoder(_Purged)


def _retrieved(future: asyncio.Future[Msg]) -> None:
    """Mark a reply future's failure as seen (a done callback)."""
    if not future.cancelled():
        future.exception()


class Connection(RetryingConnection):
    """A NATS connection with JetStream, shared through ``pool.acquire``/``pool.release``."""

    def __init__(self, opts: ConnectOptions, nc: NATS, restart: ServerRestart | None) -> None:
        super().__init__(opts, nc, restart)
        # subject -> sequence of this connection's last acknowledged write to it (capped, oldest
        # dropped): a direct get answered older by a replica still behind is re-read from the
        # stream leader (reads-your-writes on a cluster)
        self._written_subj: dict[str, int] = {}
        # stream -> the highest sequence of this connection's acknowledged writes to it: a listing
        # answered by a replica whose last sequence is below it is read again
        self._written_stream: dict[str, int] = {}
        # subjects this connection purged (a clear), whose reads ask the leader what is left: a
        # purge takes no sequence, so a replica's last sequence cannot tell whether it applied it
        self._cleared: dict[str, None] = {}
        self.leader_reads = opts.reads == "leader"
        # stream -> the config ``ensure_stream`` made sure of: a write finding no stream for its
        # subject makes it again (``_made_again``)
        self._made: dict[str, StreamConfig] = {}

    @property
    def clustered(self) -> bool:
        """Whether the server is part of a cluster (its INFO names one): only there can a replica
        answer a read with an older state than the stream leader's."""
        return bool(self.nc._server_info.get("cluster"))

    def _wrote_subject(self, subject: str, seq: int, stream: str = "") -> None:
        if not self.clustered:  # only replicas can answer a read older
            return
        self._written_subj.pop(subject, None)
        self._written_subj[subject] = seq
        self._cleared.pop(subject, None)  # a replica holding seq applied the purge before it
        if len(self._written_subj) > 4096:
            del self._written_subj[next(iter(self._written_subj))]
        if stream and seq > self._written_stream.get(stream, 0):
            self._written_stream[stream] = seq

    def stream_floor(self, stream: str) -> int:
        """The highest sequence of this connection's acknowledged writes to ``stream`` on a
        cluster (0: none known): a read answered at an older last sequence missed one of them."""
        return self._written_stream.get(stream, 0)

    def cleared(self, subject: str) -> None:
        """``subject`` was purged by this connection: its next reads ask the stream leader what is
        left (a lagging replica answered the purged messages for a few ms: tests/test_cluster_reads.py)."""
        self._written_subj.pop(subject, None)
        if not self.clustered:
            return
        self._cleared.pop(subject, None)
        self._cleared[subject] = None
        if len(self._cleared) > 4096:
            del self._cleared[next(iter(self._cleared))]

    def checks_with_leader(self, subject: str) -> bool:
        """Whether a read of ``subject`` must be checked against the stream leader: ``?reads=leader``
        on a cluster, or a subject this connection cleared."""
        return self.clustered and (self.leader_reads or subject in self._cleared)

    async def leader_last(self, stream: str, subject: str, timeout: float = 5.0) -> Msg | None:
        """The last message on ``subject`` as the stream leader has it (one request), None when
        the subject holds none."""
        return await self._from_leader(stream, {"last_by_subj": subject}, timeout)

    async def _from_leader(self, stream: str, req: Mapping[str, Any], timeout: float) -> Msg | None:
        """``_leader_get`` asked again every ``_LEADER_TRY`` seconds within ``timeout``: a leader
        that just died answers nothing, and neither do the others until they notice (they then
        answer 503 while they elect one), so one request waiting the whole timeout would fail a
        read that a new leader could answer (tests/test_cluster_reads.py)."""
        per_try = min(timeout, _LEADER_TRY)
        return await self._read(stream, lambda: self._leader_get(stream, req, per_try), timeout, _none)

    def written(self, subject: str) -> int | None:
        """The sequence of this connection's last acknowledged write to ``subject`` on a cluster
        (None: none known, or a single server, where every read already sees it)."""
        return self._written_subj.get(subject)

    def forget_written(self, subject: str) -> None:
        """Forget the write ``written`` returns (the subject was purged: no read can see it)."""
        self._written_subj.pop(subject, None)

    # -- streams --------------------------------------------------------------------------------
    def cluster_size(self) -> int:
        """1 on a single server, 3 on a cluster (the server's INFO names a ``cluster``): the
        count of replicas a new namespace gets unless set.

        Not the gossiped ``connect_urls``: they list only the servers up right now, so a 3-node
        cluster with one node down looked like 2 and namespaces first used then were created with
        2 replicas for good (measured: tests/test_qa_cluster.py). A 2-node cluster (cannot keep a
        JetStream quorum through a loss anyway) sets ``replicas=2``; unset, the namespace's
        creation raises ``ServerUnavailable`` saying to ask for fewer replicas."""
        return 3 if self.nc._server_info.get("cluster") else 1

    def placed(self, config: StreamConfig) -> StreamConfig:
        """``config`` with the replica count and placement tags of this connection's settings.

        A count given by the caller (``replicas=``) is kept; None takes ``?replicas=N`` /
        ``BOTWIRE_REPLICAS``, else 3 on a cluster (a Raft group that keeps every acknowledged
        write through the loss of any one server), else 1.
        """
        replicas = config.num_replicas or self.opts.replicas or self.cluster_size()
        placement = Placement(tags=list(self.opts.tags)) if self.opts.tags else config.placement
        return dataclasses.replace(config, num_replicas=replicas, placement=placement)

    async def ensure_stream(self, config: StreamConfig, timeout: float = 5.0) -> bool:
        """Create the stream unless this connection already knows it exists (within ``timeout``),
        replicated as ``placed`` says (a stream that exists keeps its own replicas and placement);
        True when this call found it with another config (e.g. retention limits set on it)."""
        name = config.name
        assert name is not None
        if name in self._ready_streams:
            return False
        differs = False
        self._made[name] = config
        config = self.placed(config)

        async def run() -> None:
            nonlocal differs
            # One request: creating a stream that exists with the same config is a no-op, and
            # one that exists with another config (10058) is used as it is.
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code == _NO_PEERS:  # a server down or rejoining (measured right after a restart)
                    raise _NoPeers(exc.description or "no suitable peers for placement") from exc
                if exc.err_code != 10058:
                    raise
                differs = True
            except nats.js.errors.APIError as exc:
                # 10049 "error creating store for stream": what a full disk gives (measured)
                if exc.err_code == 10049 and self.restart is not None:
                    full = await self.restart.store_full()
                    if full is not None:
                        raise full from exc
                raise

        await self.call(run, timeout=timeout)
        self._ready_streams.add(name)
        return differs

    async def _deleted(self, stream: str, timeout: float) -> bool:
        """Whether the server says ``stream`` no longer exists (one stream info request, waiting
        ``_GONE_CHECK`` at most; False when it exists or does not answer in time). Asked only after
        a request found no responder, never on the way of a call that succeeds. When it is gone,
        this connection forgets it made it (a ``Memory`` opened again makes it at once) and the
        sequences it wrote there (the stream made again starts them anew)."""
        try:
            resp = await self.request(f"$JS.API.STREAM.INFO.{stream}", b"", None, min(timeout, _GONE_CHECK))
            info = _info_decoder.decode(resp.data)
        except (nats.errors.Error, asyncio.TimeoutError, msgspec.DecodeError):
            return False
        if info.error is None or info.error.err_code != _STREAM_NOT_FOUND:
            return False
        self._forget_stream(stream)
        return True

    def _forget_stream(self, stream: str) -> None:
        """``stream`` is gone (deleted by another client): not made, no writes of this connection."""
        self._ready_streams.discard(stream)
        self._written_stream.pop(stream, None)
        config = self._made.get(stream)
        patterns = (config.subjects or []) if config is not None else []
        for subject in [s for s in self._written_subj if any(_matches(p, s) for p in patterns)]:
            del self._written_subj[subject]
        for subject in [s for s in self._cleared if any(_matches(p, s) for p in patterns)]:
            del self._cleared[subject]

    async def _write_request(
        self, subject: str, data: bytes, headers: Mapping[str, str], timeout: float, write: _Write, gone: _Gone
    ) -> Msg:
        """One try of a write's request; on no responder or no acknowledgement, ``gone`` asks
        whether another client deleted the subject's stream (and makes it again) before the
        error goes to ``call``, which tries again."""
        try:
            return await self.request(subject, data, headers, timeout, write)
        except nats.errors.NoRespondersError:
            await gone.no_responders(self, subject, timeout)
            raise
        except _Unacknowledged:
            await gone.unanswered(self, subject, timeout)
            raise

    async def _made_again(self, subject: str, timeout: float) -> None:
        """After a write to ``subject`` found no responder: when the subject belongs to a stream
        this connection made sure of (``ensure_stream``) and the server says that stream no longer
        exists (another client deleted it: ``nats stream rm``, ``js.delete_stream``), make it again,
        with the config it was made with, as the first write to a new namespace does; ``call`` then
        sends the write again, and it is stored there. Before, the connection took the stream as
        made, and every write to it was retried until its timeout, then ``OutcomeUnknown``.

        No responder also means, on a cluster, a stream electing its leader: the stream then exists
        and nothing is done. The check waits ``_GONE_CHECK`` at most; a check that fails changes
        nothing (the write is retried as before)."""
        config = next((c for c in self._made.values() if any(_matches(p, subject) for p in c.subjects or ())), None)
        if config is None or config.name is None:
            return
        if await self._deleted(config.name, timeout):
            await self.ensure_stream(config, timeout)

    async def _read(self, stream: str, fn: Callable[[], Awaitable[T]], timeout: float, empty: Callable[[], T]) -> T:
        """``call(fn)`` for a read of ``stream``; ``empty()`` when the stream is one this connection
        made (``ensure_stream``) and another client deleted it since (``nats stream rm``,
        ``js.delete_stream``): the answer of a namespace never written (None, [], 0), at once.

        The server answers a direct get of a stream that does not exist with no responder (the
        same as a cluster electing the stream's leader: ``_deleted`` then asks, once per read) and
        an API request (stream info, ``MSG.GET``, consumer create, purge) with 10059
        (``StreamNotFound``). Before, the first failed each read with ``ServerUnavailable`` at its
        timeout and the second at once with a bare ``BotWireError``. A read that succeeds pays
        nothing more. Its next write makes the stream again (``_made_again``)."""
        if stream not in self._made:
            return await self.call(fn, timeout=timeout)
        checked = False
        clustered = self.clustered

        async def once() -> T:
            nonlocal checked
            if clustered:
                return await self._unless_deleted(stream, fn, timeout)
            try:
                return await fn()
            except nats.errors.NoRespondersError as exc:
                if checked or type(exc) is not nats.errors.NoRespondersError:
                    raise
                checked = True
                if await self._deleted(stream, timeout):
                    raise StreamNotFound(f"stream {stream} was deleted") from exc
                raise

        try:
            return await self.call(once, timeout=timeout)
        except StreamNotFound:
            self._forget_stream(stream)
            return empty()

    async def _unless_deleted(self, stream: str, fn: Callable[[], Awaitable[T]], timeout: float) -> T:
        """``fn()`` (one try of a read of ``stream`` on a cluster), ``StreamNotFound`` when it found
        no responder, or is still unanswered after ``_GONE_AFTER`` s (then every ``_GONE_AFTER`` s),
        and the servers say the stream is gone. A node that is stopped (SIGSTOP, a frozen VM) keeps
        the interest its replica had in the stream's subjects, so a read of the deleted stream sent
        to it got no answer at all, and waited out its timeout (tests/test_namespace_deleted.py).
        A timer, no task, unless a read is slow (as ``_attempt``'s probe)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        gone: list[bool] = []
        probes: list[asyncio.Future[None]] = []
        finished = False

        async def probe() -> None:
            if await self._deleted(stream, timeout):
                if not finished:
                    gone.append(True)
                    task.cancel()
            elif not finished:
                timers.append(loop.call_later(_GONE_AFTER, arm))

        def arm() -> None:
            probes.append(asyncio.ensure_future(probe()))

        timers = [loop.call_later(_GONE_AFTER, arm)]
        try:
            return await fn()
        except nats.errors.NoRespondersError as exc:
            if type(exc) is not nats.errors.NoRespondersError or not await self._deleted(stream, timeout):
                raise
            raise StreamNotFound(f"stream {stream} was deleted") from exc
        except asyncio.CancelledError:
            if not gone or task.uncancel() > 0:  # cancelled by someone else too
                raise
            raise StreamNotFound(f"stream {stream} was deleted") from None
        finally:
            finished = True
            for timer in timers:
                timer.cancel()
            for running in probes:
                running.cancel()

    async def set_max_per_subject(self, stream: str, n: int, timeout: float = 5.0) -> None:
        """Set the stream's ``max_msgs_per_subject`` to ``n`` unless it is ``n`` already.

        The raw stream config is read and written back with only that field changed, so fields
        this nats-py does not model are kept as they are.
        """

        def result(data: bytes) -> dict[str, Any]:
            info: dict[str, Any] = msgspec.json.decode(data)
            if info.get("error"):
                raise_api_error(info["error"])
            return info

        async def run() -> None:
            config = result((await self.request(f"$JS.API.STREAM.INFO.{stream}", b"", None, timeout)).data)["config"]
            if config.get("max_msgs_per_subject") == n:
                return
            config["max_msgs_per_subject"] = n
            body = msgspec.json.encode(config)
            result((await self.request(f"$JS.API.STREAM.UPDATE.{stream}", body, None, timeout)).data)

        await self.call(run, timeout=timeout)

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
        on_sent: Callable[[], None] | None = None,
    ) -> int:
        """Publish to JetStream and wait for the ack; return the stream sequence.

        Carries a ``Nats-Msg-Id`` and is re-sent with it after a lost connection (see the module
        docstring). A conditional publish (``Nats-Expected-Last-Subject-Sequence``) refused on a
        re-send is read back: found, its sequence is returned; not found, ``Conflict`` is raised.
        ``on_sent`` is called right after each try is handed to nats-py (before its ack).
        """
        h = self._ids(headers)
        expected = h.get("Nats-Expected-Last-Subject-Sequence")
        write = _Write(what, advice, on_sent)
        tries = 0
        gone = _Gone()

        async def run() -> int:
            nonlocal tries
            tries += 1
            msg = await self._write_request(subject, data, h, timeout, write, gone)
            ack = _ack_decoder.decode(msg.data)
            if ack.error is not None:
                if tries > 1 and expected is not None and ack.error.err_code == _WRONG_LAST:
                    found = await self._landed(subject, h["Nats-Msg-Id"], timeout)
                    if found is not None:
                        self._wrote_subject(subject, found, ack.stream)
                        return found
                if ack.error.err_code in _BUSY_CODES:
                    raise _Busy  # dropped by a full ingest queue: nothing stored
                raise_api_error(ack.error)
            self._wrote_subject(subject, ack.seq, ack.stream)
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
        gone = _Gone()

        async def run() -> list[int]:
            mux = self._mux or await self._replies()
            waiting = []
            for subject, data, headers in prepared:
                reply, future = mux.expect(timeout)
                # Only the first failed ack is raised; without this, the failures of the others
                # (a lost connection fails them all) were logged "Future exception was never
                # retrieved" (seen in `python -m chaos --only lameduck`).
                future.add_done_callback(_retrieved)
                waiting.append((reply, future))
                await self.nc.publish(subject, data, reply=reply, headers=headers)
                write.sent = True
            try:
                await self._acks_or_resend(mux, waiting, write)
            except _Unacknowledged:
                await gone.unanswered(self, prepared[0][0], timeout)
                raise
            seqs = []
            stream = ""
            for (subject, _, _), (_, future) in zip(prepared, waiting, strict=True):
                msg = await future
                if not msg.data and msg.headers and msg.headers.get("Status") == "503":
                    # no responders: the stream had no leader for a moment (a cluster's election),
                    # or another client deleted it
                    await gone.no_responders(self, subject, timeout)
                    raise nats.errors.NoRespondersError
                ack = _ack_decoder.decode(msg.data)
                if ack.error is not None:
                    raise_api_error(ack.error)
                seqs.append(ack.seq)
                stream = ack.stream
            for (subject, _, _), seq in zip(prepared, seqs, strict=True):
                self._wrote_subject(subject, seq, stream)
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
        gone = _Gone()

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
            msg = await self._write_request(subject, payloads[-1], hs[-1], timeout, write, gone)
            ack = _ack_decoder.decode(msg.data)
            if ack.error is None:
                self._wrote_subject(subject, ack.seq, ack.stream)
                return ack.seq
            code = ack.error.err_code
            if tries > 1 and (code == _DUPLICATE_IN_BATCH or (code == _WRONG_LAST and expected is not None)):
                found = await self._landed(subject, hs[-1]["Nats-Msg-Id"], timeout)
                if found is not None:
                    self._wrote_subject(subject, found, ack.stream)
                    return found
            if code in _BUSY_CODES:
                raise _Busy  # nothing stored: send it again after a pause
            raise_api_error(ack.error)

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
            raise_api_error(ack.error)
        raise OutcomeUnknown(f"a read-back probe on {subject} was stored (seq {ack.seq}); please report this")

    # -- reading --------------------------------------------------------------------------------
    async def direct_get_last(self, stream: str, subject: str, timeout: float = 5.0) -> Msg | None:
        """The last message on ``subject`` (one request), or None when the subject is empty."""

        mine = self._written_subj.get(subject)
        if self.checks_with_leader(subject):
            # ?reads=leader: as the stream leader has it (the one server every acknowledged write
            # reached before its ack); the direct form lets a replica a few ms behind answer
            return await self.leader_last(stream, subject, timeout)

        async def run() -> Msg | None:
            # The subject form; any replica answers. ADR-53's min_last_seq was measured to have no
            # effect here (v2.15 let a lagging replica answer older) and would turn every read into
            # an error once the stream were re-created below it: the Nats-Sequence check instead.
            msg = await self.request(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"", None, timeout)
            hdr = msg.headers
            if hdr is not None and "Status" in hdr:
                if hdr["Status"] == "404":
                    if mine is not None:  # a replica without this connection's own write: the leader
                        # (the first set of a key read back as missing, so a delete found nothing)
                        return await self._leader_get_last(stream, subject, min(timeout, _LEADER_TRY))
                    return None
                if hdr["Status"] == "503":  # no responders: a replica that just died (retried)
                    raise nats.errors.NoRespondersError
                raise nats.js.errors.APIError(code=int(hdr["Status"]), description=hdr.get("Description", ""))
            if mine is not None and hdr is not None and int(hdr.get("Nats-Sequence", "0")) < mine:
                # a replica behind this connection's own acked write answered: ask the leader
                return await self._leader_get_last(stream, subject, min(timeout, _LEADER_TRY))
            return msg

        return await self._read(stream, run, timeout, _none)

    async def leader_holds(self, stream: str, subject: str, seq: int, timeout: float = 5.0) -> bool:
        """Whether the stream leader still holds the message at ``seq`` on ``subject`` (one
        ``$JS.API.STREAM.MSG.GET``): False once it was purged, rolled up or expired."""

        async def run() -> bool:
            msg = await self._leader_get(stream, {"seq": seq}, min(timeout, _LEADER_TRY))
            return msg is not None and msg.subject == subject

        return await self._read(stream, run, timeout, _false)

    async def _leader_get_last(self, stream: str, subject: str, timeout: float) -> Msg | None:
        """The last message on ``subject`` as the stream leader has it (see ``_leader_get``)."""
        return await self._leader_get(stream, {"last_by_subj": subject}, timeout)

    async def leader_count_and_first(self, stream: str, subject: str, timeout: float = 5.0) -> tuple[int, Msg | None]:
        """How many messages ``subject`` holds and its first one (None: none), both as the stream
        leader has them: its stream info (subjects filter) and a ``$JS.API.STREAM.MSG.GET``, sent
        back to back in one write and awaited together (one round trip; two requests through
        ``asyncio.gather`` made two tasks and two ``call``s). Each try waits ``_LEADER_TRY`` at
        most, as ``_from_leader``'s."""
        info_body = msgspec.json.encode({"subjects_filter": subject})
        get_body = msgspec.json.encode({"next_by_subj": subject, "seq": 1})
        per_try = min(timeout, _LEADER_TRY)

        async def run() -> tuple[int, Msg | None]:
            mux = self._mux or await self._replies()
            info_reply, info_future = mux.expect(per_try)
            get_reply, get_future = mux.expect(per_try)
            try:
                await self.nc.publish(f"$JS.API.STREAM.INFO.{stream}", info_body, reply=info_reply)
                await self.nc.publish(f"$JS.API.STREAM.MSG.GET.{stream}", get_body, reply=get_reply)
                info_msg = await info_future
                got = await get_future
            finally:
                mux.give_up(info_reply, info_future)
                mux.give_up(get_reply, get_future)
            for reply in (info_msg, got):
                hdr = reply.headers
                if hdr is not None and hdr.get("Status") == "503" and not reply.data:
                    raise nats.errors.NoRespondersError  # no stream leader for a moment (retried)
            info = _info_decoder.decode(info_msg.data)
            if info.error is not None:
                raise_api_error(info.error)
            counts = (info.state.subjects if info.state else None) or {}
            return counts.get(subject, 0), self._leader_msg(stream, got.data)

        return await self._read(stream, run, timeout, _no_count)

    async def _leader_get(self, stream: str, req: Mapping[str, Any], timeout: float) -> Msg | None:
        """``$JS.API.STREAM.MSG.GET`` (answered by the stream leader only) as a direct-get ``Msg``."""
        body = msgspec.json.encode(req)
        reply = await self.request(f"$JS.API.STREAM.MSG.GET.{stream}", body, None, timeout)
        return self._leader_msg(stream, reply.data)

    def _leader_msg(self, stream: str, data: bytes) -> Msg | None:
        """A ``$JS.API.STREAM.MSG.GET`` reply as a direct-get ``Msg`` (None: no message): its
        headers parsed as nats-py parses a direct get's (``replies.parse_headers``)."""
        got = _stored_decoder.decode(data)
        if got.error is not None or got.message is None:
            error = got.error or ApiError(description="no message in the reply")
            if error.code == 404:
                return None
            # A 503 ("JetStream system temporarily unavailable": no stream leader for a moment, seen
            # as a frozen node resumed under CI load) as nats-py raises it, ServiceUnavailableError,
            # which ``call`` retries within the deadline; a plain APIError failed the read at once.
            unavailable = error.code == 503
            kind = nats.js.errors.ServiceUnavailableError if unavailable else nats.js.errors.APIError
            raise kind(code=error.code, err_code=error.err_code, description=error.description)
        m = got.message
        headers = parse_headers(m.hdrs) if m.hdrs else {}
        headers["Nats-Sequence"] = str(m.seq)
        headers["Nats-Subject"] = m.subject
        headers["Nats-Stream"] = stream
        if m.time:
            headers["Nats-Time-Stamp"] = m.time
        return Msg(self.nc, subject=m.subject, data=m.data, headers=headers)

    async def direct_get_seq(self, stream: str, seq: int, timeout: float = 5.0) -> Msg | None:
        """The message at ``seq`` (one request; no pending count, so the server walks nothing),
        or None when there is none."""

        async def run() -> Msg | None:
            body = msgspec.json.encode({"seq": seq})
            return _found(await self.request(f"$JS.API.DIRECT.GET.{stream}", body, None, timeout))

        return await self._read(stream, run, timeout, _none)

    async def direct_batch_and_get(
        self, stream: str, request: Mapping[str, Any], seq: int, timeout: float = 5.0
    ) -> tuple[Batch, Msg | None]:
        """A batch direct get (as ``direct_batch``) and the message at ``seq`` (as
        ``direct_get_seq``), sent back to back in one write and awaited together: one round trip,
        and no task per request (``asyncio.gather`` of the two calls made two tasks and ran
        ``call`` twice: measured ~25 µs more per read under load)."""
        subject = f"$JS.API.DIRECT.GET.{stream}"
        body = msgspec.json.encode({k: v for k, v in request.items() if v is not None})
        get_body = msgspec.json.encode({"seq": seq})

        async def run() -> tuple[Batch, Msg | None]:
            mux = self._mux or await self._replies()
            reply, collector = mux.expect_batch(timeout)
            get_reply, future = mux.expect(timeout)
            try:
                await self.nc.publish(subject, body, reply=reply)
                await self.nc.publish(subject, get_body, reply=get_reply)
                await collector.done_future
                got = await future
            finally:
                mux.forget(reply)
                mux.give_up(get_reply, future)
            hdr = got.headers
            if hdr is not None and hdr.get("Status") == "503" and not got.data:
                raise nats.errors.NoRespondersError
            return collector.batch, _found(got)

        return await self._read(stream, run, timeout, _no_batch_and_get)

    async def direct_batch(self, stream: str, request: Mapping[str, Any], timeout: float = 10.0) -> Batch:
        """One batch direct get (``batch``, ``seq``, ``next_by_subj``, ``multi_last``, ``no_hdr``...).

        Returns the messages of one reply batch and its end-of-batch figures; page with ``seq``.
        """
        body = msgspec.json.encode({k: v for k, v in request.items() if v is not None})
        return await self._read(stream, lambda: self._direct_batch_once(stream, body, timeout), timeout, _no_batch)

    async def multi_last_from(self, stream: str, request: Mapping[str, Any], floor: int, timeout: float) -> Batch:
        """The first reply of a multi-last get (``request`` without ``up_to_seq``) from a server
        holding the stream up to at least sequence ``floor`` (its ``up_to_seq`` says where it is).

        Any replica answers a direct get, and one a few ms behind listed a key just deleted, or
        left out a conversation just written (tests/test_cluster_reads.py); it is asked again
        (pausing 2 ms, doubling to 50 ms) within ``timeout``, then ``ServerUnavailable``; the fourth
        try first checks the floor against the leader's last sequence (``_floor_at_leader``). An empty
        reply carries no sequence: taken as it is after 8 tries (the subjects were purged since).
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        pause = 0.002
        tries = 0
        while True:
            batch = await self.direct_batch(stream, request, timeout)
            tries += 1
            if not floor or not self.clustered or batch.up_to_seq >= floor or (not batch.msgs and tries >= 8):
                return batch
            if tries == 4:  # ~15 ms behind: is the floor still below the leader's last sequence?
                floor = await self._floor_at_leader(stream, floor, timeout)
                continue
            if loop.time() + pause >= end:
                raise ServerUnavailable(
                    f"the servers answering reads of {stream} did not reach sequence {floor} within {timeout} s"
                )
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.05)

    async def _floor_at_leader(self, stream: str, floor: int, timeout: float) -> int:
        """``floor`` lowered to the stream leader's last sequence (stream info is answered by the
        leader), forgetting this connection's writes above it: a stream deleted and created again
        (by an operator, another process) starts its sequences anew, and a floor taken from the old
        one failed every listing after the full timeout (tests/test_qa_cluster_reads.py)."""

        async def run() -> int:
            resp = await self.request(f"$JS.API.STREAM.INFO.{stream}", b"", None, timeout)
            info = _info_decoder.decode(resp.data)
            if info.error is not None:
                raise_api_error(info.error)
            return info.state.last_seq if info.state is not None else 0

        last = await self._read(stream, run, timeout, _zero)
        if last < floor:
            if self._written_stream.get(stream, 0) > last:
                del self._written_stream[stream]
            return last
        return floor

    async def _direct_batch_once(self, stream: str, body: bytes, timeout: float) -> Batch:
        # Over the shared reply inbox; the mux times it out (or fails it on a lost connection).
        mux = self._mux or await self._replies()
        reply, collector = mux.expect_batch(timeout)
        try:
            await self.nc.publish(f"$JS.API.DIRECT.GET.{stream}", body, reply=reply)
            await collector.done_future
        finally:
            mux.forget(reply)
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
            # pending count is what is left; with no_hdr the server never decrements it (nats-server
            # 2.15): it is the count from seq on, taken under the same lock as the reply, so a
            # reply holding that many holds everything from seq on.
            if not batch.msgs or not batch.last_seq or batch.pending == 0:
                break
            if not headers and len(batch.msgs) >= batch.pending:
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
            created = _consumer_decoder.decode(resp.data)
            if created.error is not None:
                raise_api_error(created.error)
            name, pending = created.name, created.num_pending
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

        return await self._read(stream, run, timeout, list)

    async def subject_counts(self, stream: str, subject_filter: str, timeout: float = 5.0) -> dict[str, int]:
        """How many messages each subject matching ``subject_filter`` holds (one request per
        100,000 subjects: the server sends at most that many per stream info reply, sorted, and
        nats-py's ``stream_info`` asks for the first page only)."""
        return (await self.subject_counts_at(stream, subject_filter, timeout))[0]

    async def subject_counts_at(
        self, stream: str, subject_filter: str, timeout: float = 5.0
    ) -> tuple[dict[str, int], int]:
        """``subject_counts`` and the stream's last sequence when its first page was answered.

        Stream info is answered by the stream leader, so that sequence covers every write
        acknowledged before the call: a replica's read whose last sequence is below it is behind."""

        async def run() -> tuple[dict[str, int], int]:
            # Pages are offsets into the server's sorted names at the moment of each request, so
            # names leaving the index before the offset meanwhile (purged, an expiry marker gone)
            # would shift names existing all along past it (measured: 977 of 100,000 keys missed
            # while 3,000 earlier ones were purged). Each next page therefore starts at the last
            # name of the previous one, and steps back while its first name sorts after it.
            counts: dict[str, int] = {}
            last: str | None = None
            offset = 0
            back = 1024
            at = 0
            while True:
                req: dict[str, Any] = {"subjects_filter": subject_filter}
                if offset:
                    req["offset"] = offset
                resp = await self.request(f"$JS.API.STREAM.INFO.{stream}", msgspec.json.encode(req), None, timeout)
                info = _info_decoder.decode(resp.data)
                if info.error is not None:
                    raise_api_error(info.error)
                if not at and info.state is not None:
                    at = info.state.last_seq
                page = (info.state.subjects if info.state else None) or {}
                if last is not None and offset and page and min(page) > last:
                    offset = max(0, offset - back)  # names before it left: some were skipped
                    back *= 2
                    continue
                for subject, count in page.items():
                    if last is None or subject > last:
                        counts[subject] = count
                if not page or offset + len(page) >= info.total:
                    return counts, at
                last = max(page) if last is None else max(last, max(page))  # never moves back
                offset += len(page) - 1
                back = 1024

        return await self._read(stream, run, timeout, _no_counts)

    async def purge(
        self, stream: str, subject: str, *, before_seq: int | None = None, timeout: float = 10.0
    ) -> None:
        """Remove the messages on ``subject`` (below ``before_seq`` when given)."""

        async def run() -> None:
            req: dict[str, Any] = {"filter": subject}
            if before_seq is not None:
                req["seq"] = before_seq
            resp = await self.request(f"$JS.API.STREAM.PURGE.{stream}", msgspec.json.encode(req), None, timeout)
            purged = _purge_decoder.decode(resp.data)
            if purged.error is not None:
                raise_api_error(purged.error)

        await self._read(stream, run, timeout, _none)  # a stream deleted meanwhile holds nothing to purge


class _Gone:
    """One write's looks for its stream deleted by another client (``_made_again``): on its first
    try that found no responder, and, re-sent for want of an acknowledgement (``_Unacknowledged``),
    every ``_GONE_AFTER`` s. A stopped node (SIGSTOP) keeps the interest its replica had in the
    deleted stream's subjects, so a write sent to it found no responder never, and was re-sent
    until ``OutcomeUnknown`` at its timeout."""

    __slots__ = ("at", "checked")

    def __init__(self) -> None:
        self.at = -_GONE_AFTER
        self.checked = False

    async def no_responders(self, conn: Connection, subject: str, timeout: float) -> None:
        if not self.checked:
            self.checked = True
            await conn._made_again(subject, timeout)

    async def unanswered(self, conn: Connection, subject: str, timeout: float) -> None:
        now = asyncio.get_running_loop().time()
        if now - self.at >= _GONE_AFTER:
            self.at = now
            await conn._made_again(subject, timeout)


def _none() -> None:
    return None


def _false() -> bool:
    return False


def _zero() -> int:
    return 0


def _no_batch() -> Batch:
    return Batch([], 0, 0)


def _no_batch_and_get() -> tuple[Batch, Msg | None]:
    return Batch([], 0, 0), None


def _no_count() -> tuple[int, Msg | None]:
    return 0, None


def _no_counts() -> tuple[dict[str, int], int]:
    return {}, 0


def _matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject ``pattern`` (``*`` one token, a final ``>`` one or more) covers ``subject``."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(got) == len(want)


def _found(msg: Msg) -> Msg | None:
    """A direct get's reply: the message, None when there is none (404), else the API error."""
    hdr = msg.headers
    if hdr is not None and "Status" in hdr:
        if hdr["Status"] == "404":
            return None
        raise nats.js.errors.APIError(code=int(hdr["Status"]), description=hdr.get("Description", ""))
    return msg
