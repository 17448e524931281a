"""``ChatBackend`` over NATS: conversation logs as append-only subjects of one JetStream stream.

Each namespace has one stream, ``BOTWIRE_CHAT_<namespace>``; each conversation is one subject,
``botwire.<namespace>.chat.<encoded session id>``. An append is one publish and the server-assigned
stream sequence is the conversation's total order, so concurrent writers never lose or reorder each
other's messages. Every append carries a ``Nats-Msg-Id``: a retry after a timeout is dropped by the
stream's duplicate window instead of stored twice. ``extend`` is one atomic batch.

Sliding TTL is kept by the server: each write with a ``ttl`` also replaces the conversation's
one-shot schedule (``botwire.<namespace>.chatttl.<id>``, ``Nats-Schedule: @at now+ttl``). When it
fires, the server writes an empty message that rolls up (removes) the whole conversation and
expires itself a second later. No reaper process is needed.

``last=N`` reads are one request once this process has read or written the conversation: a
per-process ``_Hint`` remembers where its newest messages start and keeps the newest ones read,
so a read asks only for what follows the newest kept message. The server walks a subject's
messages between two of them one by one (its index has only each subject's first and last per
block), so reading from the right place, not probing, is what keeps a turn's read cheap. The
hint never decides what is returned, only the cost: each reply is checked (see ``_Hint`` and
``_read_tail``), and a read that finds it wrong falls back to probing.
"""

from __future__ import annotations

import asyncio
from bisect import insort
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig

from .. import keys
from .._backend import LogEntry
from ..errors import BotWireError, ChangedWhileRead, Conflict, QuotaExceeded, ServerUnavailable
from ..models import SessionInfo
from ..settings import ConnectOptions
from ..times import parse_time
from . import materialised
from .connect import origin_headers
from .errors import SubjectPurged
from .feeds import ResumingFeed
from .jetstream import Connection
from .pool import acquire, release
from .replies import Batch
from .retry import READ_FIRST

__all__ = ["AGE_LIMITED", "MAX_BATCH", "MAX_EXTEND_BYTES", "NatsChat", "NatsChatLog", "open_chat", "stream_name"]

MAX_BATCH: Final = 1000  # the server's limit of messages in one atomic batch
# The most bytes one extend carries. The server stages an atomic batch through the stream's ingest
# queue (128 MiB) and drops what overflows it (429, "batch is incomplete"): 100 x 8 MB failed so.
# Half the queue leaves room for a concurrent batch; a dropped batch (nothing stored) is re-sent.
MAX_EXTEND_BYTES: Final = 64 * 1024 * 1024
# An extend's deadline grows by one second per this many bytes, beyond its timeout.
_EXTEND_BYTES_PER_SECOND: Final = 16 * 1024 * 1024
_PAGE: Final = 10_000
_HEAD: Final = 32  # messages the first request of a probing read asks for (short conversations)
_READ_TRIES: Final = 5  # reads started again after racing a clear or an expiry
_HINT_SEQS: Final = 512  # sequences a hint keeps per conversation (the newest)
_HINTS_KEPT: Final = 4096  # conversations with a hint per process (least recently used dropped)
_TAIL_MESSAGES: Final = 64  # newest messages kept per conversation, for last=N up to this
_TAIL_BYTES: Final = 64 * 1024  # ... and at most these bytes of them
_TAILS_BYTES: Final = 16 * 1024 * 1024  # all conversations' kept messages (least recently used dropped)
_MAT_RECHECK: Final = 10.0  # seconds between looks for a materialised stream that was not there
_MATERIALISER: Final = "botwire-materialise"  # the history materialiser's consumer (consumers/materialiser.py)
# How far back the summary listing looks (s) before it reads every summary: each window is read
# whole, so growing by 8 keeps the total within 8/7 of the last one read.
_WINDOWS: Final = (60.0, 480.0, 3840.0, 30720.0, 245760.0)
_SKEW: Final = timedelta(seconds=1)


def stream_name(namespace: str) -> str:
    return f"BOTWIRE_CHAT_{namespace}"


async def open_chat(opts: ConnectOptions, namespace: str, *, replicas: int | None, timeout: float) -> NatsChat:
    """The shared connection for ``opts`` with the namespace's stream made sure to exist."""
    chat = NatsChat(namespace, timeout)
    conn = await acquire(opts)
    try:
        if await conn.ensure_stream(chat.config(replicas), timeout):
            await _learn_limits(conn, chat.stream, timeout)  # configured otherwise: an age limit?
    except BaseException:
        await release(conn)
        raise
    chat.conn = conn
    return chat


class _Hint:
    """Where this process last saw a conversation's newest messages: a guess, never trusted.

    ``last=N`` reads one reply of the conversation's messages from a start sequence ``X``. When
    that reply holds every message from ``X`` on and at least N of them, the newest N are exactly
    its tail, whatever ``X`` was; with fewer, the conversation was cleared or expired since, or
    the guess was wrong, and the probing read (several requests) answers instead. So a hint only
    decides the cost: one request when it is good, one more when it is not.

    ``seqs``: sequences this process knows messages at (its own appends, reads with headers), the
    newest ``_HINT_SEQS``; ``anchor``/``count``: a read found ``count`` messages from ``anchor``
    on, and ``added`` appends followed it (reads without headers give no sequences, only that).
    """

    __slots__ = ("seqs", "anchor", "count", "added", "refresh", "tail", "tail_all", "tail_bytes")

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.anchor = 0  # 0: none
        self.count = 0
        self.added = 0
        self.refresh = False  # the next read asks for headers, to learn sequences again
        # The newest messages, all of them from the first one's sequence on as one reply found
        # them, with their Nats-Msg-Id; replaced, never changed in place (readers keep a snapshot).
        self.tail: list[tuple[LogEntry, str]] | None = None
        self.tail_all = False  # the tail starts at the conversation's first message
        self.tail_bytes = 0

    def keep_tail(self, tail: list[tuple[LogEntry, str]] | None, complete: bool) -> None:
        """Keep ``tail`` (its newest ``_TAIL_MESSAGES``, at most ``_TAIL_BYTES``); None: forget it."""
        global _tails_bytes
        size = 0
        if tail:
            cut = max(0, len(tail) - _TAIL_MESSAGES)
            size = sum(len(e.data) for e, _ in tail[cut:])
            while size > _TAIL_BYTES and cut < len(tail) - 1:
                size -= len(tail[cut][0].data)
                cut += 1
            if cut:
                tail, complete = tail[cut:], False
        else:
            tail, complete = None, False
        _tails_bytes += size - self.tail_bytes
        self.tail, self.tail_all, self.tail_bytes = tail, complete, size
        if _tails_bytes > _TAILS_BYTES:
            for hint in list(_hints.values()):  # the least recently used first
                if _tails_bytes <= _TAILS_BYTES // 2:
                    break
                if hint is not self and hint.tail:
                    hint.keep_tail(None, False)

    def start(self, n: int) -> int | None:
        """A sequence with (as far as this process knows) at least ``n`` messages from it on, the
        highest known; 1 when the conversation had fewer when last read; None: no idea."""
        best = 0
        if len(self.seqs) >= n:
            best = self.seqs[-n]
        if self.anchor and self.count + self.added >= n:
            best = max(best, self.anchor)
        if best:
            return best
        return 1 if self.anchor else None

    def cleared(self) -> None:
        """Emptied by this process: the next reads start at sequence 1."""
        self.seqs, self.anchor, self.count, self.added, self.refresh = [], 1, 0, 0, False
        self.keep_tail(None, False)

    def appended(self, seqs: list[int]) -> None:
        for seq in seqs:
            insort(self.seqs, seq)
        self.added += len(seqs)
        self._trim()

    def found(self, start: int, msgs: list[Msg], last_seq: int, headers: bool) -> None:
        """A read from ``start`` got every message from there on: ``msgs``, the newest at ``last_seq``."""
        self.anchor, self.count, self.added = start, len(msgs), 0
        if headers:
            newest = msgs[-_HINT_SEQS:]
            self.seqs = sorted({*self.seqs, *(int((m.headers or {})["Nats-Sequence"]) for m in newest)})
            self.refresh = False
        elif last_seq and last_seq not in self.seqs:
            insort(self.seqs, last_seq)
        self._trim()

    def _trim(self) -> None:
        if len(self.seqs) > _HINT_SEQS:
            del self.seqs[: len(self.seqs) - _HINT_SEQS]


# Per process, for every connection and loop: a hint from another server or another stream of the
# same name only costs the fallback read (see ``_Hint``), so the key needs no server identity.
_hints: OrderedDict[tuple[str, str], _Hint] = OrderedDict()
_tails_bytes = 0  # the bytes of every hint's kept messages


# Chat streams this process knows to have an age limit (``audit.aretention(log_age=)``, issue 10):
# their messages leave one by one as they age, which a kept tail cannot see, so ``_read_tail`` is
# skipped for them. A count limit needs no such care: it is at least ``_TAIL_MESSAGES``, so the
# newest ``last`` messages a tail serves are always among those the server still keeps.
AGE_LIMITED: set[str] = set()


async def _learn_limits(conn: Connection, stream: str, timeout: float) -> None:
    """Note in ``AGE_LIMITED`` whether ``stream`` has an age limit (one stream info request)."""
    resp = await conn.request(f"$JS.API.STREAM.INFO.{stream}", b"", None, timeout)
    info: dict[str, Any] = msgspec.json.decode(resp.data)
    if (info.get("config") or {}).get("max_age"):
        AGE_LIMITED.add(stream)
    else:
        AGE_LIMITED.discard(stream)


def _forget(key: tuple[str, str]) -> None:
    hint = _hints.pop(key, None)
    if hint is not None:
        hint.keep_tail(None, False)


def _forget_all() -> None:
    """Forget every hint, as a new process would start (benchmarks of a first read)."""
    for key in list(_hints):
        _forget(key)


def _hint(key: tuple[str, str]) -> _Hint:
    """The hint for ``key``, made when missing, as the most recently used."""
    hint = _hints.get(key)
    if hint is None:
        hint = _hints[key] = _Hint()
        if len(_hints) > _HINTS_KEPT:
            _hints.popitem(last=False)[1].keep_tail(None, False)
    else:
        _hints.move_to_end(key)
    return hint


_summary_decoder = msgspec.json.Decoder(materialised.Summary)
_Summary = materialised.Summary  # inside NatsChat, ``materialised`` names its method


class NatsChat:
    """One namespace's conversation logs on a shared ``Connection`` (a ``_backend.ChatBackend``)."""

    conn: Connection

    def __init__(self, namespace: str, timeout: float) -> None:
        self.namespace = namespace
        self.timeout = timeout
        self.stream = stream_name(namespace)
        self.chat = f"botwire.{namespace}.chat."
        self.ttl = f"botwire.{namespace}.chatttl."
        self.events = f"botwire.{namespace}.chatev."  # summaries and clears (nats/replay.py)

    def config(self, replicas: int | None) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[f"{self.chat}>", f"{self.ttl}>", f"{self.events}>"],
            allow_direct=True,
            allow_msg_ttl=True,
            allow_msg_schedules=True,
            allow_atomic=True,
            allow_rollup_hdrs=True,
            deny_delete=True,
            duplicate_window=120,
            max_msgs=-1,
            max_consumers=-1,
            num_replicas=replicas,
            metadata={"botwire.namespace": self.namespace},
        )

    def log(self, session_id: str, ttl: int | None) -> NatsChatLog:
        return NatsChatLog(self, session_id, ttl)

    # -- the materialised layout (nats/materialised.py) -------------------------------------------
    _mat_at = -_MAT_RECHECK  # when the materialised stream was last looked for (loop time)
    _mat = False

    async def materialised(self) -> bool:
        """Whether the history materialiser keeps this namespace (its stream exists); looked up
        at most every ``_MAT_RECHECK`` seconds while it does not, once when it does."""
        loop = asyncio.get_running_loop()
        if not self._mat and loop.time() - self._mat_at >= _MAT_RECHECK:
            self._mat_at = loop.time()
            try:
                async with asyncio.timeout(min(1.0, self.timeout)):
                    await self.conn.js.stream_info(materialised.mat_stream(self.namespace))
                self._mat = True
            except (nats.errors.Error, TimeoutError):  # none, or not ours to read (permissions): the log
                self._mat = False
        return self._mat

    async def close(self) -> None:
        await release(self.conn)

    # -- listing --------------------------------------------------------------------------------
    async def sessions(
        self, pattern: str, *, limit: int | None, offset: int, before: tuple[datetime, str] | None
    ) -> list[SessionInfo]:
        """Costs what matches, not the namespace nor how its conversations interleave: the
        server's per-subject index names the conversations under the pattern's literal leading
        ``:``-segments with their counts (stream info's subjects filter), and one multi-last get
        per 1024 of them reads their last messages, whatever the page. While the history
        materialiser keeps the namespace and is current, the page comes from its summaries
        instead (``_sessions_from_summaries``: costs the page, not what matches)."""
        if limit is not None and await self.materialised():
            listed = await self._sessions_from_summaries(pattern, limit, offset, before)
            if listed is not None:
                return listed
        return await self._sessions_from_log(pattern, limit=limit, offset=offset, before=before)

    async def _sessions_from_log(
        self, pattern: str, *, limit: int | None, offset: int, before: tuple[datetime, str] | None
    ) -> list[SessionInfo]:
        conn, timeout = self.conn, self.timeout
        subject_filter, exact = keys.pattern_filter(pattern)
        n = len(self.chat)
        counts, floor = await conn.subject_counts_at(self.stream, self.chat + subject_filter, timeout)
        subjects = [s for s in counts if exact or keys.matches(keys.decode_key(s[n:]), pattern)]
        floor = max(floor, conn.stream_floor(self.stream))
        lasts = await _last_messages(conn, self.stream, subjects, timeout, floor)
        found: list[tuple[datetime, str, str]] = []
        for subject, last_activity, is_marker in lasts:
            if is_marker:
                continue  # expired a moment ago: only its expiry marker is left
            session_id = keys.decode_key(subject[n:])
            if before is not None and (last_activity, session_id) >= before:
                continue
            found.append((last_activity, session_id, subject))
        found.sort(reverse=True)
        end = None if limit is None else offset + limit
        page = found[offset:end]
        # Written again within a second of expiring, a conversation still starts with the
        # expiry marker, which is no message: probed for the page only (one request each).
        recent = datetime.now(UTC) - timedelta(seconds=5)
        suspects = [s for t, _, s in page if t > recent and counts.get(s, 0) > 1]
        markers: set[str] = set()
        for i in range(0, len(suspects), 64):  # 64 requests in flight at once
            chunk = suspects[i : i + 64]
            probes = await asyncio.gather(
                *(conn.direct_batch(self.stream, {"next_by_subj": s, "seq": 1, "batch": 1}, timeout) for s in chunk)
            )
            for subject, probe in zip(chunk, probes, strict=True):
                if probe.msgs and not probe.msgs[0].data:
                    markers.add(subject)
        listed = [
            SessionInfo(session_id=sid, message_count=counts.get(subject, 0) - (subject in markers), last_activity=t)
            for t, sid, subject in page
        ]
        if listed and await self.materialised():
            listed = await self._with_summaries(listed, [s for _, _, s in page])
        return listed

    async def _materialiser_current(self) -> bool:
        """Whether every conversation's summary accounts for every event of the log: the log
        has no age limit (that removes messages without an event) and a materialiser's consumer
        of it has nothing pending nor unacknowledged (it writes summaries before acknowledging).
        Two requests."""
        info, consumers = await asyncio.gather(
            self.conn.request(f"$JS.API.STREAM.INFO.{self.stream}", b"", None, self.timeout),
            self.conn.request(f"$JS.API.CONSUMER.LIST.{self.stream}", b"{}", None, self.timeout),
        )
        config = (msgspec.json.decode(info.data).get("config") or {})
        if config.get("max_age"):
            return False
        found: list[dict[str, Any]] = msgspec.json.decode(consumers.data).get("consumers") or []
        return any(
            (c.get("name") == _MATERIALISER or str(c.get("name", "")).startswith(_MATERIALISER + "-"))
            and not c.get("num_pending")
            and not c.get("num_ack_pending")
            for c in found
        )

    async def _summaries_since(self, since: datetime | None, subject_filter: str) -> list[_Summary]:
        """The summaries (one per conversation: rolled up) written at or after ``since`` (None: all)."""
        subject = materialised.summary_subject(self.namespace, subject_filter)
        stream = materialised.mat_stream(self.namespace)
        req: dict[str, Any] = {"next_by_subj": subject, "batch": _PAGE}
        if since is None:
            req["seq"] = 1
        else:
            req["start_time"] = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out: list[_Summary] = []
        while True:
            batch = await self.conn.direct_batch(stream, req, self.timeout)
            out.extend(_summary_decoder.decode(m.data) for m in batch.msgs if m.data)
            if not batch.msgs or not batch.pending:
                return out
            req = {"next_by_subj": subject, "batch": _PAGE, "seq": batch.last_seq + 1}

    async def _sessions_from_summaries(
        self, pattern: str, limit: int, offset: int, before: tuple[datetime, str] | None
    ) -> list[SessionInfo] | None:
        """The page from the materialiser's summaries, None when they cannot answer exactly.

        A conversation's summary is rewritten (rolled up) after each of its new messages, so it
        is stored after its ``last_activity``: the summaries written since a time T are, once the
        materialiser is current, every conversation active since T (and some older ones). Windows
        reaching further back (``_WINDOWS``, then all of them) are read until they hold the
        ``offset + limit`` newest; each of those is checked against the log (its last message and
        count, one multi-last get and one count request per conversation), and any difference (a
        clear or an expiry the materialiser has not reflected yet, a count limit) falls back to
        the log's listing. So the cost follows the page and the recent activity, not what matches.
        """
        if not await self._materialiser_current():
            return None
        subject_filter, exact = keys.pattern_filter(pattern)
        need = offset + limit
        now = datetime.now(UTC)
        chosen: list[_Summary] = []
        for window in (*_WINDOWS, None):
            since = None if window is None else now - timedelta(seconds=window)
            newest: dict[str, _Summary] = {}
            # read from a second earlier: the two streams' clocks may differ (replicas on other hosts)
            for summary in await self._summaries_since(None if since is None else since - _SKEW, subject_filter):
                t = summary.last_activity
                if t is None or summary.message_count <= 0 or (since is not None and t < since):
                    continue
                if not exact and not keys.matches(summary.session_id, pattern):
                    continue
                if before is not None and (t, summary.session_id) >= before:
                    continue
                known = newest.get(summary.session_id)
                if known is None or summary.covered > known.covered:
                    newest[summary.session_id] = summary
            chosen = sorted(newest.values(), key=lambda x: (x.last_activity, x.session_id), reverse=True)[:need]
            if len(chosen) >= need:
                break
        if not chosen:
            return [] if await self._materialiser_current() else None
        subjects = [self.chat + keys.encode_key(x.session_id) for x in chosen]
        floor = self.conn.stream_floor(self.stream)
        lasts = {s: (t, marker) for s, t, marker in await _last_messages(self.conn, self.stream, subjects, self.timeout, floor)}
        counts: dict[str, int] = {}
        for i in range(0, len(subjects), 64):  # 64 requests in flight at once
            for found in await asyncio.gather(
                *(self.conn.subject_counts(self.stream, subject, self.timeout) for subject in subjects[i : i + 64])
            ):
                counts.update(found)
        for x, subject in zip(chosen, subjects, strict=True):
            if lasts.get(subject) != (x.last_activity, False) or counts.get(subject) != x.message_count:
                return None
        return [
            SessionInfo(x.session_id, x.message_count, x.last_activity, x.title, x.first_activity, x.tokens)
            for x in chosen[offset:]
            if x.last_activity is not None
        ]

    async def _with_summaries(self, listed: list[SessionInfo], subjects: list[str]) -> list[SessionInfo]:
        """``listed`` with title, first activity and tokens from the materialiser's summaries (one
        multi-last get per 256 of the page): a summary is used only when it accounts for exactly
        what the log holds now (same message count and last message time), never when it lags."""
        n = len(self.chat)
        wanted = [materialised.summary_subject(self.namespace, s[n:]) for s in subjects]
        found: dict[str, _Summary] = {}
        for i in range(0, len(wanted), 256):
            reply = await self.conn.direct_batch(
                materialised.mat_stream(self.namespace), {"multi_last": wanted[i : i + 256]}, self.timeout
            )
            for m in reply.msgs:
                if m.data:
                    found[(m.headers or {})["Nats-Subject"]] = _summary_decoder.decode(m.data)
        out = []
        for info, subject in zip(listed, wanted, strict=True):
            s = found.get(subject)
            if s is not None and s.message_count == info.message_count and s.last_activity == info.last_activity:
                info = SessionInfo(
                    info.session_id, info.message_count, info.last_activity, s.title, s.first_activity, s.tokens
                )
            out.append(info)
        return out


class NatsChatLog:
    """One conversation: its subject in the namespace's stream (a ``_backend.ChatLog``)."""

    def __init__(self, chat: NatsChat, session_id: str, ttl: int | None) -> None:
        self._chat = chat
        self.conn = chat.conn
        self.session_id = session_id
        self.ttl = ttl
        self.stream = chat.stream
        self.timeout = chat.timeout
        token_path = self._token_path = keys.encode_key(session_id)
        self.subject = chat.chat + token_path
        self._ttl_subject = chat.ttl + token_path
        self._key = (self.stream, self.subject)

    async def close(self) -> None:
        await self._chat.close()

    @property
    def max_message(self) -> int:
        return self.conn.max_body

    # -- writing --------------------------------------------------------------------------------
    def _schedule(self) -> tuple[str, bytes, dict[str, str]] | None:
        """The message that (re)arms the conversation's expiry, or None without a ttl."""
        if self.ttl is None:
            return None
        at = datetime.now(UTC) + timedelta(seconds=self.ttl)
        # @at has whole seconds: round up so that the conversation never expires early.
        at = at.replace(microsecond=0) + timedelta(seconds=1)
        headers = {
            "Nats-Schedule": "@at " + at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Nats-Schedule-Target": self.subject,
            "Nats-Schedule-Rollup": "sub",
            "Nats-Schedule-TTL": "1s",
            "Nats-Rollup": "sub",  # this schedule replaces the previous one
        }
        return self._ttl_subject, b"", headers

    async def append(self, data: bytes, msg_id: str | None = None) -> int:
        conn = self.conn
        headers = origin_headers()
        if msg_id is not None:  # the stream's duplicate window (120 s) drops a repeat of it
            headers["Nats-Msg-Id"] = msg_id
        schedule = self._schedule()
        if schedule is None:
            seq = await conn.publish(self.subject, data, headers, self.timeout, what="append")
        else:
            # The schedule first, on the same connection, so the server re-arms the expiry before
            # the message lands; both acks are awaited together (one round trip).
            pair = [schedule, (self.subject, data, headers)]
            seq = (await conn.publish_pipelined(pair, self.timeout, what="append"))[1]
        _hint(self._key).appended([seq])
        return seq

    async def extend(self, payloads: list[bytes], total: int) -> list[int]:
        """One atomic batch; the call's deadline is its timeout plus one second per 16 MiB."""
        conn = self.conn
        headers = [origin_headers() for _ in payloads]
        for h in headers:  # ids known here, so that a batch cut at the storage limit can be looked up
            h["Nats-Msg-Id"] = conn.new_id()
        schedule = self._schedule()
        if schedule is not None:
            await conn.publish(*schedule, self.timeout, what="expiry schedule", advice=READ_FIRST)
        if len(payloads) == 1:
            last = await conn.publish(self.subject, payloads[0], headers[0], self.timeout, what="extend")
        else:
            budget = self.timeout + total / _EXTEND_BYTES_PER_SECOND
            # One deadline: the batch gets most of it, the rest is kept to look up a batch cut short
            # at the storage limit (a stalled server answers neither: the call still ends in time).
            lookup = min(1.0, self.timeout / 4)
            loop = asyncio.get_running_loop()
            end = loop.time() + budget
            try:
                last = await conn.publish_batch(self.subject, payloads, headers, timeout=budget - lookup, what="extend")
            except (QuotaExceeded, ServerUnavailable) as exc:
                if not conn.nc.is_connected:
                    raise  # the server went away: not the storage limit
                kept = []
                try:
                    async with asyncio.timeout(max(end - loop.time(), 0.001)):
                        kept = await self._partial_batch({h["Nats-Msg-Id"] for h in headers})
                except TimeoutError:
                    pass  # no answer: the server stalled, nothing to learn
                if len(kept) == len(payloads):
                    return kept  # all stored: only the answer was lost (a server stalled past the deadline)
                if kept:
                    raise QuotaExceeded(
                        f"the server stored only {len(kept)} of these {len(payloads)} messages (sequences "
                        f"{kept[0]}-{kept[-1]}) and refused the rest: it is at its storage limit, where "
                        "nats-server does not keep an atomic batch atomic; free space, then append the rest"
                    ) from exc
                raise
        seqs = list(range(last - len(payloads) + 1, last + 1))
        _hint(self._key).appended(seqs)
        return seqs

    async def _partial_batch(self, ids: set[str]) -> list[int]:
        """The sequences of the messages of a failed batch that the server stored anyway.

        nats-server 2.15 at its storage limit stores the messages of an atomic batch that arrive
        before the limit and never answers the commit (measured: 18 of 20 stored, the commit timed
        out). The stream denies deletes (conversations are append-only), so the caller reports them.
        """
        conn, stream = self.conn, self.stream
        try:
            last = await conn.direct_get_last(stream, self.subject, self.timeout)
            if last is None:
                return []
            top = int((last.headers or {})["Nats-Sequence"])
            # the batch is among this conversation's newest messages; others' writes interleave
            msgs = await conn.read_subject(stream, self.subject, start_seq=max(1, top - 100_000), timeout=self.timeout)
        except BotWireError:
            return []  # the server is gone: nothing to learn
        return [int(h["Nats-Sequence"]) for m in msgs if (h := m.headers or {}).get("Nats-Msg-Id") in ids]

    async def clear(self) -> None:
        """Remove every message of this conversation (its sequence numbers are not reused).

        The conversation's expiry schedule is kept: an append publishes its schedule and then its
        message, so any purge of the schedule can land between the two and leave a message that
        never expires (measured: 50-56 of 80 appends racing a clear that purged both). A kept
        schedule fires on an empty conversation harmlessly; later writes with a ``ttl`` move it.
        """
        await self.conn.purge(self.stream, self.subject, timeout=self.timeout)
        self.conn.cleared(self.subject)  # gone: the next reads ask the leader what is left
        _hint(self._key).cleared()

    # -- reading --------------------------------------------------------------------------------
    async def _probe(self, seq: int) -> tuple[Batch, int]:
        """The conversation's first message at or after ``seq`` (a one-message batch), and how many
        messages it has from there (the end-of-batch pending count, plus that one; 0: none)."""
        probe = await self.conn.direct_batch(
            self.stream, {"next_by_subj": self.subject, "seq": seq, "batch": 1}, self.timeout
        )
        return probe, (probe.pending + 1 if probe.msgs else 0)

    async def _start_seq(
        self, after: int | None, last: int | None, headers: bool
    ) -> tuple[int, int | None] | list[Msg] | None:
        """The sequence to read from so that at least the ``last`` newest messages follow, and how
        many messages followed it when probed (None: not probed); or every message after
        ``after`` when the first probe got them all; or None for nothing to read.

        The first round trip asks at once for the oldest ``min(last, 32)`` messages with the
        count from there (the end-of-batch pending count) and for the last message: a short
        conversation is then read, a long one costs a few one-message probes plus its tail.
        """
        start = (after or 0) + 1
        if last is None:
            return start, None
        req: dict[str, Any] = {"next_by_subj": self.subject, "seq": start, "batch": min(last, _HEAD)}
        if not headers:
            req["no_hdr"] = True
        head, tail = await asyncio.gather(
            self.conn.direct_batch(self.stream, req, self.timeout),
            self.conn.direct_get_last(self.stream, self.subject, self.timeout),
        )
        if not head.msgs:
            return None
        # With headers the pending count is what the reply left; without, the count from start.
        total = head.pending + len(head.msgs) if headers else max(head.pending, len(head.msgs))
        if total <= len(head.msgs):
            return head.msgs
        if total - len(head.msgs) + 1 < last:
            return start, total  # fewer than 2 x last: all of them
        first, total = head.last_seq, total - len(head.msgs) + 1  # from the head's last message on
        if tail is None:
            return None
        end = int((tail.headers or {})["Nats-Sequence"])
        lo, hi, at_lo = first, end, total  # count(>= lo) = at_lo >= last > count(> hi)
        guess = max(lo, end - int((end - first) * (last / total) * 1.25) - 1)
        for _ in range(12):
            probe, count = await self._probe(guess)
            if count >= last:
                if count <= 2 * last + 64:
                    return probe.last_seq, count
                lo, at_lo = probe.last_seq, count
            else:
                hi = guess
            guess = (lo + hi) // 2
        return lo, at_lo

    async def _read_once(self, start: int, last: int | None, headers: bool) -> list[Msg] | None:
        """The read in one request when this process's hint says where to start (any conversation
        length, any interleaving), or None when one request cannot tell (then ``_read`` probes).

        Exact whatever the hint (see ``_Hint``): one reply is a snapshot (the server holds the
        stream's lock while it sends it), and it is used only when it holds every message from
        its start on and, for ``last``, at least that many or all there are after ``after``.
        """
        hint = _hints.get(self._key)
        guess = None if hint is None or last is None else hint.start(last)
        if hint is None or last is None or guess is None:
            return None  # a whole read: paged by read_subject (one request under 10,000 messages)
        seq = max(guess, start)
        # Room for what others appended since the hint was made; more costs the probing read.
        batch = min(2 * last + 256, _PAGE)
        if guess == hint.anchor and hint.count + hint.added > batch:
            return None  # more than one reply holds: the probing read pages
        # With headers when a tail is to be kept: later reads then fetch only what is newer.
        tail_wanted = start == 1 and last <= _TAIL_MESSAGES and not hint.tail
        headers = headers or hint.refresh or tail_wanted
        req: dict[str, Any] = {"next_by_subj": self.subject, "seq": seq, "batch": batch}
        if not headers:
            req["no_hdr"] = True
        reply = await self.conn.direct_batch(self.stream, req, self.timeout)
        msgs = reply.msgs
        # Every message from seq on: with headers the end-of-batch pending count is what is left;
        # without, the server leaves it at the count from seq on (nats-server 2.15, measured).
        if msgs and reply.pending and (headers or len(msgs) < reply.pending):
            return None  # cut at batch or at the server's byte cap
        if len(msgs) < last and seq > start:
            _forget(self._key)  # cleared or expired since, or a wrong hint: forget, probe
            return None
        hint = _hint(self._key)
        hint.found(seq, msgs, reply.last_seq, headers)
        if len(msgs) > 2 * last + 64:
            hint.refresh = True  # others appended much: learn sequences on the next read
        if headers and start == 1:
            _keep_tail(hint, msgs, seq == 1)
        return msgs

    async def _read_tail(self, last: int) -> list[LogEntry] | None:
        """The newest ``last`` messages from the kept tail and what was appended after it; None
        when no tail is kept, or it no longer holds (then the caller reads as usual).

        Two requests in flight at once (one round trip): everything after the newest kept message
        (with headers: usually nothing, or the few messages appended since), and the oldest kept
        message this read serves (a direct get by its sequence). Starting at the newest keeps the
        server's walk short: it steps through every message of the stream between a start and
        the subject's next one, so starting at the oldest served message of a conversation spread
        thinly through a busy stream cost ~2.7 ms vs ~0.4 ms (benchmarks chat-last). Starting
        just after it, rather than at it, spares the reply that message (its header block was
        the costliest thing this read parsed): the check below already vouches for it.

        Exact: messages leave a conversation only from its oldest on (``clear`` and any
        stream-API purge, keeping the newest or not, remove a prefix; an expiry rolls it all up;
        the stream denies deletes), so while the oldest served message is still there (same
        sequence, message id and body) so is every newer kept one, and the first reply, one
        snapshot, holds everything after the newest kept one. A single served message is read
        with what follows it, in one request.
        """
        if self.stream in AGE_LIMITED:
            return None  # messages also leave one by one there, by age: read as usual
        hint = _hints.get(self._key)
        kept = None if hint is None else hint.tail
        if hint is None or not kept or last > _TAIL_MESSAGES or len(kept) < last and not hint.tail_all:
            return None
        complete = hint.tail_all
        served = kept[max(0, len(kept) - last) :]  # the kept messages this read may return
        newest, newest_id = kept[-1]
        oldest, oldest_id = served[0]
        batch = 2 * last + 256
        if oldest.seq == newest.seq:
            req = {"next_by_subj": self.subject, "seq": newest.seq, "batch": batch}
            reply = await self.conn.direct_batch(self.stream, req, self.timeout)
            msgs = reply.msgs
            good = bool(msgs) and _same(msgs[0], newest, newest_id)
            msgs = msgs[1:]
        else:
            req = {"next_by_subj": self.subject, "seq": newest.seq + 1, "batch": batch}
            # A direct get by sequence: a batch would also count what follows (a walk).
            reply, check = await self.conn.direct_batch_and_get(self.stream, req, oldest.seq, self.timeout)
            msgs = reply.msgs
            good = (
                check is not None  # else purged since
                and (check.headers or {}).get("Nats-Subject") == self.subject
                and _same(check, oldest, oldest_id)
            )
        if not good or reply.pending or not all(m.data for m in msgs):
            if hint.tail is kept:  # cut short, or purged, cleared or expired since: read as usual
                hint.keep_tail(None, False)
            return None
        tail = kept
        if msgs:
            tail = kept + [_tail_item(m) for m in msgs]
            if hint.tail is kept:  # else another read replaced it meanwhile: keep theirs
                hint.keep_tail(tail, complete)
        if len(tail) < last and not complete:
            return None
        return [e for e, _ in tail[-last:]]

    async def _read(self, after: int | None, last: int | None, headers: bool) -> list[Msg]:
        start = (after or 0) + 1
        msgs = await self._read_once(start, last, headers)
        if msgs is None:
            msgs = await self._read_probing(after, last, headers)
        msgs = [m for m in msgs if m.data]  # an empty body is the expiry marker, not a message
        if last is not None and len(msgs) > last:
            msgs = msgs[len(msgs) - last :]
        return msgs

    async def _read_probing(self, after: int | None, last: int | None, headers: bool) -> list[Msg]:
        """The read by probing for where the ``last`` newest start (a few requests), and paged."""
        for _ in range(_READ_TRIES):
            found = await self._start_seq(after, last, headers)
            if found is None:
                if after is None:
                    _hint(self._key).found(1, [], 0, headers)  # empty: the next read starts at 1
                return []
            if isinstance(found, list):
                _hint(self._key).found((after or 0) + 1, found, 0, headers)
                return found
            start, known = found
            try:
                msgs = await self.conn.read_subject(
                    self.stream,
                    self.subject,
                    start_seq=start,
                    page=_PAGE,
                    headers=headers,
                    known=known,
                    snapshot=True,
                    timeout=self.timeout,
                )
                break
            except SubjectPurged:
                continue  # cleared or expired while read: what is there now, never old and new mixed
        else:
            raise ChangedWhileRead(
                f"conversation {self.session_id!r} was cleared {_READ_TRIES} times while it was read; read it again"
            )
        # Counted from start: the next last=N read starts there, in one request.
        hint = _hint(self._key)
        hint.found(start, msgs, 0, headers)
        if headers and after is None:
            _keep_tail(hint, msgs, start == 1)
        return msgs

    async def _materialised(self) -> list[LogEntry] | None:
        """The whole conversation from the materialised layout, or None where there is none."""
        if not await self._chat.materialised():
            return None
        return await materialised.read_exact(
            self.conn, self.stream, self.subject, self._chat.namespace, self._token_path, self.timeout
        )

    def _checked(self) -> bool:
        """Whether reads must be checked (a cluster, after this connection's own write or clear,
        or with ``?reads=leader``): they then carry sequences, to compare."""
        return self.conn.written(self.subject) is not None or self.conn.checks_with_leader(self.subject)

    async def read(self, after: int | None, last: int | None) -> list[bytes]:
        if self._checked():
            return [e.data for e in await self.entries(after, last)]  # with sequences, to check it
        if after is None and last is None and (whole := await self._materialised()) is not None:
            return [e.data for e in whole]
        # From the kept tail first: its reply starts at the newest kept message, so it carries
        # (and nats-py parses the headers of, ~25 µs each) only what was appended since.
        if after is None and last is not None and (tail := await self._read_tail(last)) is not None:
            return [e.data for e in tail]
        return [m.data for m in await self._read(after, last, headers=False)]

    async def entries(self, after: int | None, last: int | None) -> list[LogEntry]:
        if self.conn.checks_with_leader(self.subject):
            return await self._as_at_leader(after, last)
        mine = self.conn.written(self.subject)
        got = await self._entries(after, last)
        if mine is None or (after or 0) >= mine or (got and got[-1].seq >= mine):
            return got
        end = asyncio.get_running_loop().time() + self.timeout
        seen = await self._own_write_seen(got, mine, after, last, end)
        if seen is None:  # no longer stored (cleared, rolled up, expired): right without it
            self.conn.forget_written(self.subject)
            return got
        return seen

    async def _as_at_leader(self, after: int | None, last: int | None) -> list[LogEntry]:
        """The read checked against the leader's last message, asked alongside it: a read that
        reaches it holds every write acknowledged before (replicas apply the log in order); an
        empty or marker-only conversation at the leader reads as empty, whatever a replica says.

        When that message is gone before a replica's read reaches it (cleared, expired), the read
        is checked again against the leader's new last message, ``_READ_TRIES`` times at most, all
        within the one timeout. Beyond that (another client clearing again and again), the answer
        is the leader's: each of those messages was removed while this call ran, so the
        conversation was empty at some moment of it (a clear or an expiry removes every message).
        Before, the check started over without bound, each time with a whole new timeout."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timeout
        for _ in range(_READ_TRIES):
            got, newest = await asyncio.gather(
                self._entries(after, last), self.conn.leader_last(self.stream, self.subject, self.timeout)
            )
            if newest is None or not newest.data:
                return []
            top = int((newest.headers or {})["Nats-Sequence"])
            if (after or 0) >= top or (got and got[-1].seq >= top):
                return got
            seen = await self._own_write_seen(got, top, after, last, end)
            if seen is not None:
                return seen
            if loop.time() >= end:
                break
        return []

    async def _own_write_seen(
        self, got: list[LogEntry], mine: int, after: int | None, last: int | None, end: float
    ) -> list[LogEntry] | None:
        """``got`` read again until it reaches ``mine``: this connection's own last acknowledged
        append (reads-your-writes on a cluster), or the leader's last message (``?reads=leader``,
        or after this connection's clear); None once the leader no longer holds it. At the loop
        time ``end``, ``ServerUnavailable``.

        A batch direct get is answered by any replica, and one a few ms behind the stream leader
        missed the caller's own append (measured: 1 of 200 reads right after an append, client on
        a follower, CPU loaded). The stream leader has no batch get, so the read is repeated
        (the lagging replica catches up in ms) while the leader still holds that message; once
        it does not (cleared, rolled up, expired) the caller decides: the read is right without
        it, or, checked against the leader, is checked again against its new last message."""
        loop = asyncio.get_running_loop()
        pause = 0.002
        while not got or got[-1].seq < mine:
            if not await self.conn.leader_holds(self.stream, self.subject, mine, max(end - loop.time(), 0.05)):
                return None
            if loop.time() + pause >= end:
                raise ServerUnavailable(
                    f"the servers answering reads of conversation {self.session_id!r} did not catch up with "
                    f"sequence {mine} (this connection's own append, or the leader's last message) within {self.timeout} s"
                )
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.05)
            got = await self._entries(after, last)
        return got

    async def _entries(self, after: int | None, last: int | None) -> list[LogEntry]:
        if after is None and last is None and (whole := await self._materialised()) is not None:
            return whole
        if after is None and last is not None and (tail := await self._read_tail(last)) is not None:
            return tail
        return [_entry(m) for m in await self._read(after, last, headers=True)]

    async def count(self) -> int:
        if self._checked():
            # As the leader counts (stream info is answered by it): a replica's count missed this
            # connection's own append or clear for a few ms (tests/test_cluster_reads.py).
            n, first = await self.conn.leader_count_and_first(self.stream, self.subject, self.timeout)
            if n and (first is None or not first.data or n <= 2):  # an expiry marker may be among them
                n = len(await self.entries(None, None))
            return n
        probe, n = await self._probe(1)
        if not n:
            return 0
        if not probe.msgs[0].data or n <= 2:  # an expiry marker may be the only one left
            n = len(await self._read(None, None, headers=False))
        return n

    async def fork(self, target: NatsChatLog, upto: int | None, origin: str) -> None:
        """Forks of up to 1000 messages are atomic; longer ones are written in atomic batches, each
        conditional on the last, so that they never interleave with another writer's. A fork re-sent
        after a lost connection is read back, never reported as a ``Conflict`` with itself."""
        conn = target.conn
        msgs = await self._read(None, None, headers=upto is not None)
        if upto is not None:
            msgs = [m for m in msgs if int((m.headers or {})["Nats-Sequence"]) <= upto]
        if not msgs:  # nothing to copy: the target must still be new
            existing = await conn.direct_get_last(self.stream, target.subject, self.timeout)
            if existing is not None and existing.data:
                raise Conflict(f"cannot fork into {target.session_id!r}: that conversation already has messages")
            return
        expected = 0
        for i, chunk in enumerate(_batches([m.data for m in msgs])):
            headers = []
            for _ in range(len(chunk)):
                h = origin_headers()
                h["Botwire-Forked-From"] = origin
                headers.append(h)
            # Conditional: the fork must be a new conversation, and batches must not interleave.
            try:
                if len(chunk) == 1:
                    headers[0]["Nats-Expected-Last-Subject-Sequence"] = str(expected)
                    expected = await conn.publish(target.subject, chunk[0], headers[0], self.timeout, what="fork")
                else:
                    budget = self.timeout + sum(len(c) for c in chunk) / _EXTEND_BYTES_PER_SECOND
                    expected = await conn.publish_batch(
                        target.subject, chunk, headers, timeout=budget, expected=expected, what="fork"
                    )
            except Conflict:
                raise Conflict(
                    f"cannot fork into {target.session_id!r}: that conversation already has messages"
                    if i == 0
                    else f"the fork {target.session_id!r} was written to while it was being copied"
                ) from None
        schedule = target._schedule()
        if schedule is not None:
            await conn.publish(*schedule, self.timeout, what="expiry schedule")

    def watch(self, after: int | None) -> LogFeed:
        return LogFeed(self, after)


_MULTI_LAST: Final = 1024  # the most subjects one multi-last get answers (nats-server: 413 beyond)
_LIST_BYTES: Final = 256 * 1024  # the subjects named in one request: well under a 1 MiB max_payload


async def _last_messages(
    conn: Connection, stream: str, subjects: list[str], timeout: float, floor: int = 0
) -> list[tuple[str, datetime, bool]]:
    """(subject, time, is expiry marker) of the last message of each of ``subjects``: one
    multi-last get per 1024 of them (fewer for long ids), all capped at the sequence the first
    one answered at (by a server at ``floor`` or later), so the listing is one moment of the
    namespace."""
    out = []
    up_to = 0
    i = 0
    while i < len(subjects):
        chunk: list[str] = []
        size = 0
        while i < len(subjects) and len(chunk) < _MULTI_LAST and size < _LIST_BYTES:
            chunk.append(subjects[i])
            size += len(subjects[i]) + 3
            i += 1
        request: dict[str, Any] = {"multi_last": chunk, "up_to_seq": up_to or None}
        while True:
            if up_to:
                batch = await conn.direct_batch(stream, request, timeout)
            else:
                batch = await conn.multi_last_from(stream, request, floor, timeout)
            up_to = up_to or batch.up_to_seq
            for m in batch.msgs:
                hdr = m.headers or {}
                marker = not m.data or "Nats-Scheduler" in hdr
                out.append((hdr["Nats-Subject"], parse_time(hdr["Nats-Time-Stamp"]), marker))
            if not batch.msgs or not batch.pending:
                break
            # The reply stopped at the server's byte cap (64 MiB by default): the rest of the same
            # snapshot, from the next sequence on (the pending count of a multi-last get is exact).
            request = {"multi_last": chunk, "seq": batch.last_seq + 1, "up_to_seq": up_to}
    return out


def _batches(payloads: list[bytes]) -> list[list[bytes]]:
    """``payloads`` cut into atomic batches of at most ``MAX_BATCH`` messages and
    ``MAX_EXTEND_BYTES`` bytes (a single larger message gets a batch of its own)."""
    out: list[list[bytes]] = []
    size = 0
    for p in payloads:
        if not out or len(out[-1]) >= MAX_BATCH or size + len(p) > MAX_EXTEND_BYTES:
            out.append([])
            size = 0
        out[-1].append(p)
        size += len(p)
    return out


def _entry(m: Msg) -> LogEntry:
    hdr = m.headers or {}
    return LogEntry(int(hdr["Nats-Sequence"]), parse_time(hdr["Nats-Time-Stamp"]), m.data)


def _keep_tail(hint: _Hint, msgs: list[Msg], from_first: bool) -> None:
    """Keep the newest of ``msgs`` (every message from the first one's sequence on, read with
    headers) as ``hint``'s tail, unless an expiry marker is among them."""
    newest = msgs[-_TAIL_MESSAGES:]
    if all(m.data for m in newest):
        hint.keep_tail([_tail_item(m) for m in newest], from_first and len(newest) == len(msgs))


def _same(m: Msg, entry: LogEntry, msg_id: str) -> bool:
    """Whether ``m`` (read with headers) is the kept message ``entry`` with ``Nats-Msg-Id`` ``msg_id``."""
    hdr = m.headers or {}
    return hdr.get("Nats-Sequence") == str(entry.seq) and hdr.get("Nats-Msg-Id", "") == msg_id and m.data == entry.data


def _tail_item(m: Msg) -> tuple[LogEntry, str]:
    """A message read with headers as a ``_Hint.tail`` item: its entry and its ``Nats-Msg-Id``."""
    return _entry(m), (m.headers or {}).get("Nats-Msg-Id", "")


class LogFeed(ResumingFeed[LogEntry]):
    """New entries of one conversation, from an ordered consumer on its subject."""

    def __init__(self, log: NatsChatLog, after: int | None) -> None:
        super().__init__(log.conn, log.stream, log.timeout)
        self._log = log
        self._after = after

    def _first_seq(self) -> int | None:
        return None if self._after is None else self._after + 1

    async def _subscribe(self, conn: Connection, start_seq: int) -> Any:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
        return await conn.js.subscribe(self._log.subject, ordered_consumer=True, config=config)

    async def _convert(self, conn: Connection, msg: Msg) -> LogEntry | None:
        if not msg.data:
            return None  # the expiry marker
        meta = msg.metadata
        return LogEntry(meta.sequence.stream, meta.timestamp, msg.data)
