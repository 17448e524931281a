"""``AsyncChatHistory``: conversation logs as append-only subjects of one JetStream stream.

Each namespace has one stream, ``BOTWIRE_CHAT_<namespace>``; each conversation is one subject,
``botwire.<namespace>.chat.<encoded session id>``. An append is one publish and the server-assigned
stream sequence is the conversation's total order, so concurrent writers never lose or reorder each
other's messages. Every append carries a ``Nats-Msg-Id``: a retry after a timeout is dropped by the
stream's duplicate window instead of stored twice. ``extend`` is one atomic batch.

Sliding TTL is kept by the server: each write with a ``ttl`` also replaces the conversation's
one-shot schedule (``botwire.<namespace>.chatttl.<id>``, ``Nats-Schedule: @at now+ttl``). When it
fires, the server writes an empty message that rolls up (removes) the whole conversation and
expires itself a second later. No reaper process is needed.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig

from . import codec, keys
from .client import StreamClient, check_options, open_with_streams
from .errors import (
    BotWireError,
    ChangedWhileRead,
    Conflict,
    InvalidArgument,
    InvalidMessage,
    QuotaExceeded,
    ServerUnavailable,
    ValueTooLarge,
)
from .live import LiveIterator
from .models import Entry, SessionInfo
from .nats.connect import origin_headers
from .nats.errors import SubjectPurged
from .nats.jetstream import Connection
from .nats.pool import release
from .nats.replies import Batch
from .nats.retry import READ_FIRST
from .settings import resolve
from .times import parse_time, ttl_seconds

__all__ = ["AsyncChatHistory", "ChatWatch", "MAX_BATCH", "MAX_EXTEND_BYTES", "MAX_SEQ", "stream_name"]

MAX_BATCH: Final = 1000  # the server's limit of messages in one atomic batch
# The most bytes one extend carries. The server stages an atomic batch through the stream's ingest
# queue (128 MiB) and drops what overflows it (429, "batch is incomplete"): 100 x 8 MB failed so.
# Half the queue leaves room for a concurrent batch; a dropped batch (nothing stored) is re-sent.
MAX_EXTEND_BYTES: Final = 64 * 1024 * 1024
# An extend's deadline grows by one second per this many bytes, beyond its timeout.
_EXTEND_BYTES_PER_SECOND: Final = 16 * 1024 * 1024
_PAGE: Final = 10_000
_READ_TRIES: Final = 5  # reads started again after racing a clear or an expiry
_SESSIONS_TIMEOUT: Final = 5.0  # each request of sessions() (a classmethod: no client's timeout=)
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(dict[str, Any])


_JSON_HOLDS = "dicts with str keys, lists, str, int, finite float, bool and None"


def _encode_message(message: object) -> bytes:
    """The JSON of ``message``, which must read back equal to it: else ``InvalidMessage``.

    msgspec would encode bytes as base64, datetime/UUID/Decimal/Enum as strings, tuples and sets
    as lists, int keys as strings and NaN as null, none of which read back as written; the check
    decodes the JSON again and compares, in C (measured: the encoding alone takes 1/1.6 of the
    time for a 4 MB image message, 1/4.8 for one of 100,000 small dicts, 13 ms then 62 ms).
    """
    if not isinstance(message, Mapping):
        raise InvalidMessage(f"a chat message is a mapping (dict), not {type(message).__name__}")
    try:
        data = _encoder.encode(message)
        exact = _decoder.decode(data) == message
    # ValueError: surrogates (UnicodeEncodeError), ints of over 4300 digits (Python's str limit)
    except (TypeError, ValueError, msgspec.EncodeError, RecursionError) as exc:
        raise InvalidMessage(f"the message is not JSON-encodable ({_JSON_HOLDS}): {exc}") from exc
    if not exact:
        raise InvalidMessage(
            f"the message would not read back as appended: {_inexact(message)}; "
            f"a message holds only {_JSON_HOLDS}; nothing was written"
        )
    return data


def _inexact(message: Mapping[Any, Any]) -> str:
    """Where and what the first value is that JSON cannot hold exactly (for the error message)."""
    stack: list[tuple[str, object]] = [("message", message)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return f"{path} is {value!r} (JSON has no such number)"
        if isinstance(value, (tuple, set, frozenset)):
            return f"{path} is a {type(value).__name__} (it would read back as a list)"
        if isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                if not isinstance(k, str):
                    return f"{path} has the key {k!r}, a {type(k).__name__} (it would read back as a str)"
                stack.append((f"{path}[{k!r}]", v))
        elif value is not None and not isinstance(value, (str, int, float)):
            back = type(_decoder.decode(_encoder.encode({"v": value}))["v"]).__name__
            return f"{path} is a {type(value).__name__} (it would read back as a {back})"
    return "a value does not compare equal to itself"


def _decode(data: bytes) -> dict[str, Any]:
    """A stored message. One appended from shallow code may be too deep for msgspec to read from
    deeper code (a message 980 levels deep, read 20 calls down: ``RecursionError``); ``codec``
    then reads it on a fresh thread."""
    message: dict[str, Any] = codec.decode(data, _decoder)
    return message


MAX_SEQ: Final = 2**63 - 1  # the largest sequence number ``after=`` takes (a signed 64-bit int)


def _check_count(name: str, value: object, *, none: bool) -> int | None:
    """``value`` when it is a non-negative int (None allowed with ``none``), else ``InvalidArgument``.

    ``bool`` is refused although it is an ``int``: ``last=True`` is a mistake, not "1"."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        allowed = "a non-negative int or None" if none else "a non-negative int"
        raise InvalidArgument(f"{name} must be {allowed}, not {value!r}")
    return value


def _check_after(after: object, name: str = "after") -> int | None:
    """``after`` when it is None or a sequence number (0 to ``MAX_SEQ``), else ``InvalidArgument``."""
    seq = _check_count(name, after, none=True)
    if seq is not None and seq > MAX_SEQ:
        raise InvalidArgument(f"{name} must be a sequence number up to {MAX_SEQ}, not {after!r}")
    return seq


def stream_name(namespace: str) -> str:
    return f"BOTWIRE_CHAT_{namespace}"


class _Names:
    """Subjects of one namespace's conversation logs."""

    def __init__(self, namespace: str) -> None:
        self.namespace = keys.check_namespace(namespace)
        self.stream = stream_name(namespace)
        self.chat = f"botwire.{namespace}.chat."
        self.ttl = f"botwire.{namespace}.chatttl."

    def config(self, replicas: int) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[f"{self.chat}>", f"{self.ttl}>"],
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


class AsyncChatHistory(StreamClient):
    """One conversation: an append-only, shared, persistent log of JSON messages.

    ``ttl`` (seconds or timedelta): the whole conversation expires ``ttl`` after its last write.
    """

    def __init__(
        self,
        session_id: str,
        *,
        namespace: str = "chat",
        ttl: float | timedelta | None = None,
        url: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
        replicas: int = 1,
        timeout: float = 5.0,
    ) -> None:
        self.session_id = keys.check_session_id(session_id)
        self._names = _Names(namespace)
        self.namespace = namespace
        self.ttl = ttl_seconds(ttl)
        self._replicas, self._timeout = check_options(replicas, timeout)
        super().__init__(resolve(url, token=token, user=user, password=password, creds=creds))
        token_path = keys.encode_key(session_id)
        self.subject = self._names.chat + token_path
        self._ttl_subject = self._names.ttl + token_path

    def _streams(self) -> list[StreamConfig]:
        return [self._names.config(self._replicas)]

    def __repr__(self) -> str:
        return f"AsyncChatHistory({self.session_id!r}, namespace={self.namespace!r})"

    # -- writing --------------------------------------------------------------------------------
    def _check_size(self, conn: Connection, data: bytes) -> None:
        limit = conn.max_body
        if len(data) > limit:
            raise ValueTooLarge(f"the message encodes to {len(data)} bytes; a message may hold {limit}")

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

    async def append(self, message: Mapping[str, Any]) -> int:
        """Append one message; return its sequence number (the conversation's total order)."""
        data = _encode_message(message)
        conn = self._conn or await self._connection()
        self._check_size(conn, data)
        headers = origin_headers()
        schedule = self._schedule()
        if schedule is None:
            return await conn.publish(self.subject, data, headers, self._timeout, what="append")
        # The schedule first, on the same connection, so the server re-arms the expiry before the
        # message lands; both acks are awaited together (one round trip).
        seqs = await conn.publish_pipelined([schedule, (self.subject, data, headers)], self._timeout, what="append")
        return seqs[1]

    async def extend(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Append several messages atomically (all stored, in order, or none); their sequences.

        At most ``MAX_BATCH`` messages and ``MAX_EXTEND_BYTES`` (64 MiB) of encoded messages
        (``ValueTooLarge`` before anything is sent). The call's deadline is its ``timeout`` plus
        one second per 16 MiB it carries.
        """
        if isinstance(messages, (str, bytes, Mapping)):
            raise InvalidMessage("extend takes a sequence of messages")
        payloads = [_encode_message(m) for m in messages]
        if not payloads:
            return []
        if len(payloads) > MAX_BATCH:
            raise ValueTooLarge(f"extend takes at most {MAX_BATCH} messages at once, not {len(payloads)}")
        total = sum(len(p) for p in payloads)
        if total > MAX_EXTEND_BYTES:
            raise ValueTooLarge(
                f"the messages encode to {total} bytes; one extend carries at most {MAX_EXTEND_BYTES} "
                "(64 MiB): split them over several extends"
            )
        conn = self._conn or await self._connection()
        for data in payloads:
            self._check_size(conn, data)
        headers = [origin_headers() for _ in payloads]
        for h in headers:  # ids known here, so that a batch cut at the storage limit can be looked up
            h["Nats-Msg-Id"] = conn.new_id()
        schedule = self._schedule()
        if schedule is not None:
            await conn.publish(*schedule, self._timeout, what="expiry schedule", advice=READ_FIRST)
        if len(payloads) == 1:
            last = await conn.publish(self.subject, payloads[0], headers[0], self._timeout, what="extend")
        else:
            budget = self._timeout + total / _EXTEND_BYTES_PER_SECOND
            # One deadline: the batch gets most of it, the rest is kept to look up a batch cut short
            # at the storage limit (a stalled server answers neither: the call still ends in time).
            lookup = min(1.0, self._timeout / 4)
            loop = asyncio.get_running_loop()
            end = loop.time() + budget
            try:
                last = await conn.publish_batch(
                    self.subject, payloads, headers, timeout=budget - lookup, what="extend"
                )
            except (QuotaExceeded, ServerUnavailable) as exc:
                if not conn.nc.is_connected:
                    raise  # the server went away: not the storage limit
                kept = []
                try:
                    async with asyncio.timeout(max(end - loop.time(), 0.001)):
                        kept = await self._partial_batch(conn, {h["Nats-Msg-Id"] for h in headers})
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
        return list(range(last - len(payloads) + 1, last + 1))

    async def _partial_batch(self, conn: Connection, ids: set[str]) -> list[int]:
        """The sequences of the messages of a failed batch that the server stored anyway.

        nats-server 2.15 at its storage limit stores the messages of an atomic batch that arrive
        before the limit and never answers the commit (measured: 18 of 20 stored, the commit timed
        out). The stream denies deletes (conversations are append-only), so the caller reports them.
        """
        stream = self._names.stream
        try:
            last = await conn.direct_get_last(stream, self.subject, self._timeout)
            if last is None:
                return []
            top = int((last.headers or {})["Nats-Sequence"])
            # the batch is among this conversation's newest messages; others' writes interleave
            msgs = await conn.read_subject(
                stream, self.subject, start_seq=max(1, top - 100_000), timeout=self._timeout
            )
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
        conn = await self._connection()
        await conn.purge(self._names.stream, self.subject, timeout=self._timeout)

    # -- reading --------------------------------------------------------------------------------
    async def _probe(self, conn: Connection, seq: int) -> tuple[Batch, int]:
        """The conversation's first message at or after ``seq`` (a one-message batch), and how many
        messages it has from there (the end-of-batch pending count, plus that one; 0: none)."""
        probe = await conn.direct_batch(
            self._names.stream, {"next_by_subj": self.subject, "seq": seq, "batch": 1}, self._timeout
        )
        return probe, (probe.pending + 1 if probe.msgs else 0)

    async def _start_seq(
        self, conn: Connection, after: int | None, last: int | None
    ) -> tuple[int, int | None] | None:
        """The sequence to read from so that at least the ``last`` newest messages follow, and how
        many messages followed it when probed (None: not probed), or None for nothing to read.

        Counts come from one-message probes (the end-of-batch pending count), so reading the tail
        of a long conversation costs a few small requests plus the tail itself.
        """
        start = (after or 0) + 1
        if last is None:
            return start, None
        probe, total = await self._probe(conn, start)
        if not total:
            return None
        first = probe.last_seq
        if total <= last:
            return first, total
        tail = await conn.direct_get_last(self._names.stream, self.subject, self._timeout)
        if tail is None:
            return None
        end = int((tail.headers or {})["Nats-Sequence"])
        lo, hi, at_lo = first, end, total  # count(>= lo) = at_lo >= last > count(> hi)
        guess = max(lo, end - int((end - first) * (last / total) * 1.25) - 1)
        for _ in range(12):
            probe, count = await self._probe(conn, guess)
            if count >= last:
                if count <= 2 * last + 64:
                    return probe.last_seq, count
                lo, at_lo = probe.last_seq, count
            else:
                hi = guess
            guess = (lo + hi) // 2
        return lo, at_lo

    async def _read(self, after: int | None, last: int | None, headers: bool) -> list[Msg]:
        after = _check_after(after)
        last = _check_count("last", last, none=True)
        if last == 0:
            return []
        conn = self._conn or await self._connection()
        for _ in range(_READ_TRIES):
            found = await self._start_seq(conn, after, last)
            if found is None:
                return []
            start, known = found
            try:
                msgs = await conn.read_subject(
                    self._names.stream,
                    self.subject,
                    start_seq=start,
                    page=_PAGE,
                    headers=headers,
                    known=known,
                    snapshot=True,
                    timeout=self._timeout,
                )
                break
            except SubjectPurged:
                continue  # cleared or expired while read: what is there now, never old and new mixed
        else:
            raise ChangedWhileRead(f"{self!r} was cleared {_READ_TRIES} times while it was read; read it again")
        msgs = [m for m in msgs if m.data]  # an empty body is the expiry marker, not a message
        if last is not None and len(msgs) > last:
            msgs = msgs[len(msgs) - last :]
        return msgs

    async def messages(self, last: int | None = None) -> list[dict[str, Any]]:
        """The messages, oldest first, exactly as appended (``last``: only the newest N)."""
        return [_decode(m.data) for m in await self._read(None, last, headers=False)]

    async def entries(self, after: int | None = None, last: int | None = None) -> list[Entry]:
        """Messages with their sequence and time; ``after`` a sequence, ``last`` N of them."""
        return [_entry(m) for m in await self._read(after, last, headers=True)]

    async def count(self) -> int:
        """How many messages the conversation holds."""
        probe, n = await self._probe(await self._connection(), 1)
        if not n:
            return 0
        if not probe.msgs[0].data or n <= 2:  # an expiry marker may be the only one left
            n = len(await self._read(None, None, headers=False))
        return n

    async def fork(self, session_id: str, upto: int | None = None) -> AsyncChatHistory:
        """A new conversation holding this one's messages up to and including sequence ``upto``.

        The new conversation must not exist yet (``Conflict`` otherwise, also for an empty fork);
        the original is untouched. ``upto`` is a sequence (an int >= 0; ``InvalidArgument``
        otherwise). Forks of up to 1000 messages are atomic; longer ones are written in atomic
        batches. A fork re-sent after a lost connection is read back, never reported as a
        ``Conflict`` with itself.
        """
        upto = _check_after(upto, "upto")  # upto=True is a mistake, not "up to sequence 1"
        other = AsyncChatHistory(
            session_id, namespace=self.namespace, ttl=self.ttl, replicas=self._replicas, timeout=self._timeout
        )
        other._opts = self._opts
        conn = await other._connection()
        msgs = await self._read(None, None, headers=upto is not None)
        if upto is not None:
            msgs = [m for m in msgs if int((m.headers or {})["Nats-Sequence"]) <= upto]
        if not msgs:  # nothing to copy: the target must still be new
            existing = await conn.direct_get_last(self._names.stream, other.subject, self._timeout)
            if existing is not None and existing.data:
                raise Conflict(f"cannot fork into {session_id!r}: that conversation already has messages")
            return other
        expected = 0
        for i, chunk in enumerate(_batches([m.data for m in msgs])):
            headers = []
            for _ in range(len(chunk)):
                h = origin_headers()
                h["Botwire-Forked-From"] = self.session_id
                headers.append(h)
            # Conditional: the fork must be a new conversation, and batches must not interleave.
            try:
                if len(chunk) == 1:
                    headers[0]["Nats-Expected-Last-Subject-Sequence"] = str(expected)
                    expected = await conn.publish(other.subject, chunk[0], headers[0], self._timeout, what="fork")
                else:
                    budget = self._timeout + sum(len(c) for c in chunk) / _EXTEND_BYTES_PER_SECOND
                    expected = await conn.publish_batch(
                        other.subject, chunk, headers, timeout=budget, expected=expected, what="fork"
                    )
            except Conflict:
                raise Conflict(
                    f"cannot fork into {session_id!r}: that conversation already has messages"
                    if i == 0
                    else f"the fork {session_id!r} was written to while it was being copied"
                ) from None
        schedule = other._schedule() if msgs else None
        if schedule is not None:
            await conn.publish(*schedule, self._timeout, what="expiry schedule")
        return other

    def watch(self, after: int | None = None) -> ChatWatch:
        """Live new entries from any process; with ``after``, first those after that sequence."""
        return ChatWatch(self, _check_after(after))

    # -- listing --------------------------------------------------------------------------------
    @classmethod
    async def sessions(
        cls,
        namespace: str = "chat",
        pattern: str = "*",
        *,
        limit: int | None = 100,
        offset: int = 0,
        before: SessionInfo | tuple[datetime, str] | None = None,
        url: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
    ) -> list[SessionInfo]:
        """Conversations whose id matches the glob, newest activity first, paginated.

        Order: ``(last_activity, session_id)``, descending. ``before`` (the last ``SessionInfo``
        of the previous page, or its ``(last_activity, session_id)``) lists only what comes after
        it: a stable cursor under concurrent writes, where ``offset`` would repeat or skip
        conversations that moved. The literal leading ``:``-segments of ``pattern`` narrow the
        search on the server; the cost is the last message of each matching conversation (one
        multi-last get, or the headers alone through a consumer beyond 1024 conversations) plus
        one count request, whatever the page.
        """
        names = _Names(namespace)
        if not isinstance(pattern, str) or not pattern:
            raise InvalidArgument(
                f"pattern must be a non-empty glob (str), not {pattern!r}; '*' lists every conversation"
            )
        limit = _check_count("limit", limit, none=True)
        offset = _check_count("offset", offset, none=False) or 0
        cursor = _check_cursor(before)
        opts = resolve(url, token=token, user=user, password=password, creds=creds)
        subject_filter, exact = keys.pattern_filter(pattern)
        conn = await open_with_streams(opts, [names.config(1)], _SESSIONS_TIMEOUT)
        try:
            subjects = names.chat + subject_filter
            lasts = await _last_messages(conn, names.stream, subjects)
            counts = await conn.subject_counts(names.stream, subjects, _SESSIONS_TIMEOUT)
            found: list[tuple[datetime, str, str]] = []
            n = len(names.chat)
            for subject, last_activity, is_marker in lasts:
                if is_marker:
                    continue  # expired a moment ago: only its expiry marker is left
                session_id = keys.decode_key(subject[n:])
                if not exact and not keys.matches(session_id, pattern):
                    continue
                if cursor is not None and (last_activity, session_id) >= cursor:
                    continue
                found.append((last_activity, session_id, subject))
            found.sort(reverse=True)
            end = None if limit is None else offset + limit
            page = found[offset:end]
            for _, _, subject in page:  # created while the counts were paged (past 100,000)
                if subject not in counts:
                    counts.update(await conn.subject_counts(names.stream, subject, _SESSIONS_TIMEOUT))
            # Written again within a second of expiring, a conversation still starts with the
            # expiry marker, which is no message: probed for the page only (one request each).
            recent = datetime.now(UTC) - timedelta(seconds=5)
            suspects = [s for t, _, s in page if t > recent and counts.get(s, 0) > 1]
            markers: set[str] = set()
            for i in range(0, len(suspects), 64):  # 64 requests in flight at once
                chunk = suspects[i : i + 64]
                probes = await asyncio.gather(
                    *(
                        conn.direct_batch(names.stream, {"next_by_subj": s, "seq": 1, "batch": 1}, _SESSIONS_TIMEOUT)
                        for s in chunk
                    )
                )
                for subject, probe in zip(chunk, probes, strict=True):
                    if probe.msgs and not probe.msgs[0].data:
                        markers.add(subject)
        finally:
            await release(conn)
        return [
            SessionInfo(session_id=sid, message_count=counts.get(subject, 0) - (subject in markers), last_activity=t)
            for t, sid, subject in page
        ]


def _check_cursor(before: object) -> tuple[datetime, str] | None:
    """``sessions(before=)`` as ``(last_activity, session_id)``, or ``InvalidArgument``."""
    if before is None:
        return None
    # A SessionInfo made by hand may hold a naive time (or none): checked as the tuple is.
    cursor = (before.last_activity, before.session_id) if isinstance(before, SessionInfo) else before
    if (
        isinstance(cursor, tuple)
        and len(cursor) == 2
        and isinstance(cursor[0], datetime)
        and cursor[0].tzinfo is not None
        and isinstance(cursor[1], str)
    ):
        return cursor[0], cursor[1]
    raise InvalidArgument(
        f"before must be a SessionInfo of a previous page or (aware datetime, session id), not {before!r}"
    )


async def _last_messages(conn: Connection, stream: str, subjects: str) -> list[tuple[str, datetime, bool]]:
    """(subject, time, is expiry marker) of the last message of each matching conversation."""
    out = []
    request: dict[str, Any] = {"multi_last": [subjects]}
    while True:
        batch = await conn.direct_batch(stream, request, _SESSIONS_TIMEOUT)
        if batch.too_many:
            break
        for m in batch.msgs:
            hdr = m.headers or {}
            out.append((hdr["Nats-Subject"], parse_time(hdr["Nats-Time-Stamp"]), not m.data or "Nats-Scheduler" in hdr))
        if not batch.msgs or not batch.pending:
            return out
        # The reply stopped at the server's byte cap (64 MiB by default): the rest of the same
        # snapshot, from the next sequence on (the pending count of a multi-last get is exact).
        request = {"multi_last": [subjects], "seq": batch.last_seq + 1, "up_to_seq": batch.up_to_seq}
    # More than the 1024 subjects a multi-last get answers: a headers-only consumer instead.
    msgs = await conn.pull_headers(stream, subjects, last_per_subject=True, timeout=_SESSIONS_TIMEOUT)
    return [
        (
            m.subject,
            _delivery_time(m),
            not m.headers or "Nats-Scheduler" in m.headers or m.headers.get("Nats-Msg-Size") == "0",
        )
        for m in msgs
    ]


def _delivery_time(m: Msg) -> datetime:
    """The stored time of a consumer-delivered message, rounded to microseconds exactly as
    ``parse_time`` rounds the ``Nats-Time-Stamp`` of a direct get (nats-py's own metadata goes
    through a float and can differ by a microsecond), so that cursors compare equal on both paths."""
    ns = int(_ack_timestamp(m.reply))
    seconds, nanos = divmod(ns, 1_000_000_000)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"
    return parse_time(text)


def _ack_timestamp(reply: str) -> str:
    tokens = reply.split(".")
    return tokens[7] if len(tokens) == 9 else tokens[Msg.Ack.Timestamp]


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


def _entry(m: Msg) -> Entry:
    hdr = m.headers or {}
    return Entry(seq=int(hdr["Nats-Sequence"]), time=parse_time(hdr["Nats-Time-Stamp"]), message=_decode(m.data))


class ChatWatch(LiveIterator[Entry]):
    """An async iterator of new ``Entry`` of one conversation; close it when done."""

    def __init__(self, chat: AsyncChatHistory, after: int | None) -> None:
        super().__init__(chat._connection, chat._names.stream, chat._timeout)
        self._chat = chat
        self._after = after

    def _first_seq(self) -> int | None:
        return None if self._after is None else self._after + 1

    async def _subscribe(self, conn: Connection, start_seq: int) -> Any:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
        return await conn.js.subscribe(self._chat.subject, ordered_consumer=True, config=config)

    async def _convert(self, conn: Connection, msg: Msg) -> Entry | None:
        if not msg.data:
            return None  # the expiry marker
        meta = msg.metadata
        return Entry(seq=meta.sequence.stream, time=meta.timestamp, message=_decode(msg.data))
