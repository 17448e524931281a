"""``AsyncChatHistory``: conversation logs, append-only and shared by every process.

It checks session ids, messages (JSON that reads back exactly as appended) and arguments, and
encodes and decodes messages; a ``_backend.ChatBackend`` stores them. Over NATS
(``nats/chatlog.py``) each conversation is one subject of the namespace's stream: an append is
one publish, and the server-assigned sequence is the conversation's total order, so concurrent
writers never lose or reorder each other's messages; ``extend`` is one atomic batch. Sliding TTL
is kept by the server: each write re-arms a one-shot schedule that removes the conversation when
it fires, so no reaper process is needed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import msgspec

from . import codec, keys
from ._backend import ChatLog, Feed, LogEntry, ReplayBackend, open_chat, open_replay
from .audit import Event, to_event
from .client import StreamClient, check_options, running_loop
from .errors import InvalidArgument, InvalidMessage, QuotaExceeded, ValueTooLarge
from .live import LiveIterator
from .models import Entry, SessionInfo
from .settings import resolve
from .times import ttl_seconds

__all__ = ["AsyncChatHistory", "ChatWatch", "MAX_BATCH", "MAX_EXTEND_BYTES", "MAX_SEQ"]

MAX_BATCH: Final = 1000  # the server's limit of messages in one atomic batch (JetStream's)
# The most bytes one extend carries. The server stages an atomic batch through the stream's ingest
# queue (128 MiB) and drops what overflows it (429, "batch is incomplete"): 100 x 8 MB failed so.
# Half the queue leaves room for a concurrent batch; a dropped batch (nothing stored) is re-sent.
MAX_EXTEND_BYTES: Final = 64 * 1024 * 1024
_SESSIONS_TIMEOUT: Final = 5.0  # each request of sessions() (a classmethod: no client's timeout=)
_encoder = codec.encoder  # the shared one; _encode_message checks that what it wrote reads back
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


class AsyncChatHistory(StreamClient[ChatLog]):
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
        replicas: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.session_id = keys.check_session_id(session_id)
        self.namespace = keys.check_namespace(namespace)
        self.ttl = ttl_seconds(ttl)
        self._replicas, self._timeout = check_options(replicas, timeout)
        super().__init__(resolve(url, token=token, user=user, password=password, creds=creds))
        self._replay: ReplayBackend | None = None

    async def _replayer(self) -> ReplayBackend:
        """The namespace's logs as events (opened on first use, on the same shared connection)."""
        await self._connection()  # this loop's client, else WrongEventLoop
        if self._replay is None:
            self._replay = await open_replay(self._opts, self.namespace, timeout=self._timeout)
        return self._replay

    async def close(self) -> None:
        """Release the connection (a shared connection closes with its last user)."""
        replay, self._replay = self._replay, None
        if replay is not None and self._loop is running_loop():
            await replay.close()
        await super().close()

    async def _open(self) -> ChatLog:
        backend = await open_chat(self._opts, self.namespace, replicas=self._replicas, timeout=self._timeout)
        return backend.log(self.session_id, self.ttl)

    def __repr__(self) -> str:
        return f"AsyncChatHistory({self.session_id!r}, namespace={self.namespace!r})"

    # -- writing --------------------------------------------------------------------------------
    @staticmethod
    def _check_size(log: ChatLog, data: bytes) -> None:
        limit = log.max_message
        if len(data) > limit:
            raise ValueTooLarge(f"the message encodes to {len(data)} bytes; a message may hold {limit}")

    async def append(self, message: Mapping[str, Any]) -> int:
        """Append one message; return its sequence number (the conversation's total order)."""
        data = _encode_message(message)
        log = self._conn or await self._connection()
        self._check_size(log, data)
        return await log.append(data)

    async def _append_once(self, message: Mapping[str, Any], msg_id: str) -> int:
        """``append`` with the caller's write id: a repeat within the backend's duplicate window
        (NATS: 120 s) stores nothing and returns the first one's sequence (``botwire serve``'s
        Idempotency-Key)."""
        data = _encode_message(message)
        log = self._conn or await self._connection()
        self._check_size(log, data)
        return await log.append(data, msg_id)

    async def extend(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Append several messages atomically (all stored, in order, or none); their sequences.

        At most ``MAX_BATCH`` messages and ``MAX_EXTEND_BYTES`` (64 MiB) of encoded messages
        (``ValueTooLarge`` before anything is sent). The call's deadline is its ``timeout`` plus
        one second per 16 MiB it carries. At the server's storage limit, where nats-server keeps
        the messages that arrived before it, ``QuotaExceeded`` names the ones stored.
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
        log = self._conn or await self._connection()
        for data in payloads:
            self._check_size(log, data)
        return await log.extend(payloads, total)

    async def clear(self) -> None:
        """Remove every message of this conversation (its sequence numbers are not reused).

        A pending expiry (``ttl``) is kept, so a message appended while ``clear()`` runs still expires.
        Over NATS the clear is first recorded as an event (time, origin), so that replay shows it
        and ``messages(at=)`` before it raises ``BeforeRetention`` instead of answering "empty".
        """
        log = await self._connection()
        if self._opts.transport == "nats":
            replay = await self._replayer()
            try:
                await replay.record_clear(self.session_id)
            except QuotaExceeded:
                # At the storage limit the record does not fit: clear first (which frees room),
                # then record it; a clear must work there (tests/test_storage_limits.py).
                await log.clear()
                with contextlib.suppress(QuotaExceeded):
                    await replay.record_clear(self.session_id)
                return
        await log.clear()

    # -- reading --------------------------------------------------------------------------------
    async def messages(
        self, last: int | None = None, *, at: datetime | None = None, window: int | None = None
    ) -> list[dict[str, Any]]:
        """The messages, oldest first, exactly as appended (``last``: only the newest N).

        ``at`` (an aware datetime): the messages as of that moment (``BeforeRetention`` when the
        conversation was cleared since, or its retention no longer reaches it; ``InvalidArgument``
        for a moment in the future by this machine's clock, as ``restore``: not known yet). ``window=N``: the
        latest summary recorded by ``compact`` (as its message), then at most the N newest
        messages after the ones it covers; without a summary, the N newest messages.
        """
        last = _check_count("last", last, none=True)
        window = _check_count("window", window, none=True)
        if sum(x is not None for x in (last, at, window)) > 1:
            raise InvalidArgument("give at most one of last=, at= and window=")
        if at is not None:
            from .audit import check_past

            moment = check_past(at)
            return [_decode(e.data) for e in await (await self._replayer()).log_at(self.session_id, moment)]
        if window is not None:
            return await self._window(window)
        if last == 0:
            return []
        log = self._conn or await self._connection()
        return [_decode(data) for data in await log.read(None, last)]

    async def _window(self, n: int) -> list[dict[str, Any]]:
        log = await self._connection()
        summary = await (await self._replayer()).last_summary(self.session_id) if self._opts.transport == "nats" else None
        head = [] if summary is None or summary.data is None else [_decode(summary.data)]
        if n == 0:
            return head
        # one read of the messages after the summary's: a snapshot, exact under concurrent appends
        return head + [_decode(e.data) for e in await log.entries(None if summary is None else summary.upto, n)]

    async def compact(self, summary: str | Mapping[str, Any], *, upto: int) -> int:
        """Record ``summary`` as covering the messages up to sequence ``upto``; its event's sequence.

        Append-only: the messages stay (for replay and audit); ``messages(window=N)`` then returns
        the summary and the messages after ``upto``. A ``str`` summary is stored as the message
        ``{"role": "system", "content": summary}``. ``upto`` must be one of this conversation's
        sequences (``InvalidArgument``, nothing written); over NATS only. A summary for an
        ``upto`` already summarised within the last 2 minutes (the log's de-duplication window)
        is a retry: nothing is stored, the first one's sequence is returned.
        """
        if isinstance(summary, str):
            if not summary:
                raise InvalidArgument("summary must be a non-empty str or a message (dict)")
            summary = {"role": "system", "content": summary}
        data = _encode_message(summary)
        seq = _check_after(upto, "upto")
        if seq is None or seq == 0:
            raise InvalidArgument(f"upto must be the sequence of one of the conversation's messages, not {upto!r}")
        log = await self._connection()
        self._check_size(log, data)
        return await (await self._replayer()).add_summary(self.session_id, data, seq)

    async def last_summary(self) -> Event | None:
        """The latest summary recorded by ``compact`` still in force (None: none, or cleared since):
        its ``value`` is the summary message, ``upto`` the last sequence it covers (what a
        compaction worker continues from). Over NATS only (``InvalidArgument`` over HTTP)."""
        await self._connection()
        raw = await (await self._replayer()).last_summary(self.session_id)
        return None if raw is None else to_event(raw)

    async def entries(self, after: int | None = None, last: int | None = None) -> list[Entry]:
        """Messages with their sequence and time; ``after`` a sequence, ``last`` N of them."""
        after = _check_after(after)
        last = _check_count("last", last, none=True)
        if last == 0:
            return []
        log = self._conn or await self._connection()
        return [Entry(seq=e.seq, time=e.time, message=_decode(e.data)) for e in await log.entries(after, last)]

    async def count(self) -> int:
        """How many messages the conversation holds."""
        return await (await self._connection()).count()

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
        target = await other._connection()
        source = await self._connection()
        await source.fork(target, upto, self.session_id)
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
        one count request, whatever the page; while the history materialiser is current, the
        page comes from its summaries instead (costs the page), with the same answer.
        """
        keys.check_namespace(namespace)
        if not isinstance(pattern, str) or not pattern:
            raise InvalidArgument(
                f"pattern must be a non-empty glob (str), not {pattern!r}; '*' lists every conversation"
            )
        limit = _check_count("limit", limit, none=True)
        offset = _check_count("offset", offset, none=False) or 0
        cursor = _check_cursor(before)
        opts = resolve(url, token=token, user=user, password=password, creds=creds)
        keys.pattern_filter(pattern)
        running_loop()  # a clear error outside asyncio
        backend = await open_chat(opts, namespace, replicas=None, timeout=_SESSIONS_TIMEOUT)
        try:
            return await backend.sessions(pattern, limit=limit, offset=offset, before=cursor)
        finally:
            await backend.close()


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


class ChatWatch(LiveIterator[LogEntry, Entry]):
    """An async iterator of new ``Entry`` of one conversation; close it when done."""

    def __init__(self, chat: AsyncChatHistory, after: int | None) -> None:
        async def open_feed() -> Feed[LogEntry]:
            return (await chat._connection()).watch(after)

        super().__init__(open_feed)

    def _convert(self, record: LogEntry) -> Entry:
        return Entry(seq=record.seq, time=record.time, message=_decode(record.data))
