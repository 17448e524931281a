"""Replay, time travel, point-in-time restore and retention of a namespace.

Every write of a namespace is an event in one of its two logs, kept by the server: the keys' log
(each ``set``/``delete``, and the server's expiries) and the conversations' log (each message,
``clear``, expiry, and ``compact``'s summaries), each event with its time and origin (``host/pid``
of the writer). ``areplay`` reads them back in order; ``arestore`` writes a namespace as it was
at a moment into another one; ``aretention`` reads and sets how much the server keeps, which is
what the first two can reach. The sync functions (``replay``, ``restore``, ``retention``) run the
same code on the shared event loop (``sync.py``). Over NATS only (``ReplayBackend``).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import msgspec

from . import codec, keys
from ._backend import Bound, RawEvent, ReplayBackend, open_replay
from .client import check_options, running_loop
from .errors import BotWireError, Conflict, InvalidArgument
from .settings import ConnectOptions, resolve

__all__ = [
    "Event",
    "RestoreReport",
    "Retention",
    "areplay",
    "arestore",
    "aretention",
    "check_bound",
    "check_past",
    "check_replay",
    "check_retention",
    "check_time",
    "parse_when",
    "raw_bursts",
    "raw_events",
]

MAX_KEY_HISTORY: Final = 64  # the most revisions per key a KV bucket keeps (nats-server's limit)
# The fewest messages per conversation a count limit keeps: a process serves last=N (N <= 64) from
# the newest messages it read, which stay exact only while the server keeps at least that many.
MIN_LOG_MESSAGES: Final = 64


class Event(msgspec.Struct, frozen=True):
    """One event of a namespace, as ``replay`` yields it.

    ``source``: ``"memory"`` (a key) or ``"chat"`` (a conversation); ``seq``: its sequence in that
    source's log (a key's revision, a message's sequence); ``kind``: ``set``, ``delete``,
    ``purge``, ``expire`` for keys, ``append``, ``clear``, ``expire``, ``summary`` for
    conversations; ``key``: the key or the session id; ``value``: the value, the message, or the
    summary message (None for the others); ``origin``: the writer's ``host/pid`` (None for what
    the server itself wrote, such as expiries); ``upto``: the last sequence a summary covers.
    """

    source: Literal["memory", "chat"]
    seq: int
    time: datetime
    kind: str
    key: str
    value: Any
    origin: str | None
    upto: int | None = None


class Retention(msgspec.Struct, frozen=True):
    """What a namespace keeps, hence what replay and ``at=`` reach.

    ``key_history``: revisions kept per key (1-64); ``log_messages``: messages kept per
    conversation (None: all); ``log_age``: seconds a conversation's messages are kept (None: for
    ever); ``oldest_key_event``/``oldest_log_event``: the oldest event each log still holds.
    """

    key_history: int
    log_messages: int | None
    log_age: float | None
    oldest_key_event: datetime | None
    oldest_log_event: datetime | None


class RestoreReport(msgspec.Struct, frozen=True):
    """What ``restore`` wrote into the new namespace."""

    keys: int
    conversations: int
    messages: int


# -- arguments ----------------------------------------------------------------------------------
def check_time(value: object, name: str = "at") -> datetime:
    """``value`` when it is an aware ``datetime``; else ``InvalidArgument``. Aware as Python
    defines it: a ``tzinfo`` that gives no offset (``utcoffset()`` None) makes it naive, and
    comparing it with an aware one raised ``TypeError``."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidArgument(
            f"{name} must be a timezone-aware datetime (e.g. datetime.now(UTC) - timedelta(minutes=5)), not {value!r}"
        )
    return value


# How far ahead of this machine's clock a moment may be and still be answered (as of now): the
# stored times come from the server's clock, and a client whose clock lags it a little must still
# be able to read as of an entry's own ``time`` right after writing it.
CLOCK_SKEW: Final = timedelta(seconds=2)


def check_past(value: object, name: str = "at", verb: str = "read") -> datetime:
    """``check_time``, and not in the future (by this machine's clock, give or take
    ``CLOCK_SKEW``): a state as of a moment not reached yet is not known. ``get(at=)``,
    ``messages(at=)``, ``restore`` and the HTTP ``past`` reads all refuse one (``InvalidArgument``):
    answering today's state for it, as they did, hid a mistake such as a local time given as UTC,
    and would not be what is read once that moment came."""
    at = check_time(value, name)
    if at > datetime.now(UTC) + CLOCK_SKEW:
        raise InvalidArgument(f"{name} ({at.isoformat()}) is in the future: {verb} a moment that has passed")
    return at


def check_bound(value: object, name: str) -> Bound:
    """A replay bound: None, a sequence (int >= 0) or an aware datetime; else ``InvalidArgument``."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return check_time(value, name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        # a stream sequence is a uint64: the server refused a larger one as invalid JSON
        raise InvalidArgument(
            f"{name} must be None, a sequence (int, 0 to 2**64-1) or an aware datetime, not {value!r}"
        )
    return value


_RELATIVE = re.compile(r"^-\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """A time from the command line: ISO-8601 (``2026-11-30T14:02:00Z``; no zone: UTC), ``now``,
    or relative to now (``-15m``, ``-2h``, ``-30s``, ``-1d``, ``-1w``); else ``InvalidArgument``."""
    now = now or datetime.now(UTC)
    text = text.strip()
    if text == "now":
        return now
    m = _RELATIVE.match(text)
    if m:
        try:
            return now - timedelta(seconds=float(m.group(1)) * _UNIT[m.group(2)])
        except OverflowError:  # before year 1: datetime cannot hold it
            raise InvalidArgument(f"{text!r} reaches before year 1: give a shorter span or an ISO-8601 time") from None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise InvalidArgument(
            f"{text!r} is not a time: give ISO-8601 (2026-11-30T14:02:00Z), 'now', or -15m / -2h / -1d"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _check_glob(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{name} must be a non-empty glob (str) or None, not {value!r}")
    keys.pattern_filter(value)
    return value


# -- events -------------------------------------------------------------------------------------
def _decoded(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return codec.decode(data)
    except BotWireError:
        return None


def to_event(raw: RawEvent) -> Event:
    return Event(raw.source, raw.seq, raw.time, raw.kind, raw.name, _decoded(raw.data), raw.origin, raw.upto)


async def _merge(a: AsyncIterator[list[RawEvent]], b: AsyncIterator[list[RawEvent]]) -> AsyncIterator[list[RawEvent]]:
    """Two logs' bursts of events as one, by time (keys first at equal times), each log's order
    kept: the same order as taking the earlier head event one at a time, a run at a time."""
    xs = await anext(a, None)
    ys = await anext(b, None)
    i = j = 0
    while xs is not None and ys is not None:
        out: list[RawEvent] = []
        while i < len(xs) and j < len(ys):
            k, y = i, ys[j].time
            while k < len(xs) and xs[k].time <= y:  # keys first at equal times
                k += 1
            out += xs[i:k]
            i = k
            if i == len(xs):
                break
            k, x = j, xs[i].time
            while k < len(ys) and ys[k].time < x:
                k += 1
            out += ys[j:k]
            j = k
        if out:
            yield out
        if i == len(xs):
            xs, i = await anext(a, None), 0
        if j == len(ys):
            ys, j = await anext(b, None), 0
    rest, left = (xs, a) if xs is not None else (ys, b)
    if rest is not None:
        yield rest[i if xs is not None else j :]
        async for burst in left:
            yield burst


def raw_bursts(
    backend: ReplayBackend, *, start: Bound, end: Bound, keys: str | None, conversations: str | None
) -> AsyncIterator[list[RawEvent]]:
    """The stored events of ``backend``'s namespace, undecoded, keys and conversations merged by
    time, a list at a time (as they arrive); arguments already checked."""
    if keys is not None and conversations is not None:
        return _merge(backend.key_bursts(keys, start, end), backend.chat_bursts(conversations, start, end))
    if keys is not None:
        return backend.key_bursts(keys, start, end)
    if conversations is not None:
        return backend.chat_bursts(conversations, start, end)
    return _nothing()


async def raw_events(
    backend: ReplayBackend, *, start: Bound, end: Bound, keys: str | None, conversations: str | None
) -> AsyncIterator[RawEvent]:
    """``raw_bursts`` one event at a time (what ``botwire serve`` streams)."""
    async for burst in raw_bursts(backend, start=start, end=end, keys=keys, conversations=conversations):
        for raw in burst:
            yield raw


async def _nothing() -> AsyncIterator[list[RawEvent]]:
    return
    yield


async def events(
    backend: ReplayBackend, *, start: Bound, end: Bound, keys: str | None, conversations: str | None
) -> AsyncGenerator[Event, None]:
    """The events of ``backend``'s namespace (see ``areplay``), arguments already checked."""
    async for burst in raw_bursts(backend, start=start, end=end, keys=keys, conversations=conversations):
        for raw in burst:
            yield to_event(raw)


def check_replay(
    namespace: str, start: object, end: object, keys_glob: object, conversations: object
) -> tuple[Bound, Bound, str | None, str | None]:
    keys.check_namespace(namespace)
    lo, hi = check_bound(start, "start"), check_bound(end, "end")
    k, c = _check_glob(keys_glob, "keys"), _check_glob(conversations, "conversations")
    if (isinstance(lo, int) or isinstance(hi, int)) and k is not None and c is not None:
        raise InvalidArgument(
            "a sequence bound is a position in one log: replay only keys or only conversations with it "
            "(keys=None or conversations=None; botwire replay --key or --conversation), or bound both by a time"
        )
    return lo, hi, k, c


def areplay(
    namespace: str,
    *,
    start: int | datetime | None = None,
    end: int | datetime | None = None,
    keys: str | None = "*",
    conversations: str | None = "*",
    url: str | None = None,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    timeout: float = 5.0,
) -> AsyncIterator[Event]:
    """Every event of ``namespace`` still kept, oldest first: ``async for e in areplay("app")``.

    ``start``/``end`` (inclusive): an aware datetime, or a sequence of one log (then replay only
    keys or only conversations). ``keys``/``conversations``: globs of the keys and session ids
    to replay (None: none of them). Keys and conversations are merged by time; within a log the
    order is the log's. What is kept: see ``aretention``. Bad arguments raise here, not at the
    first event.
    """
    lo, hi, k, c = check_replay(namespace, start, end, keys, conversations)
    opts = resolve(url, token=token, user=user, password=password, creds=creds)
    _, seconds = check_options(1, timeout)
    return _replay(opts, namespace, seconds, lo, hi, k, c)


async def _replay(
    opts: ConnectOptions, namespace: str, timeout: float, lo: Bound, hi: Bound, k: str | None, c: str | None
) -> AsyncIterator[Event]:
    running_loop()
    backend = await open_replay(opts, namespace, timeout=timeout)
    try:
        # one generator step per event here, the layers below step per burst (raw_bursts)
        async for burst in raw_bursts(backend, start=lo, end=hi, keys=k, conversations=c):
            for raw in burst:
                yield to_event(raw)
    finally:
        await backend.close()


# -- retention ----------------------------------------------------------------------------------
def check_retention(
    key_history: object, log_messages: object, log_age: object
) -> tuple[int | None, int | None, float | None]:
    if key_history is not None and (type(key_history) is not int or not 1 <= key_history <= MAX_KEY_HISTORY):
        raise InvalidArgument(
            f"key_history must be an int from 1 to {MAX_KEY_HISTORY} revisions per key, not {key_history!r}"
        )
    if log_messages is not None and (
        type(log_messages) is not int or log_messages < 0 or 0 < log_messages < MIN_LOG_MESSAGES
    ):
        raise InvalidArgument(
            f"log_messages must be 0 (keep all) or an int >= {MIN_LOG_MESSAGES}, not {log_messages!r}"
        )
    age: float | None = None
    if log_age is not None:
        if isinstance(log_age, timedelta):
            age = log_age.total_seconds()
        elif isinstance(log_age, (int, float)) and not isinstance(log_age, bool):
            age = float(log_age)
        else:
            raise InvalidArgument(f"log_age must be seconds or a timedelta (0: for ever), not {log_age!r}")
        if not math.isfinite(age) or age < 0 or 0 < age < 1 or age > 100 * 365.25 * 86400:
            raise InvalidArgument(f"log_age must be 0 (for ever) or from 1 s to 100 years, not {log_age!r}")
    return key_history, log_messages, age


async def aretention(
    namespace: str,
    *,
    key_history: int | None = None,
    log_messages: int | None = None,
    log_age: float | timedelta | None = None,
    url: str | None = None,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    timeout: float = 5.0,
) -> Retention:
    """What ``namespace`` keeps, after applying the limits given (None: unchanged).

    ``key_history``: revisions kept per key (1-64; what ``revisions``, ``get(at=)`` and replay
    reach for a key); ``log_messages``: messages kept per conversation (0: all); ``log_age``:
    seconds a conversation's messages are kept (0: for ever). The server applies them (the
    streams' ``max_msgs_per_subject`` and ``max_age``): older events are removed for good. Keys
    have no age limit: it would remove current values too. Invalid values: ``InvalidArgument``,
    nothing changed.
    """
    keys.check_namespace(namespace)
    history, messages, age = check_retention(key_history, log_messages, log_age)
    opts = resolve(url, token=token, user=user, password=password, creds=creds)
    _, seconds = check_options(1, timeout)
    running_loop()
    backend = await open_replay(opts, namespace, timeout=seconds)
    try:
        if history is not None or messages is not None or age is not None:
            await backend.set_retention(history, messages, age)
        state = await backend.retention()
    finally:
        await backend.close()
    return Retention(
        state.key_history, state.log_messages, state.log_age, state.oldest_key_event, state.oldest_log_event
    )


# -- restore ------------------------------------------------------------------------------------
async def _is_empty(opts: ConnectOptions, namespace: str, timeout: float) -> bool:
    backend = await open_replay(opts, namespace, timeout=timeout)
    try:
        # closed here, while connected: left to the garbage collector, its scans' clean-up ran
        # after backend.close() (a traceback on stderr)
        async with contextlib.aclosing(events(backend, start=None, end=None, keys="*", conversations="*")) as found:
            async for _ in found:
                return False
        return True
    finally:
        await backend.close()


async def arestore(
    source: str,
    *,
    at: datetime,
    into: str,
    overwrite: bool = False,
    url: str | None = None,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    timeout: float = 5.0,
) -> RestoreReport:
    """Write namespace ``source`` as it was at ``at`` into namespace ``into`` (point-in-time recovery).

    Every key that held a value at ``at`` gets that value (without a TTL), every conversation its
    messages up to ``at`` (new sequences, same order). Everything is read before anything is
    written: a moment older than what ``source`` keeps raises ``BeforeRetention``, one in the
    future ``InvalidArgument``, and nothing is written. ``into`` must hold no event yet (``Conflict``), unless ``overwrite=True``, which
    writes over what it holds (keys and conversations of ``source`` only: a key of ``source``
    without a value at ``at`` is deleted, each conversation restored is cleared first).
    """
    keys.check_namespace(source)
    keys.check_namespace(into)
    # the state "as of" a moment not yet reached is unknown: writing today's state under it
    # (as before) hid a mistake such as a local time given as UTC (``--at`` without a zone)
    at = check_past(at, verb="restore")
    if source == into:
        raise InvalidArgument("restore into a new namespace: into must differ from the source")
    if type(overwrite) is not bool:
        raise InvalidArgument(f"overwrite must be True or False, not {overwrite!r}")
    opts = resolve(url, token=token, user=user, password=password, creds=creds)
    _, seconds = check_options(1, timeout)
    running_loop()
    if not overwrite and not await _is_empty(opts, into, seconds):
        raise Conflict(f"namespace {into!r} is not empty: restore into a new one, or pass overwrite=True")
    backend = await open_replay(opts, source, timeout=seconds)
    try:
        key_names: set[str] = set()
        async for raw in backend.key_events("*", None, None):
            key_names.add(raw.name)
        session_ids: set[str] = set()
        async for raw in backend.chat_events("*", None, None):
            session_ids.add(raw.name)
        values = {}
        for key in sorted(key_names):
            data = await backend.key_at(key, at)
            if data is not None:
                values[key] = data
        logs = {}
        for session_id in sorted(session_ids):
            entries = await backend.log_at(session_id, at)
            if entries:
                logs[session_id] = entries
    finally:
        await backend.close()
    from .chat import AsyncChatHistory
    from .memory import AsyncMemory

    memory = AsyncMemory(into, timeout=seconds)
    memory._opts = opts
    try:
        for key, data in values.items():
            await memory._write(key, data, None, None)
        if overwrite:  # a key of source without a value then has none in the restored state either
            for key in sorted(key_names - values.keys()):
                await memory.delete(key)
    finally:
        await memory.close()
    count = 0
    for session_id, entries in logs.items():
        chat = AsyncChatHistory(session_id, namespace=into, timeout=seconds)
        chat._opts = opts
        try:
            log = await chat._connection()
            if overwrite:
                await chat.clear()  # else its messages would follow what a former restore wrote
            for i in range(0, len(entries), 500):
                part = [e.data for e in entries[i : i + 500]]
                await log.extend(part, sum(len(p) for p in part))
            count += len(entries)
        finally:
            await chat.close()
    return RestoreReport(len(values), len(logs), count)
