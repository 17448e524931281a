"""The history materialiser: each conversation of a namespace as contiguous chunks, plus a summary.

The layout and its exact read are ``botwire_stream/nats/materialised.py``. Events are only a
trigger here: for each conversation with pending events, the materialiser reads the raw log from
the last sequence it materialised (``covered``) on, and writes what it found as chunks. So the
chunks are gap-free whatever order events arrive in (redeliveries after a crash come after newer
events), and a redelivered event at or below ``covered`` changes nothing: it is acknowledged.
Events are acknowledged only once their messages are in a chunk; a restart resumes at the ack floor.

Events are held per conversation until it has ``CHUNK`` of them, the consumer is caught up, or
``MAX_HELD`` are held (then all are flushed): catching up on a backlog writes large chunks, and a
caught-up materialiser writes every batch at once (its lag is a batch).

A stalled server (SIGSTOP, a frozen VM, longer than a try's 10 s): every read and write is tried
again until the server answers, as long as this process holds its lease (``Worker.held``), with
the state in memory kept. A write is tried again with the same bytes and the same
``Nats-Msg-Id``s, and nothing after it is written before it is confirmed; so a timed-out try that
the server stores once it goes on lands where the write belonged, and a second copy of it is
dropped by the duplicate window (the mat stream's 2 min: every copy reaches the server after it
resumes). A copy stored beyond the window (its ack lost in a stall longer than that) is harmless:
a chunk identical to one in the chain (``chain`` keeps one chunk per ``prev``), the same summary
again. Dropping the state and resuming from the ack floor instead (tried first) let a late try land
behind the new writes: 14-46 messages left out of a conversation's chunks. A chunk and the summary
written with it may still not both be stored (a stop between them: measured, a SIGKILL mid-flush
of 3 KB messages left 13 of 20 conversations with chunks and no summary); ``_load`` counts such a
conversation again from its chain. Taken over meanwhile,
or told to stop while the server still does not answer, the flush stops half-way (``_Fenced``):
nothing more is written or acknowledged, and the next holder resumes from the ack floor.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar, cast

import msgspec

from botwire_stream import keys
from botwire_stream.errors import HomeNotWritable, ServerNotTrusted, ServerUnavailable
from botwire_stream.nats import materialised as mat
from botwire_stream.nats.materialised import CHUNK_BYTES, LEVELS, MERGE, Chunk, Summary
from botwire_stream.nats.retry import SAFE
from botwire_stream.times import parse_time

from .runtime import Delivery, Source, Worker, _revive, ack_many

__all__ = ["Materialiser"]

T = TypeVar("T")
Write = tuple[str, bytes, Mapping[str, str]]  # subject, body, headers (with its Nats-Msg-Id)

CHUNK: Final = 256  # a conversation's held events that trigger its flush
MAX_HELD: Final = 50_000  # events held (unacknowledged) at most: beyond, every conversation is flushed
_PROBE_EVERY: Final = 1.0  # seconds between looks for a clear, per conversation
_RECHECKS: Final = 20  # looks for the purge of a recorded clear (about 10 s while idle)
_KEPT: Final = 10_000  # conversations whose state is kept in memory between flushes
_PARALLEL: Final = 64  # conversations flushed at once
# Merges per flush at most, fullest first (the rest while idle, or in later flushes): conversations
# written at the same rate fill their level 0 together and merged all in one batch, delaying the
# next one (measured: lag p99 478 ms inside the materialiser at 5k appends/s over 50 conversations).
_MERGES: Final = 8
_TITLE: Final = 80  # characters of the first user message kept as the title
_FULL: Final = CHUNK_BYTES // 2  # a chunk at least this big goes to the top level
_packer = msgspec.msgpack.Encoder()
_ROLLUP: Final = {"Nats-Rollup": "sub"}  # a summary replaces the conversation's previous one
_TIMEOUT: Final = 10.0  # seconds per try of a read or write (tried again while the lease holds)
_WHAT: Final = "materialised write"  # what a write is, in the message of one not confirmed in time
_RETRY_PAUSE: Final = 0.2  # seconds between looks at the lease while the server does not answer
_summary_decoder = msgspec.json.Decoder(Summary)


@dataclass
class _Conv:
    token: str  # the session id's subject tokens
    loaded: bool = False
    covered: int = 0  # the last raw sequence materialised
    counts: list[int] = field(default_factory=lambda: [0] * LEVELS)
    summary: Summary | None = None
    first_seq: int | None = None  # the first raw sequence the chain and summary count
    held: list[Delivery] = field(default_factory=list)
    events: list[Delivery] = field(default_factory=list)  # summaries and clears: never messages
    recheck: int = 0  # looks left for a recorded clear's purge (it is recorded just before it)
    probed: float = -_PROBE_EVERY  # when its first sequence was last looked up (monotonic)
    recount: bool = False  # its summary was counted again from the chain (``_load``): to be written


class _Fenced(Exception):
    """The lease is lost (taken over, or a stop while the server does not answer) in the middle of
    a flush: this process writes and acknowledges nothing more (the next holder resumes)."""


class Materialiser(Worker):
    """``botwire consume materialise -n NS``: keeps NS's conversations materialised."""

    kind = "materialise"
    batch = 1000
    raw = True  # measured: half its time went to nats-py's Msg, header parse and fetch per event
    max_ack_pending = MAX_HELD + 1000

    def __init__(self, namespace: str, *, name: str | None = None) -> None:
        super().__init__([namespace], ["chat"], name=name)
        self.namespace = namespace
        self._convs: dict[str, _Conv] = {}
        self._held = 0
        self._aborted = False  # a flush stopped half-way (_Fenced): the state in memory is not written
        self._stalled = False  # a read or write is being tried again (said once on stderr)

    async def setup(self) -> None:
        await self.conn.ensure_stream(mat.mat_config(self.namespace))

    async def made_again(self, source: Source) -> None:
        """The log was deleted and made again: what is materialised of the old one (chunks,
        summaries) goes, and so does what this process holds of it (never acknowledged now).
        Before, the old summaries stayed listed (``sessions()``) and the old chunks were read
        as the new log's messages (its sequences start anew)."""
        await self.conn.purge(mat.mat_stream(self.namespace), f"botwire.{self.namespace}.mat.>", timeout=10.0)
        self._convs.clear()
        self._held = 0

    async def handle(self, source: Source, msgs: list[Delivery], caught_up: bool) -> None:
        if self._aborted:
            return  # stopping: redelivered to the next holder
        for m in msgs:
            is_event, token = source.token(m)
            conv = self._convs.get(token)
            if conv is None:
                conv = self._convs[token] = _Conv(token)
            (conv.events if is_event else conv.held).append(m)
        self._held += len(msgs)
        try:
            if caught_up or self._held >= MAX_HELD:
                await self.flush_all()
            else:
                await self._flush([c for c in self._convs.values() if len(c.held) >= CHUNK])
        except _Fenced:
            self._aborted = True

    async def idle(self) -> None:
        if self._aborted:
            return
        try:
            await self.flush_all()
            await self._flush([c for c in self._convs.values() if c.recheck and not c.held])
            await self._merges(len(self._convs))
        except _Fenced:
            self._aborted = True

    async def finish(self) -> None:
        if self.fenced or self._aborted:  # taken over: the new holder materialises what is held here
            return
        try:
            await self.flush_all()
            await self._merges(len(self._convs))
        except _Fenced:
            self._aborted = True

    async def flush_all(self) -> None:
        await self._flush([c for c in self._convs.values() if c.held or c.events])

    async def _surely(self, op: Callable[[], Awaitable[T]]) -> T:
        """``op`` tried again until the server answers, while this process holds its lease (see
        "A stalled server" above): a read, or a write whose every try sends the same bytes with
        the same ``Nats-Msg-Id``s. ``_Fenced`` once the lease is taken over, or on a stop while
        the server does not answer."""
        while True:
            try:
                got = await op()
            except (ServerNotTrusted, HomeNotWritable):
                raise
            except ServerUnavailable as exc:  # no answer within _TIMEOUT (OutcomeUnknown: maybe stored)
                if not self._stalled:  # one line per stall, not one per conversation and try
                    self._stalled = True
                    print(f"materialise: {exc} (trying again while this process holds its lease)", file=sys.stderr)
            else:
                if self._stalled:
                    self._stalled = False
                    print("materialise: the server answers again", file=sys.stderr)
                return got
            await asyncio.sleep(_RETRY_PAUSE)
            lost: float | None = None
            while not await self.held():  # cannot tell (the server still stalls), or taken over
                if (self._lease is not None and self._lease.taken) or self.stopping.is_set():
                    raise _Fenced
                # a dead embedded server is revived here (as the runtime's may_write does): the
                # runtime waits for this batch meanwhile, and the lease is renewed only once it is
                lost = await _revive(self.conn, lost)
                await asyncio.sleep(_RETRY_PAUSE)

    async def _store(self, writes: list[Write]) -> list[int]:
        """Publish ``writes`` back to back (their message ids kept: a try again stores none twice)."""
        return await self.conn.publish_pipelined(writes, _TIMEOUT, what=_WHAT, advice=SAFE)

    def _id(self, headers: Mapping[str, str] | None = None) -> dict[str, str]:
        """``headers`` with a new ``Nats-Msg-Id``: a write keeps it through all its tries."""
        return {**(headers or {}), "Nats-Msg-Id": self.conn.new_id()}

    async def _flush(self, convs: list[_Conv]) -> None:
        for i in range(0, len(convs), _PARALLEL):
            # The usual write of each conversation (its new chunk and summary) is collected, and
            # the group's writes are published back to back with their acks awaited together: one
            # call instead of two per conversation (measured: the per-write call was the largest
            # part of the materialiser's time at 5k appends/s). Acknowledged once all are stored.
            writes: list[Write] = []
            done = await _all([self._flush_one(c, writes) for c in convs[i : i + _PARALLEL]])
            if writes:
                await self._surely(lambda: self._store(writes))
            handled = [m for ms in done for m in ms]
            await ack_many(handled)
            self._held -= len(handled)
            if len(self._convs) > _KEPT:  # the state is in the stream: reloaded when written again
                for token in [t for t, c in self._convs.items() if not c.held][: len(self._convs) // 2]:
                    del self._convs[token]
        await self._merges(_MERGES)

    async def _merges(self, most: int) -> None:
        """Merge the level 0 or 1 chunks of at most ``most`` conversations where they are full,
        fullest first. A merge only compacts: the chain reads the same before and after."""
        due = [c for c in self._convs.values() if c.loaded and max(c.counts[0], c.counts[1]) >= MERGE]
        due.sort(key=lambda c: -max(c.counts[0], c.counts[1]))
        for i in range(0, min(most, len(due)), _PARALLEL):
            await _all([self._merge_full(c) for c in due[i : min(most, i + _PARALLEL)]])

    async def _merge_full(self, conv: _Conv) -> None:
        for level in (0, 1):
            if conv.counts[level] >= MERGE:
                await self._merge(conv, level)

    async def _flush_one(self, conv: _Conv, writes: list[Write]) -> list[Delivery]:
        """Materialise what ``conv`` holds (its usual write added to ``writes``, the rest written
        now); the deliveries to acknowledge once ``writes`` are stored."""
        if not await self.held():  # taken over mid-flush: the new holder materialises the rest
            return []
        held, conv.held = conv.held, []
        events, conv.events = conv.events, []
        if not conv.loaded:
            await self._load(conv)
        fresh = sorted({m.seq: m for m in held}.items())
        fresh = [(seq, m) for seq, m in fresh if seq > conv.covered]  # redelivered: already in a chunk
        if any(m.header(b"Botwire-Event") == "clear" for m in events):
            # A clear is recorded, then done: look for it now, and again while idle for a while
            # (each FETCH_WAIT), so the summary says "cleared" without waiting for a new message.
            conv.recheck = _RECHECKS
        if fresh:
            await self._materialise(conv, fresh, writes)
        elif conv.recheck:
            conv.recheck -= 1
            await self._cleared(conv, conv.first_seq, await self._first(conv))
        if conv.recount:  # nothing new to write with it (redelivered events only): written alone
            writes.extend(self._build(conv, [], [], [], conv.covered))
        return held + events

    async def _load(self, conv: _Conv) -> None:
        conn, stream, subject = self.conn, mat.mat_stream(self.namespace), self._summary_subject(conv)
        _, chunks, counts = await self._surely(lambda: mat.read_chain(conn, self.namespace, conv.token, _TIMEOUT))
        last = await self._surely(lambda: conn.direct_get_last(stream, subject, _TIMEOUT))
        conv.summary = _summary_decoder.decode(last.data) if last is not None and last.data else None
        conv.counts = counts
        # The chain, not the summary (written alongside a chunk, it may have landed without it),
        # says what is materialised; the summary only when a reset left no chunk.
        conv.covered = chunks[-1].last if chunks else (conv.summary.covered if conv.summary else 0)
        firsts = [s for c in chunks for s in c.seqs]
        conv.first_seq = firsts[0] if firsts else None
        if chunks and (conv.summary is None or conv.summary.covered != conv.covered):
            # The last chunk and its summary were not both stored (a stop between them: a SIGKILL,
            # or a stop while the server stalled, when only the start of a pipelined group reached
            # it): counted again from the chain, else the summary stays off for good (each later
            # one adds to it) and ``sessions()`` never trusts it again.
            conv.summary = None
            times = [t for c in chunks for t in c.times]
            self._summary(conv, firsts, times, [d for c in chunks for d in c.data], conv.covered)
            conv.recount = True
        conv.loaded = True

    def _summary_subject(self, conv: _Conv) -> str:
        return mat.summary_subject(self.namespace, conv.token)

    def _chunk_subject(self, conv: _Conv, level: int) -> str:
        return mat.chunk_subject(self.namespace, level, conv.token)

    async def _materialise(self, conv: _Conv, fresh: list[tuple[int, Delivery]], writes: list[Write]) -> None:
        """Write the delivered messages after ``covered`` as a chunk.

        They are every message of the conversation after ``covered``: a pull consumer delivers
        first deliveries in stream order, and every message at or below its ack floor is in a
        chunk already (acknowledged only once written; a restart resumes from the ack floor).
        A message removed before it was delivered went with every older one (a clear or an
        expiry), which the first-sequence check below sees. An empty message is an expiry's
        rollup marker: the chain starts again after it.
        """
        markers = [seq for seq, m in fresh if not m.data]
        if markers:
            await self._reset(conv, markers[-1] + 1)
            fresh = [(seq, m) for seq, m in fresh if seq > markers[-1]]
        known_first = conv.first_seq
        seqs = [seq for seq, m in fresh if m.data]
        times = [_stored_time(m) for _, m in fresh if m.data]
        data = [m.data for _, m in fresh if m.data]
        last = max(conv.covered, fresh[-1][0]) if fresh else conv.covered
        # The conversation's first sequence now, asked while the chunk is written: when it moved
        # past the chain's first message, the conversation was cleared (no event says so). At
        # most once a second per conversation: readers check it themselves (stale chunks are
        # never served), so a late look only delays dropping them and resetting the summary.
        now = time.monotonic()
        if now - conv.probed < _PROBE_EVERY:
            # no purge can follow in this flush: the writes may wait for the group's (``_flush``)
            writes.extend(self._build(conv, seqs, times, data, last))
            return
        conv.probed = now
        first, committed = await asyncio.gather(
            self._first(conv), self._commit(conv, seqs, times, data, last), return_exceptions=True
        )
        if isinstance(first, BaseException):  # both end (no write left running) before either is raised
            raise first
        if isinstance(committed, BaseException):
            raise committed
        await self._cleared(conv, known_first, first)

    async def _cleared(self, conv: _Conv, known_first: int | None, first: int | None) -> None:
        """When the conversation's first sequence moved past the chain's (a clear or an expiry),
        drop the chunks and materialise what the log holds now."""
        if known_first is not None and (first is None or first > known_first):
            conv.recheck = 0
            bound = await self._reset(conv, first)
            await self._from_log(conv)
            if conv.summary is None:  # cleared, nothing written since: no stale summary is left
                await self._purge(self._summary_subject(conv), bound)

    def _build(self, conv: _Conv, seqs: list[int], times: list[datetime], data: list[bytes], last: int) -> list[Write]:
        """The writes that materialise ``seqs`` (every message after ``conv.covered`` up to
        ``last``), in order: their chunk (split to ``CHUNK_BYTES``; full levels are merged by
        ``_merges``), then the conversation's summary. ``conv`` is updated as once they are
        stored: the caller stores them (``_commit`` now, ``_flush`` with its group) before it
        acknowledges anything, each with its own ``Nats-Msg-Id`` through every try."""
        writes: list[Write] = []
        conv.recount = False  # the summary is written with them
        if seqs:
            if conv.first_seq is None:
                conv.first_seq = seqs[0]
            for piece in _pack([Chunk(conv.covered, seqs, times, data)]):
                level = 2 if _size(piece) >= _FULL else 0
                writes.append((self._chunk_subject(conv, level), _packer.encode(piece), self._id()))
                conv.counts[level] += 1
        conv.covered = last
        summary = self._summary(conv, seqs, times, data, last)
        writes.append((self._summary_subject(conv), msgspec.json.encode(summary), self._id(_ROLLUP)))
        return writes

    async def _commit(self, conv: _Conv, seqs: list[int], times: list[datetime], data: list[bytes], last: int) -> None:
        """``_build``'s writes, stored now."""
        writes = self._build(conv, seqs, times, data, last)
        await self._surely(lambda: self._store(writes))

    async def _first(self, conv: _Conv) -> int | None:
        source = self.sources[0]
        req = {"next_by_subj": source.subject[:-1] + conv.token, "seq": 1, "batch": 1}
        probe = await self._surely(lambda: self.conn.direct_batch(source.stream, req, _TIMEOUT))
        return int((probe.msgs[0].headers or {})["Nats-Sequence"]) if probe.msgs else None

    async def _from_log(self, conv: _Conv) -> None:
        """Materialise what the log holds after ``covered`` (after a reset), read from the log."""
        source = self.sources[0]
        raw, start = source.subject[:-1] + conv.token, conv.covered + 1
        msgs = await self._surely(
            lambda: self.conn.read_subject(source.stream, raw, start_seq=start, page=10_000, timeout=_TIMEOUT)
        )
        if not msgs:
            return
        seqs, times, data = [], [], []
        for m in msgs:
            hdr = m.headers or {}
            if m.data:
                seqs.append(int(hdr["Nats-Sequence"]))
                times.append(parse_time(hdr["Nats-Time-Stamp"]))
                data.append(m.data)
        await self._commit(conv, seqs, times, data, int((msgs[-1].headers or {})["Nats-Sequence"]))

    async def _reset(self, conv: _Conv, first: int | None) -> int:
        """Drop the conversation's chunks; the bound its purges used (see ``_bound``)."""
        bound = await self._bound()
        for level in range(LEVELS):
            await self._purge(self._chunk_subject(conv, level), bound)
        conv.counts = [0] * LEVELS
        conv.summary, conv.first_seq = None, None
        conv.recount = False  # nothing left to count: the caller writes what the log holds now
        if first is not None:
            conv.covered = min(conv.covered, first - 1)  # read again from the conversation's first message
        return bound

    async def _bound(self) -> int:
        """One past the mat stream's last sequence now. Every purge is bounded (the messages below
        a sequence, not the whole subject): one that lands late (a try sent before a stall,
        processed after the writes that followed it) removes only what it was meant to remove."""
        stream = mat.mat_stream(self.namespace)
        info = await self._surely(lambda: self.conn.call(lambda: self.conn.js.stream_info(stream), timeout=_TIMEOUT))
        return info.state.last_seq + 1

    async def _purge(self, subject: str, before_seq: int) -> None:
        stream = mat.mat_stream(self.namespace)
        await self._surely(lambda: self.conn.purge(stream, subject, before_seq=before_seq, timeout=_TIMEOUT))

    async def _publish(self, conv: _Conv, level: int, chunk: Chunk) -> int:
        subject, body, headers = self._chunk_subject(conv, level), _packer.encode(chunk), self._id()
        seq = await self._surely(lambda: self.conn.publish(subject, body, headers, _TIMEOUT, what=_WHAT, advice=SAFE))
        conv.counts[level] += 1
        return seq

    async def _merge(self, conv: _Conv, level: int) -> None:
        stream = mat.mat_stream(self.namespace)
        subject = self._chunk_subject(conv, level)
        msgs = await self._surely(lambda: self.conn.read_subject(stream, subject, headers=True, timeout=_TIMEOUT))
        decoder = msgspec.msgpack.Decoder(Chunk)
        _, chained = mat.chain([decoder.decode(m.data) for m in msgs])
        if not chained:
            return
        # Only the chunks read are purged (``_bound``): one stored after the read is kept.
        read = max(int((m.headers or {})["Nats-Sequence"]) for m in msgs) + 1
        pieces = _pack(chained)
        rest = pieces.pop() if _size(pieces[-1]) < _FULL else None
        for piece in pieces:
            await self._publish(conv, 2, piece)
        if rest is not None:
            if level == 1 and len(chained) == 1:
                conv.counts[1] = 1
                return  # already one remainder
            seq = await self._publish(conv, 1, rest)
            if level == 1:  # the merged ones are older than the remainder just written
                await self._purge(subject, before_seq=seq)
                conv.counts[1] = 1
                return
        await self._purge(subject, before_seq=read)
        conv.counts[level] = 0

    def _summary(self, conv: _Conv, seqs: list[int], times: list[datetime], data: list[bytes], last: int) -> Summary:
        """The conversation's summary once ``seqs`` are counted (kept as ``conv.summary``)."""
        s = conv.summary
        title = s.title if s else None
        if title is None:
            for d in data:
                try:
                    msg: Any = msgspec.json.decode(d)
                except msgspec.DecodeError:
                    continue
                if (
                    isinstance(msg, dict)
                    and msg.get("role") in ("user", "human")
                    and isinstance(msg.get("content"), str)
                ):
                    title = msg["content"][:_TITLE]
                    break
        conv.summary = Summary(
            session_id=keys.decode_key(conv.token),
            message_count=(s.message_count if s else 0) + len(seqs),
            first_activity=(s.first_activity if s else None) or (times[0] if times else None),
            last_activity=times[-1] if times else (s.last_activity if s else None),
            title=title,
            tokens=(s.tokens if s else 0) + sum(len(d) for d in data) // 4,
            covered=last,
        )
        return conv.summary


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _stored_time(m: Delivery) -> datetime:
    """The message's stored time exactly as a read of the log gives it (``parse_time`` of the
    RFC 3339 text, which rounds the nanoseconds half up to the microsecond): nats-py's
    ``metadata.timestamp`` goes through a float and was measured a microsecond off now and then.
    The ack subject carries the time in nanoseconds; integer arithmetic, no text (the same as
    ``botwire_stream.nats.replay._stored_time``)."""
    return _EPOCH + timedelta(0, 0, (m.ts + 500) // 1000)


async def _all(aws: list[Awaitable[T]]) -> list[T]:
    """``asyncio.gather`` of ``aws``, each run to its end before the first error is raised: none
    left writing unsupervised (one that finds the lease lost raises ``_Fenced`` as well)."""
    got = await asyncio.gather(*aws, return_exceptions=True)
    for g in got:
        if isinstance(g, BaseException):
            raise g
    return cast(list[T], got)


def _size(chunk: Chunk) -> int:
    return sum(len(d) for d in chunk.data)


def _pack(chunks: list[Chunk]) -> list[Chunk]:
    """The messages of ``chunks`` (chained) as chunks of at most ``CHUNK_BYTES`` of bodies; a
    larger message gets an empty body (it is read from the log)."""
    out: list[Chunk] = []
    prev = chunks[0].prev
    seqs: list[int] = []
    times: list[datetime] = []
    data: list[bytes] = []
    size = 0
    for c in chunks:
        for s, t, d in zip(c.seqs, c.times, c.data, strict=True):
            if len(d) > CHUNK_BYTES:
                d = b""
            if seqs and size + len(d) > CHUNK_BYTES:
                out.append(Chunk(prev, seqs, times, data))
                prev, seqs, times, data, size = seqs[-1], [], [], [], 0
            seqs.append(s)
            times.append(t)
            data.append(d)
            size += len(d)
    if seqs:
        out.append(Chunk(prev, seqs, times, data))
    return out
