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

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig

from . import keys
from .client import StreamClient, open_with_streams
from .errors import BotWireError, Conflict, InvalidArgument, InvalidMessage, QuotaExceeded, ServerUnavailable, ValueTooLarge
from .live import LiveIterator
from .memory import parse_time, ttl_seconds
from .models import Entry, SessionInfo
from .settings import resolve
from .transport import Connection, origin_headers, release

MAX_BATCH: Final = 1000  # the server's limit of messages in one atomic batch
_PAGE: Final = 10_000
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(dict[str, Any])


def _encode_message(message: object) -> bytes:
    if not isinstance(message, Mapping):
        raise InvalidMessage(f"a chat message is a mapping (dict), not {type(message).__name__}")
    try:
        return _encoder.encode(message)
    except (TypeError, msgspec.EncodeError, UnicodeEncodeError) as exc:  # lone surrogates: not UTF-8
        raise InvalidMessage(f"the message is not JSON-encodable: {exc}") from exc


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
        super().__init__(resolve(url, token=token, user=user, password=password, creds=creds))
        self._replicas = replicas
        self._timeout = timeout
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
        headers["Nats-Msg-Id"] = conn.new_id()
        schedule = self._schedule()
        if schedule is None:
            return await conn.publish(self.subject, data, headers, self._timeout, idempotent=True)
        # The schedule first, on the same connection, so the server re-arms the expiry before the
        # message lands; both acks are awaited together (one round trip).
        seqs = await conn.publish_pipelined([schedule, (self.subject, data, headers)], self._timeout, idempotent=True)
        return seqs[1]

    async def extend(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Append several messages atomically (all stored, in order, or none); their sequences."""
        if isinstance(messages, (str, bytes, Mapping)):
            raise InvalidMessage("extend takes a sequence of messages")
        payloads = [_encode_message(m) for m in messages]
        if not payloads:
            return []
        if len(payloads) > MAX_BATCH:
            raise ValueTooLarge(f"extend takes at most {MAX_BATCH} messages at once, not {len(payloads)}")
        conn = self._conn or await self._connection()
        for data in payloads:
            self._check_size(conn, data)
        headers = []
        for _ in payloads:
            h = origin_headers()
            h["Nats-Msg-Id"] = conn.new_id()
            headers.append(h)
        schedule = self._schedule()
        if schedule is not None:
            await conn.publish(*schedule, self._timeout, idempotent=True)
        if len(payloads) == 1:
            last = await conn.publish(self.subject, payloads[0], headers[0], self._timeout, idempotent=True)
        else:
            try:
                last = await conn.publish_batch(self.subject, payloads, headers, timeout=max(self._timeout, 10.0))
            except (QuotaExceeded, ServerUnavailable) as exc:
                if not conn.nc.is_connected:
                    raise  # the server went away: not the storage limit
                kept = await self._partial_batch(conn, {h["Nats-Msg-Id"] for h in headers})
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
            msgs = await conn.read_subject(stream, self.subject, start_seq=max(1, top - 100_000))
        except BotWireError:
            return []  # the server is gone: nothing to learn
        return [int(h["Nats-Sequence"]) for m in msgs if (h := m.headers or {}).get("Nats-Msg-Id") in ids]

    async def clear(self) -> None:
        """Remove every message of this conversation (its sequence numbers are not reused)."""
        conn = await self._connection()
        await conn.purge(self._names.stream, self.subject)
        await conn.purge(self._names.stream, self._ttl_subject)

    # -- reading --------------------------------------------------------------------------------
    async def _start_seq(self, conn: Connection, after: int | None, last: int | None) -> int | None:
        """The sequence to read from so that at least the ``last`` newest messages follow.

        Counts come from one-message probes (the end-of-batch pending count), so reading the tail
        of a long conversation costs a few small requests plus the tail itself.
        """
        start = (after or 0) + 1
        if last is None:
            return start
        stream = self._names.stream
        probe = await conn.direct_batch(stream, {"next_by_subj": self.subject, "seq": start, "batch": 1})
        if not probe.msgs:
            return None
        first = probe.last_seq
        total = probe.pending + 1
        if total <= last:
            return first
        tail = await conn.direct_get_last(stream, self.subject, self._timeout)
        if tail is None:
            return None
        end = int((tail.headers or {})["Nats-Sequence"])
        lo, hi = first, end  # count(>= lo) >= last > count(> hi)
        guess = max(lo, end - int((end - first) * (last / total) * 1.25) - 1)
        for _ in range(12):
            probe = await conn.direct_batch(stream, {"next_by_subj": self.subject, "seq": guess, "batch": 1})
            count = probe.pending + 1 if probe.msgs else 0
            if count >= last:
                if count <= 2 * last + 64:
                    return probe.last_seq
                lo = probe.last_seq
            else:
                hi = guess
            guess = (lo + hi) // 2
        return lo

    async def _read(self, after: int | None, last: int | None, headers: bool) -> list[Msg]:
        if last is not None and (not isinstance(last, int) or last < 0):
            raise InvalidArgument(f"last must be a non-negative int or None, not {last!r}")
        if last == 0:
            return []
        conn = self._conn or await self._connection()
        start = await self._start_seq(conn, after, last)
        if start is None:
            return []
        msgs = await conn.read_subject(self._names.stream, self.subject, start_seq=start, page=_PAGE, headers=headers)
        msgs = [m for m in msgs if m.data]  # an empty body is the expiry marker, not a message
        if last is not None and len(msgs) > last:
            msgs = msgs[len(msgs) - last :]
        return msgs

    async def messages(self, last: int | None = None) -> list[dict[str, Any]]:
        """The messages, oldest first, exactly as appended (``last``: only the newest N)."""
        return [_decoder.decode(m.data) for m in await self._read(None, last, headers=False)]

    async def entries(self, after: int | None = None, last: int | None = None) -> list[Entry]:
        """Messages with their sequence and time; ``after`` a sequence, ``last`` N of them."""
        return [_entry(m) for m in await self._read(after, last, headers=True)]

    async def count(self) -> int:
        """How many messages the conversation holds."""
        conn = await self._connection()
        probe = await conn.direct_batch(self._names.stream, {"next_by_subj": self.subject, "seq": 1, "batch": 1})
        if not probe.msgs:
            return 0
        n = probe.pending + 1
        if not probe.msgs[0].data or n <= 2:  # an expiry marker may be the only one left
            n = len(await self._read(None, None, headers=False))
        return n

    async def fork(self, session_id: str, upto: int | None = None) -> AsyncChatHistory:
        """A new conversation holding this one's messages up to and including sequence ``upto``.

        The new conversation must not exist yet (``Conflict`` otherwise); the original is untouched.
        Forks of up to 1000 messages are atomic; longer ones are written in atomic batches.
        """
        other = AsyncChatHistory(
            session_id, namespace=self.namespace, ttl=self.ttl, replicas=self._replicas, timeout=self._timeout
        )
        other._opts = self._opts
        conn = await other._connection()
        msgs = await self._read(None, None, headers=upto is not None)
        if upto is not None:
            msgs = [m for m in msgs if int((m.headers or {})["Nats-Sequence"]) <= upto]
        expected = 0
        for i in range(0, len(msgs), MAX_BATCH):
            chunk = [m.data for m in msgs[i : i + MAX_BATCH]]
            headers = []
            for j in range(len(chunk)):
                h = origin_headers()
                h["Botwire-Forked-From"] = self.session_id
                if j == 0:  # the fork must be a new conversation, and batches must not interleave
                    h["Nats-Expected-Last-Subject-Sequence"] = str(expected)
                headers.append(h)
            try:
                if len(chunk) == 1:
                    expected = await conn.publish(other.subject, chunk[0], headers[0], self._timeout)
                else:
                    expected = await conn.publish_batch(other.subject, chunk, headers, timeout=30.0)
            except Conflict:
                raise Conflict(
                    f"cannot fork into {session_id!r}: that conversation already has messages"
                    if i == 0
                    else f"the fork {session_id!r} was written to while it was being copied"
                ) from None
        schedule = other._schedule() if msgs else None
        if schedule is not None:
            await conn.publish(*schedule, self._timeout)
        return other

    def watch(self, after: int | None = None) -> ChatWatch:
        """Live new entries from any process; with ``after``, first those after that sequence."""
        return ChatWatch(self, after)

    # -- listing --------------------------------------------------------------------------------
    @classmethod
    async def sessions(
        cls,
        namespace: str = "chat",
        pattern: str = "*",
        *,
        limit: int | None = 100,
        offset: int = 0,
        url: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
    ) -> list[SessionInfo]:
        """Conversations whose id matches the glob, newest activity first, paginated.

        The literal leading ``:``-segments of ``pattern`` narrow the search on the server; the
        cost is the last message of each matching conversation (one multi-last get, or a
        headers-only consumer beyond 1024 conversations) plus one count request.
        """
        names = _Names(namespace)
        opts = resolve(url, token=token, user=user, password=password, creds=creds)
        subject_filter, exact = keys.pattern_filter(pattern)
        conn = await open_with_streams(opts, [names.config(1)])
        try:
            subjects = names.chat + subject_filter
            lasts = await _last_messages(conn, names.stream, subjects)
            counts = await conn.subject_counts(names.stream, subjects)
            found = []
            n = len(names.chat)
            recent = datetime.now(UTC) - timedelta(seconds=5)
            for subject, last_activity, is_marker in lasts:
                session_id = keys.decode_key(subject[n:])
                if not exact and not keys.matches(session_id, pattern):
                    continue
                if is_marker:
                    continue  # expired a moment ago: only its expiry marker is left
                count = counts.get(subject, 0)
                if count > 1 and last_activity > recent:
                    # Written again within a second of expiring: the marker, first, is no message.
                    probe = await conn.direct_batch(names.stream, {"next_by_subj": subject, "seq": 1, "batch": 1})
                    if probe.msgs and not probe.msgs[0].data:
                        count -= 1
                found.append(SessionInfo(session_id=session_id, message_count=count, last_activity=last_activity))
        finally:
            await release(conn)
        found.sort(key=lambda s: (s.last_activity, s.session_id), reverse=True)
        end = None if limit is None else offset + limit
        return found[offset:end]


async def _last_messages(conn: Connection, stream: str, subjects: str) -> list[tuple[str, datetime, bool]]:
    """(subject, time, is expiry marker) of the last message of each matching conversation."""
    batch = await conn.direct_batch(stream, {"multi_last": [subjects]})
    if not batch.too_many:
        out = []
        for m in batch.msgs:
            hdr = m.headers or {}
            out.append((hdr["Nats-Subject"], parse_time(hdr["Nats-Time-Stamp"]), not m.data or "Nats-Scheduler" in hdr))
        return out
    # More than the 1024 subjects a multi-last get answers: a headers-only consumer instead.
    msgs = await conn.pull_headers(stream, subjects, last_per_subject=True)
    return [
        (m.subject, m.metadata.timestamp, not m.headers or "Nats-Scheduler" in m.headers or m.headers.get("Nats-Msg-Size") == "0")
        for m in msgs
    ]


def _entry(m: Msg) -> Entry:
    hdr = m.headers or {}
    return Entry(seq=int(hdr["Nats-Sequence"]), time=parse_time(hdr["Nats-Time-Stamp"]), message=_decoder.decode(m.data))


class ChatWatch(LiveIterator[Entry]):
    """An async iterator of new ``Entry`` of one conversation; close it when done."""

    def __init__(self, chat: AsyncChatHistory, after: int | None) -> None:
        super().__init__(chat._connection)
        self._chat = chat
        self._after = after

    async def _subscribe(self, conn: Connection) -> Any:
        if self._after is None:
            return await conn.js.subscribe(self._chat.subject, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._after + 1)
        return await conn.js.subscribe(self._chat.subject, ordered_consumer=True, config=config)

    async def _convert(self, conn: Connection, msg: Msg) -> Entry | None:
        if not msg.data:
            return None  # the expiry marker
        meta = msg.metadata
        return Entry(seq=meta.sequence.stream, time=meta.timestamp, message=_decoder.decode(msg.data))
