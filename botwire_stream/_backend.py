"""The backend protocols: the storage operations the async cores need, whatever carries them.

The cores (``memory.py``, ``chat.py``) validate arguments, encode and decode values, and keep the
user-facing semantics (``update``'s read-modify-write loop, ``default=``, argument errors); a
backend moves encoded bytes to and from storage and owns the storage layout (subjects, headers,
chunks, schedules, paging, re-sends). ``nats/kv.py`` and ``nats/chatlog.py`` implement these
over NATS JetStream; an HTTP transport implements the same protocols over the server's REST API.
``open_memory`` and ``open_chat`` choose the implementation from the URL scheme.

Protocols are at the level of our operations, not of JetStream's: nothing here names a stream, a
subject or a header. Values cross as ``bytes`` (already encoded by ``codec``), so a backend never
decodes or copies a value on the hot paths (``get``, ``set``, ``append``, ``messages``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, Self, TypeVar

import msgspec

from .errors import InvalidArgument
from .models import Op, SessionInfo
from .settings import SCHEMES, ConnectOptions

__all__ = [
    "ChangeFeed",
    "ChatBackend",
    "ChatLog",
    "ReplayBackend",
    "RawEvent",
    "RetentionState",
    "Current",
    "Feed",
    "KeyChange",
    "KeyRevision",
    "LogEntry",
    "MemoryBackend",
    "Snapshot",
    "TRANSPORTS",
    "TokenBackend",
    "TokenState",
    "open_chat",
    "open_memory",
    "open_replay",
    "open_tokens",
    "prepare",
]

R_co = TypeVar("R_co", covariant=True)

TRANSPORTS = frozenset(SCHEMES.values())  # the backends there are: {"nats", "http"}


class Current(msgspec.Struct, frozen=True):
    """A key's last stored record (what ``MemoryBackend.get`` returns).

    ``data`` is the encoded value, or None when the key holds none (deleted, expired, or a chunked
    value expiring right now). ``handle`` is the backend's own note on that record, handed back
    through ``put(replaced=)`` so that the write can reclaim what the replaced value occupied.
    """

    revision: int
    data: bytes | None
    handle: Any = None


class KeyRevision(msgspec.Struct, frozen=True):
    """One kept revision of a key (``MemoryBackend.revisions``); ``data`` None: no readable value."""

    revision: int
    op: Op
    data: bytes | None
    time: datetime


class KeyChange(msgspec.Struct, frozen=True):
    """One change delivered by a memory watch; ``data`` None for deletes and expiries."""

    key: str
    op: Op
    data: bytes | None
    revision: int
    time: datetime


class LogEntry(msgspec.Struct, frozen=True):
    """One message of a conversation with its sequence and stored time."""

    seq: int
    time: datetime
    data: bytes


class Feed(Protocol[R_co]):
    """A live subscription that survives reconnects (neither skips nor repeats a record).

    ``start`` returns once subscribed: what is written afterwards is delivered. ``__anext__``
    raises ``StopAsyncIteration`` once ``aclose`` was called (also from a reader blocked in it),
    and ``ServerUnavailable`` when the server stays away: never a silent end.
    """

    async def start(self) -> object: ...
    def __anext__(self) -> Awaitable[R_co]: ...
    async def aclose(self) -> None: ...


class ChangeFeed(Feed[KeyChange], Protocol):
    """Every change of a namespace, for ``cache.ReadCache``; ``data`` is None also for a value
    the feed does not carry (a chunked one): the cache then drops the key."""

    def coherent(self) -> object | None:
        """A token that stays the same while the feed delivers every change, in order, soon after
        it is stored; None while it may not (disconnected, resubscribing, far behind). A feed that
        comes back has a new token."""
        ...


class MemoryBackend(Protocol):
    """One namespace's key-value storage, opened by ``open_memory`` and released by ``close``."""

    async def get(self, key: str) -> Current | None:
        """The key's last record (None: nothing stored); a chunked value is read whole or not at
        all (``ChangedWhileRead`` when it kept changing)."""
        ...

    async def contains(self, key: str) -> bool:
        """Whether the key holds a value now (reads no value)."""
        ...

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        ttl: int | None,
        expected: int | None = None,
        replaced: Current | None = None,
        what: str = "set",
    ) -> int:
        """Store ``data`` as the key's new value (with ``ttl`` whole seconds, None: forever); its
        revision. ``expected``: only over that revision (0: none), else ``Conflict``; ``replaced``
        is that revision's ``Current``. ``what`` names the write in an ``OutcomeUnknown``, which
        says repeating it is safe for an unconditional write, and to read first for a conditional one."""
        ...

    async def delete(self, key: str) -> bool:
        """Delete the key (recorded as a revision); True when it held a value."""
        ...

    async def list_keys(self, pattern: str, *, limit: int | None = None, after: str | None = None) -> list[str]:
        """The keys matching the glob that hold a value, sorted; only those sorted after
        ``after``, at most ``limit`` of them."""
        ...

    async def revisions(self, key: str) -> list[KeyRevision]:
        """The kept revisions of the key, oldest first."""
        ...

    def watch(self, pattern: str, after: int | None = None) -> Feed[KeyChange]:
        """Live changes of the keys matching the glob, from when it starts; with ``after`` (a
        revision), first the changes after it (how an SSE client resumes with Last-Event-ID)."""
        ...

    def changes(self) -> ChangeFeed:
        """Every change of the namespace, from when it starts (what keeps a read cache coherent)."""
        ...

    async def close(self) -> None:
        """Release the connection (shared ones close with their last user)."""
        ...


class ChatLog(Protocol):
    """One conversation of a ``ChatBackend``: an append-only log of encoded messages."""

    @property
    def max_message(self) -> int:
        """The largest encoded message one append may carry (bytes)."""
        ...

    async def append(self, data: bytes, msg_id: str | None = None) -> int:
        """Append one message (re-arming the conversation's expiry); its sequence. ``msg_id``: a
        caller's id for the write, a repeat of which (within the backend's duplicate window) is
        not stored again and answers the first one's sequence."""
        ...

    async def extend(self, payloads: list[bytes], total: int) -> list[int]:
        """Append ``payloads`` (``total`` bytes) atomically; their sequences (``QuotaExceeded``
        naming the stored ones when the server kept only some)."""
        ...

    async def read(self, after: int | None, last: int | None) -> list[bytes]:
        """The messages after sequence ``after``, only the ``last`` newest when given, oldest
        first; never a mix of before and after a concurrent clear. ``last`` is what a chat turn
        reads: it should cost about an append, whatever the conversation's length (NATS: one
        request once this process has read or written the conversation)."""
        ...

    async def entries(self, after: int | None, last: int | None) -> list[LogEntry]:
        """As ``read``, with each message's sequence and time."""
        ...

    async def count(self) -> int: ...

    async def clear(self) -> None:
        """Remove every message (the pending expiry is kept)."""
        ...

    async def fork(self, target: Self, upto: int | None, origin: str) -> None:
        """Copy the messages up to sequence ``upto`` into ``target``, which must be empty
        (``Conflict``); ``origin`` is this conversation's id, recorded with each copy."""
        ...

    def watch(self, after: int | None) -> Feed[LogEntry]:
        """Live entries; with ``after``, first those after that sequence."""
        ...

    async def close(self) -> None:
        """Release the backend this log came from."""
        ...


class ChatBackend(Protocol):
    """One namespace's conversation logs, opened by ``open_chat`` and released by ``close``."""

    def log(self, session_id: str, ttl: int | None) -> ChatLog:
        """The conversation ``session_id``; each write makes it expire ``ttl`` s later (None: never)."""
        ...

    async def sessions(
        self, pattern: str, *, limit: int | None, offset: int, before: tuple[datetime, str] | None
    ) -> list[SessionInfo]:
        """Conversations matching the glob, newest ``(last_activity, session_id)`` first, only
        those older than ``before``; ``offset`` and ``limit`` cut the page."""
        ...

    async def close(self) -> None: ...


# ``open_memory``/``open_chat``/``prepare`` are the one place that names the implementations; they import
# them when called (``settings.resolve`` has already refused unknown schemes, naming the supported
# ones), so that importing a core stays light and ``nats/`` may import this module for its types.
def _check_transport(opts: ConnectOptions) -> None:
    if opts.transport not in TRANSPORTS:
        raise InvalidArgument(f"no backend for the transport {opts.transport!r}; supported: {', '.join(TRANSPORTS)}")


async def open_memory(
    opts: ConnectOptions, namespace: str, *, history: int | None, replicas: int | None, timeout: float
) -> MemoryBackend:
    """The key-value backend for ``opts`` (by ``opts.transport``), its namespace made sure to exist."""
    _check_transport(opts)
    if opts.transport == "http":
        from .http.memory import open_memory as open_http

        return await open_http(opts, namespace, history=history, replicas=replicas, timeout=timeout)
    from .nats.kv import open_memory as open_nats

    return await open_nats(opts, namespace, history=history, replicas=replicas, timeout=timeout)


def prepare(opts: ConnectOptions, while_booting: Callable[[], object]) -> None:
    """Before a sync face's first call: start what ``opts`` needs on this machine (the embedded
    server), calling ``while_booting`` (the portal's start) while it boots; else nothing."""
    if opts.embedded:
        from .nats import embedded

        embedded.ensure(Path(opts.home) if opts.home else None, while_booting=while_booting)


async def open_chat(opts: ConnectOptions, namespace: str, *, replicas: int | None, timeout: float) -> ChatBackend:
    """The conversation-log backend for ``opts`` (by ``opts.transport``), its namespace made sure to exist."""
    _check_transport(opts)
    if opts.transport == "http":
        from .http.chat import open_chat as open_http

        return await open_http(opts, namespace, replicas=replicas, timeout=timeout)
    from .nats.chatlog import open_chat as open_nats

    return await open_nats(opts, namespace, replicas=replicas, timeout=timeout)


# --- token streams (issue 7) ---

class TokenState(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """A token stream's stored state (everything but its chunks).

    ``base``: for a fork, the ``(key, after, upto)`` segments it shares with its sources, oldest
    first; ``sources``: the keys whose ``refs`` it holds. ``refs``: how many forks read this
    stream's chunks (a deleted stream with refs is only marked ``deleted``). ``fork``: the fork
    request as given (path, offset, sub-offset), to tell a re-creation from a conflict.
    """

    path: str
    content_type: str
    created: float
    ttl: int | None = None
    expires_at: str | None = None
    expires: float | None = None
    closed: bool = False
    closed_by: tuple[str, int, int] | None = None
    producers: dict[str, tuple[int, int]] = {}
    stream_seq: str | None = None
    base: list[tuple[str, int, int]] = []
    sources: list[str] = []
    fork: tuple[str, int, int] | None = None
    refs: int = 0
    deleted: bool = False


class Snapshot(msgspec.Struct):
    """A loaded state: its ``version`` (compare-and-set token), the sequence of the stream's own
    last chunk (0: none), and the time of its last write or read (POSIX seconds)."""

    key: str
    state: TokenState
    version: int
    last: int
    activity: float


class CommitResult(msgspec.Struct):
    """The stored chunk's sequence (0: no chunk) and the state's version after the commit."""

    seq: int
    version: int


class TokenBackend(Protocol):
    """Storage of token streams: every write is compare-and-set on the state's version."""

    @property
    def max_chunk(self) -> int: ...

    def key(self, path: str) -> str: ...

    async def load(self, key: str) -> Snapshot | None: ...

    async def commit(self, key: str, version: int, chunk: bytes | None, state: TokenState | None) -> CommitResult: ...

    async def read(self, segments: Sequence[tuple[str, int, int]], max_bytes: int) -> list[tuple[int, bytes]]: ...

    async def purge(self, key: str) -> None: ...

    async def touch(self, key: str) -> None: ...

    async def watch(self, key: str, event: asyncio.Event) -> None: ...

    async def unwatch(self, key: str, event: asyncio.Event) -> None: ...

    async def close(self) -> None: ...


async def open_tokens(opts: ConnectOptions, *, replicas: int | None, timeout: float) -> TokenBackend:
    """The token-stream backend for ``opts`` (by ``opts.transport``), its storage made sure to exist."""
    _check_transport(opts)
    if opts.transport != "nats":
        raise InvalidArgument("token streams are served over NATS; over HTTP, use the Durable Streams protocol of botwire serve")
    from .nats.tokens import open_tokens as open_nats

    return await open_nats(opts, replicas=replicas, timeout=timeout)


# --- replay, time travel, retention (issue 10) ---

class RawEvent(msgspec.Struct, frozen=True):
    """One stored event of a namespace, as ``ReplayBackend`` yields it.

    ``source``: ``memory`` (a key's write) or ``chat`` (a conversation's); ``seq``: its sequence in
    that source's log; ``name``: the key or the session id; ``kind``: set, delete, purge, expire
    (keys), append, expire, clear, summary (conversations); ``data``: the encoded value, message
    or summary (None when the event carries none); ``origin``: who wrote it (``host/pid``), None
    for events the server itself wrote (expiries); ``upto``: what a summary covers.
    """

    source: Literal["memory", "chat"]
    seq: int
    time: datetime
    kind: str
    name: str
    data: bytes | None
    origin: str | None
    upto: int | None = None


class RetentionState(msgspec.Struct, frozen=True):
    """What a namespace keeps: revisions per key, messages per conversation (None: all), how long
    a conversation's messages are kept (seconds; None: for ever), and the oldest kept event of
    each log (None: empty)."""

    key_history: int
    log_messages: int | None
    log_age: float | None
    oldest_key_event: datetime | None
    oldest_log_event: datetime | None


Bound = int | datetime | None  # a sequence of the source's log, or an aware time


class ReplayBackend(Protocol):
    """One namespace's logs read as events, past states, its retention, and conversation events
    that are not messages (summaries, clears)."""

    def key_events(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[RawEvent]:
        """The events of the keys matching the glob, oldest first, from ``start`` to ``end``
        inclusive."""
        ...

    def chat_events(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[RawEvent]:
        """The events of the conversations matching the glob, oldest first."""
        ...

    def key_bursts(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[list[RawEvent]]:
        """``key_events`` a non-empty list at a time, as they arrive (a replay steps per list)."""
        ...

    def chat_bursts(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[list[RawEvent]]:
        """``chat_events`` a non-empty list at a time."""
        ...

    async def key_at(self, key: str, at: datetime) -> bytes | None:
        """The key's encoded value as of ``at`` (None: none), or ``BeforeRetention``."""
        ...

    async def log_at(self, session_id: str, at: datetime) -> list[LogEntry]:
        """The conversation's messages as of ``at``, or ``BeforeRetention``."""
        ...

    async def add_summary(self, session_id: str, data: bytes, upto: int) -> int:
        """Record a summary covering the messages up to sequence ``upto`` (which must be one of
        the conversation's, else ``InvalidArgument``); its sequence."""
        ...

    async def last_summary(self, session_id: str) -> RawEvent | None:
        """The newest summary still in force (none after a later clear)."""
        ...

    async def record_clear(self, session_id: str) -> None:
        """Record that the conversation is being cleared (before its messages are removed)."""
        ...

    async def ensure_events(self) -> None:
        """Make the namespace's conversation log carry the events that are not messages
        (summaries, clears): a log made by an older version lacks them. A consumer of those
        events calls it before subscribing; ``add_summary``/``record_clear`` call it themselves."""
        ...

    async def retention(self) -> RetentionState: ...

    async def set_retention(self, key_history: int | None, log_messages: int | None, log_age: float | None) -> None:
        """Apply the given limits (None: leave that one as it is; 0: keep all of the log)."""
        ...

    async def close(self) -> None: ...


async def open_replay(opts: ConnectOptions, namespace: str, *, timeout: float) -> ReplayBackend:
    """The replay backend for ``opts`` (by ``opts.transport``); over HTTP, replay and past
    states only (summaries, clear records and retention are NATS-only)."""
    _check_transport(opts)
    if opts.transport == "http":
        from .http.replay import open_replay as open_http

        return await open_http(opts, namespace, timeout=timeout)
    from .nats.replay import open_replay as open_nats

    return await open_nats(opts, namespace, timeout=timeout)
