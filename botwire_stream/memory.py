"""``AsyncMemory``: the one async core of the key-value memory.

It checks names, keys, TTLs and options, encodes values (``codec``), and keeps what a user relies
on (``default=``, ``update``'s read-modify-write retried on conflicts, values over 64 MiB
refused); a ``_backend.MemoryBackend`` stores the bytes. Over NATS (``nats/kv.py``) each
namespace is a KV bucket whose stream is also the namespace's event log, and values larger than
one message are written as chunks and committed by one small manifest (``nats/blobs.py``): a
reader sees either the old value or the whole new one.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from . import codec, keys
from ._backend import ChangeFeed, Current, Feed, KeyChange, MemoryBackend, ReplayBackend, open_memory, open_replay
from .cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, Miss, ReadCache, notify
from .client import StreamClient, check_options
from .errors import BotWireError, Conflict, InvalidArgument, ValueTooLarge
from .live import LiveIterator
from .models import Change, Revision
from .settings import resolve
from .times import ttl_seconds

if TYPE_CHECKING:
    from .audit import Event

__all__ = ["AsyncMemory", "Watch", "MAX_VALUE_BYTES"]

MAX_VALUE_BYTES: Final = 64 * 1024 * 1024


class AsyncMemory(StreamClient[MemoryBackend]):
    """Namespaced key-value memory shared by every process that opens the same namespace.

    ``async with AsyncMemory("chat-app") as memory: await memory.set("k", {"a": 1})``. The
    connection is opened on first use; ``url`` and the credentials resolve as documented in the
    README (argument, then ``BOTWIRE_*`` environment, then the embedded server). ``cache=True``
    keeps read and written values in process (``cache.ReadCache``: at most ``cache_entries``
    values and ``cache_bytes`` bytes), coherent with every process's writes through the
    namespace's change feed.
    """

    def __init__(
        self,
        namespace: str,
        *,
        url: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
        history: int | None = None,
        replicas: int | None = None,
        timeout: float = 5.0,
        cache: bool = False,
        cache_entries: int = DEFAULT_MAX_ENTRIES,
        cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.namespace = keys.check_namespace(namespace)
        if history is not None and (type(history) is not int or not 1 <= history <= 64):
            raise InvalidArgument(f"history must be an int from 1 to 64 revisions per key, not {history!r}")
        self._replicas, self._timeout = check_options(replicas, timeout)
        if type(cache) is not bool:
            raise InvalidArgument(f"cache must be True or False, not {cache!r}")
        for name, bound in (("cache_entries", cache_entries), ("cache_bytes", cache_bytes)):
            if type(bound) is not int or bound < 1:
                raise InvalidArgument(f"{name} must be an int >= 1, not {bound!r}")
        super().__init__(resolve(url, token=token, user=user, password=password, creds=creds))
        self._history = history
        self._cache_limits = (cache_entries, cache_bytes) if cache else None
        self._cache: ReadCache | None = None
        self._replay: ReplayBackend | None = None

    def __repr__(self) -> str:
        return f"AsyncMemory({self.namespace!r})"

    async def _open(self) -> MemoryBackend:
        backend = await open_memory(
            self._opts, self.namespace, history=self._history, replicas=self._replicas, timeout=self._timeout
        )
        if self._cache_limits is not None:
            entries, size = self._cache_limits

            async def open_feed() -> ChangeFeed:
                return backend.changes()

            cache = ReadCache(open_feed, max_entries=entries, max_bytes=size, scope=self.namespace)
            try:
                await cache.start()
            except BaseException:
                await cache.close()
                await backend.close()
                raise
            self._cache = cache
        return backend

    async def close(self) -> None:
        """Release the connection (a shared connection closes with its last user); stop the cache."""
        cache, self._cache = self._cache, None
        if cache is not None and self._loop is asyncio.get_running_loop():
            await cache.close()
        replay, self._replay = self._replay, None
        if replay is not None and self._loop is asyncio.get_running_loop():
            await replay.close()
        await super().close()

    async def _replayer(self) -> ReplayBackend:
        """The namespace's logs as events (opened on first use, on the same shared connection)."""
        await self._connection()  # this loop's client, else WrongEventLoop
        if self._replay is None:
            self._replay = await open_replay(self._opts, self.namespace, timeout=self._timeout)
        return self._replay

    # -- reading --------------------------------------------------------------------------------
    async def get(self, key: str, default: Any = None, *, at: datetime | None = None) -> Any:
        """The value of ``key``, or ``default`` when it is missing, deleted or expired.

        ``at`` (an aware datetime): the value as of that moment instead, from the key's kept
        revisions (``BeforeRetention`` when they no longer reach it: see ``audit.aretention``).
        A moment in the future (by this machine's clock) raises ``InvalidArgument``, as
        ``restore`` does: its value is not known yet.
        """
        keys.check_key(key)  # InvalidKey before connecting
        if at is not None:
            from .audit import check_past

            data = await (await self._replayer()).key_at(key, check_past(at))
            return default if data is None else codec.decode(data)
        backend = self._conn or await self._connection()
        cache = self._cache
        if cache is None:
            current = await backend.get(key)
        else:
            hit = cache.lookup(key)
            if not isinstance(hit, Miss):
                return default if hit is None else codec.decode(hit)
            ticket = cache.begin(key)
            try:
                current = await backend.get(key)
            except BaseException:
                cache.finish(key, ticket, None, None)
                raise
            # a missing key is cached as revision 0: any write of it is newer
            cache.finish(key, ticket, *((0, None) if current is None else (current.revision, current.data)))
        if current is None or current.data is None:
            return default
        return codec.decode(current.data)

    async def contains(self, key: str) -> bool:
        """Whether ``key`` holds a value now."""
        keys.check_key(key)
        backend = self._conn or await self._connection()
        if self._cache is not None:
            hit = self._cache.lookup(key)
            if not isinstance(hit, Miss):
                return hit is not None
        return await backend.contains(key)

    async def revisions(self, key: str) -> list[Revision]:
        """The audit trail of ``key``, oldest first: the last ``history`` writes the server keeps
        (the namespace's setting: 16 unless opened with another ``history=``)."""
        keys.check_key(key)
        out = []
        for r in await (await self._connection()).revisions(key):
            value = None
            if r.data is not None:
                try:
                    value = codec.decode(r.data)
                except BotWireError:
                    value = None
            out.append(Revision(revision=r.revision, op=r.op, value=value, time=r.time))
        return out

    async def list_keys(self, pattern: str = "*", *, limit: int | None = None, after: str | None = None) -> list[str]:
        """The keys matching the glob ``pattern`` (fnmatch; ``*`` spans ``:``), sorted.

        The server's per-subject index names the keys under the pattern's literal leading
        ``:``-segments, so the cost follows the matching keys, not the size of the namespace nor
        how their writes interleave. Pages: ``limit`` keys at most, and ``after`` (the last key
        of the previous page) lists only the keys sorted after it.
        """
        keys.pattern_filter(pattern)  # InvalidKey before connecting
        if limit is not None and (type(limit) is not int or limit < 0):
            raise InvalidArgument(f"limit must be an int >= 0 or None, not {limit!r}")
        if after is not None and not isinstance(after, str):
            raise InvalidArgument(f"after must be a key (str, the last of the previous page) or None, not {after!r}")
        return await (await self._connection()).list_keys(pattern, limit=limit, after=after)

    # -- writing --------------------------------------------------------------------------------
    async def set(self, key: str, value: Any, *, ttl: float | timedelta | None = None) -> int:
        """Store ``value`` under ``key``; return its revision. ``ttl`` in seconds (None: forever)."""
        return await self._write(key, codec.encode(value), ttl_seconds(ttl), expected=None)

    async def _write(
        self,
        key: str,
        data: bytes,
        ttl: int | None,
        expected: int | None,
        replaced: Current | None = None,
        what: str = "set",
    ) -> int:
        """Store ``data`` as ``key``'s new value; ``expected``: only over that revision, which is
        ``replaced`` (known to ``update``). ``what`` names the write in an ``OutcomeUnknown``."""
        keys.check_key(key)
        size = len(data)
        if size > MAX_VALUE_BYTES:
            raise ValueTooLarge(
                f"value of {key!r} encodes to {size} bytes; the limit is {MAX_VALUE_BYTES} (64 MiB)"
            )
        backend = self._conn or await self._connection()
        cache = self._cache
        ticket = None if cache is None else cache.begin(key)  # this process's own write is what its next get sees
        notify(self.namespace, key, cache)  # also through this process's other objects
        revision = None
        try:
            revision = await backend.put(key, data, ttl=ttl, expected=expected, replaced=replaced, what=what)
        finally:
            if cache is not None and ticket is not None:
                cache.finish(key, ticket, revision, data)
            notify(self.namespace, key, cache)
        return revision

    async def delete(self, key: str) -> bool:
        """Delete ``key``; True when it held a value. The delete is kept in its revisions."""
        keys.check_key(key)
        backend = self._conn or await self._connection()
        cache = self._cache
        ticket = None if cache is None else cache.begin(key)
        notify(self.namespace, key, cache)
        try:
            return await backend.delete(key)
        finally:
            if cache is not None and ticket is not None:
                cache.finish(key, ticket, None, None)  # dropped: the next get reads the server
            notify(self.namespace, key, cache)

    async def update(
        self,
        key: str,
        fn: Callable[[Any], Any],
        *,
        default: Any = None,
        ttl: float | timedelta | None = None,
        max_attempts: int = 1000,
    ) -> Any:
        """Read-modify-write without lost updates: ``fn(current or default)`` becomes the value.

        The write is conditional on the revision read; when another writer got there first, the
        value is read again and ``fn`` called again. Returns the value written. A write re-sent
        after a lost connection is never applied twice: it is read back by its message id, and
        when that cannot settle it, ``OutcomeUnknown`` is raised (``fn``'s result is then stored
        once or not at all).
        """
        seconds = ttl_seconds(ttl)
        delay = 0.001
        keys.check_key(key)
        for _ in range(max_attempts):
            current = await (self._conn or await self._connection()).get(key)
            expected = 0 if current is None else current.revision
            value = default if current is None or current.data is None else codec.decode(current.data)
            new = fn(value)
            try:
                await self._write(key, codec.encode(new), seconds, expected=expected, replaced=current, what="update")
            except Conflict:
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 0.05)
                continue
            return new
        raise Conflict(f"update of {key!r} lost {max_attempts} races in a row; try again later")

    def replay(
        self, pattern: str = "*", *, start: int | datetime | None = None, end: int | datetime | None = None
    ) -> AsyncIterator[Event]:
        """The kept events of the keys matching ``pattern``, oldest first, each with its time and
        origin: from ``start`` to ``end`` (inclusive; a revision or an aware datetime). Bad
        arguments raise here, not at the first event."""
        from .audit import check_bound

        keys.pattern_filter(pattern)
        return self._replay_events(pattern, check_bound(start, "start"), check_bound(end, "end"))

    async def _replay_events(
        self, pattern: str, lo: int | datetime | None, hi: int | datetime | None
    ) -> AsyncIterator[Event]:
        from .audit import events

        backend = await self._replayer()
        async for event in events(backend, start=lo, end=hi, keys=pattern, conversations=None):
            yield event

    # -- live changes ---------------------------------------------------------------------------
    def watch(self, pattern: str = "*") -> Watch:
        """Live changes of keys matching ``pattern``, made by any process, from now on.

        Use ``async for change in memory.watch("user:*")``, or ``async with memory.watch() as w``
        to be sure the subscription is live before writing.
        """
        keys.pattern_filter(pattern)  # InvalidKey now, not at the first change
        return Watch(self, pattern)


class Watch(LiveIterator[KeyChange, Change]):
    """An async iterator of ``Change`` (see ``AsyncMemory.watch``); close it when done."""

    def __init__(self, memory: AsyncMemory, pattern: str) -> None:
        async def open_feed() -> Feed[KeyChange]:
            return (await memory._connection()).watch(pattern)

        super().__init__(open_feed)

    def _convert(self, record: KeyChange) -> Change:
        value = None if record.data is None else codec.decode(record.data)
        return Change(key=record.key, op=record.op, value=value, revision=record.revision, time=record.time)
