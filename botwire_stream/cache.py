"""``ReadCache``: recently read values of one namespace, kept in process and coherent.

A repeated ``get`` of a hot key (a chat app reads the same few keys every turn) becomes a
dictionary lookup instead of a round trip. What keeps it coherent is the namespace's change feed
(``MemoryBackend.changes``: every write of every process, in order, resuming after reconnects):
each change replaces or drops the entry of its key. The rules, and why each one holds:

- An entry is served only while the feed is coherent, with the token it had when the entry was
  stored. A feed that lost its subscription (disconnected, resubscribing after a server restart,
  or so far behind that it may be dropping changes) has no token, and one that came back has a
  new one: the cache is then emptied, never served stale.
- A value read (or written by this process) is stored only if no change of its key arrived while
  the read or write was in flight: a change could be newer than what the read got.
- A change replaces an entry only when its revision is newer, so a late change never hides the
  value this process just wrote or read.
- Bounded: at most ``max_entries`` entries and ``max_bytes`` bytes, least recently used
  dropped first (an entry counts its value, its key and 229 B); a value over an eighth of
  ``max_bytes`` is not kept.
- Another object of this process writing a key of the same namespace (two ``Memory`` objects,
  cached or not) counts as a change of it for every cache of the namespace, as the write starts
  and once it ends (``notify``): the feed alone let a read right after it give the old value
  (measured: 1 of 300 reads, and an ``update`` through one object read back old through the other).
- The loop marks itself alive every 0.05 s. The sync face looks values up in its callers'
  threads, which go on while the loop thread is blocked and changes wait unread: a lookup then
  serves nothing once the mark is 0.2 s old, and the loop empties the cache when it comes back.

A write by another process is therefore seen once the feed delivers it: the server's push to
this process plus the loop's turn (measured in the README's performance section), and never
later than 0.2 s plus one turn of a loop that was blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final

from ._backend import ChangeFeed, KeyChange

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_ENTRIES", "MISS", "Miss", "ReadCache", "Ticket", "notify"]

DEFAULT_MAX_ENTRIES: Final = 10_000
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
_RETRY_FEED: Final = 1.0  # seconds before a feed that failed is opened again
# The sync face looks values up from other threads, which keep running while the loop thread is
# blocked (a long decode, a callback that sleeps): changes then wait unread in the socket. The loop
# marks itself alive every _TICK s; a lookup finding the mark older than _STALLED serves nothing.
_TICK: Final = 0.05
_STALLED: Final = 0.2


class Miss:
    """The type of ``MISS``: not in the cache (None is a cached "missing")."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS: Final = Miss()

# (token of the feed when the read or write began, changes of the key seen before it began)
Ticket = tuple[object, int]

# The open caches of each namespace in this process (objects may live on other threads' loops).
_SCOPES: dict[str, weakref.WeakSet[ReadCache]] = {}
_SCOPES_LOCK = threading.Lock()


def notify(scope: str, key: str, writer: ReadCache | None) -> None:
    """This process writes ``key`` of namespace ``scope`` through an object whose cache is
    ``writer`` (None: uncached): for every other cache of the namespace, a change of the key.
    Called as the write starts and once it ends (so a read in flight across it is not kept)."""
    with _SCOPES_LOCK:
        peers = _SCOPES.get(scope)
        if not peers:
            return
        others = [c for c in peers if c is not writer]
    for cache in others:
        cache.changed(key)


class ReadCache:
    """The cached values of one namespace (see the module docstring); runs on the client's loop."""

    def __init__(
        self,
        open_feed: Callable[[], Awaitable[ChangeFeed]],
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        scope: str | None = None,
    ) -> None:
        self._open_feed = open_feed
        self._scope = scope
        if scope is not None:
            with _SCOPES_LOCK:
                _SCOPES.setdefault(scope, weakref.WeakSet()).add(self)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._largest = max_bytes // 8
        # key -> (revision, encoded value or None when missing); least recently used first
        self._entries: OrderedDict[str, tuple[int, bytes | None]] = OrderedDict()
        self.size = 0  # bytes counted for the entries
        self._inflight: dict[str, list[int]] = {}  # key -> [reads/writes in flight, changes seen]
        self._feed: ChangeFeed | None = None
        self._token: object = None  # the feed's token the entries were stored under
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # The sync face looks values up from its callers' threads, while the loop thread stores
        # and drops them: every touch of the entries holds this lock (never across an await).
        self._lock = threading.Lock()
        self._ticked = 0.0  # time.monotonic() of the loop's last mark
        self._ticker: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._entries)

    async def start(self) -> None:
        """Subscribe to the changes (what is written after this returns is delivered), then
        follow them in a task of the running loop."""
        self._feed = await self._open_feed()
        await self._feed.start()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._follow(self._feed))
        self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._ticked > _STALLED:
            self.clear()  # it was blocked: changes may be waiting unread, behind this callback
        self._ticked = now
        if not self._closed:
            self._ticker = asyncio.get_running_loop().call_later(_TICK, self._tick)

    async def close(self) -> None:
        self._closed = True
        if self._scope is not None:
            with _SCOPES_LOCK:
                _SCOPES.get(self._scope, weakref.WeakSet()).discard(self)
        self.clear()
        if self._ticker is not None:
            self._ticker.cancel()
        task, self._task = self._task, None
        feed, self._feed = self._feed, None
        if feed is not None:
            await feed.aclose()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _follow(self, feed: ChangeFeed) -> None:
        # Python 3.11's wait_for (inside nats-py's next_msg) can swallow a cancel when a message
        # arrives with it: the task then went on following for good, and asyncio.run's exit (which
        # cancels every task once) never returned. So the task checks that it is being cancelled.
        task = asyncio.current_task()
        assert task is not None
        while not self._closed:
            try:
                while not task.cancelling():
                    self._apply(await feed.__anext__())
                raise asyncio.CancelledError
            except StopAsyncIteration:
                return  # closed
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the server stayed away: serve nothing, then try again
                self._feed = None
                self.clear()
                if task.cancelling():
                    raise asyncio.CancelledError from None  # a cancel turned into an error: stop
                with contextlib.suppress(Exception):
                    await feed.aclose()
                await asyncio.sleep(_RETRY_FEED)
                if self._closed:
                    return
                try:
                    feed = await self._open_feed()
                    await feed.start()
                except Exception:  # noqa: BLE001 - still away: try again later
                    continue
                self._feed = feed

    def _current_token(self) -> object:
        feed = self._feed
        return None if feed is None else feed.coherent()

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._entries.clear()
        self.size = 0

    # -- the hot path -----------------------------------------------------------------------------
    def lookup(self, key: str) -> bytes | None | Miss:
        """The cached encoded value of ``key`` (None: known missing), or ``MISS``. Safe from any
        thread."""
        token = self._current_token()
        if time.monotonic() - self._ticked > _STALLED:
            return MISS  # the loop is blocked: changes may be waiting unread
        with self._lock:
            if token is None or token != self._token:
                if self._entries:
                    self._clear()
                self._token = token
                return MISS
            entry = self._entries.get(key)
            if entry is None:
                return MISS
            self._entries.move_to_end(key)
            return entry[1]

    def begin(self, key: str) -> Ticket:
        """Before reading or writing ``key`` on the server: note it, so that a change of it
        arriving meanwhile keeps the result out of the cache."""
        token = self._current_token()
        with self._lock:
            slot = self._inflight.get(key)
            if slot is None:
                slot = self._inflight[key] = [0, 0]
            slot[0] += 1
            return (token, slot[1])

    def finish(self, key: str, ticket: Ticket, revision: int | None, data: bytes | None) -> None:
        """After the read or write of ``key``: keep ``(revision, data)`` when nothing changed the
        key meanwhile and the feed stayed coherent; else drop the key. ``revision`` None: the
        outcome is unknown (a failed write), so only drop."""
        current = self._current_token()
        with self._lock:
            slot = self._inflight[key]
            slot[0] -= 1
            changed = slot[1] != ticket[1]
            if slot[0] == 0:
                del self._inflight[key]
            token = ticket[0]
            if revision is None or changed or token is None or token != current:
                self._drop(key)
                return
            if token != self._token:  # the first entry since the feed came back
                self._clear()
                self._token = token
            self._store(key, revision, data)

    # -- coherence --------------------------------------------------------------------------------
    def changed(self, key: str) -> None:
        """``key`` is being written by another object of this process (``notify``): drop it, and
        keep a read of it in flight out of the cache. Safe from any thread."""
        with self._lock:
            slot = self._inflight.get(key)
            if slot is not None:
                slot[1] += 1
            self._drop(key)

    def _apply(self, change: KeyChange) -> None:
        """A change from the feed: newer than the entry, it replaces it (a value the feed did not
        carry, a delete or an expiry drops it)."""
        key = change.key
        with self._lock:
            slot = self._inflight.get(key)
            if slot is not None:
                slot[1] += 1
            entry = self._entries.get(key)
            if entry is None or entry[0] >= change.revision:
                return
            if change.op == "set" and change.data is not None:
                self._store(key, change.revision, change.data)
            else:
                self._drop(key)

    def _store(self, key: str, revision: int, data: bytes | None) -> None:
        old = self._entries.get(key)
        if old is not None:
            if old[0] > revision:
                return  # a newer one is kept already
            self._drop(key)
        if data is not None and len(data) > self._largest:
            return
        self._entries[key] = (revision, data)
        self.size += _cost(key, data)
        while len(self._entries) > self.max_entries or self.size > self.max_bytes:
            dropped, (_, value) = self._entries.popitem(last=False)
            self.size -= _cost(dropped, value)

    def _drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= _cost(key, old[1])


def _cost(key: str, data: bytes | None) -> int:
    """The bytes an entry holds: its value, its key, and the rest (measured with tracemalloc over
    100,000 entries: 180 B for the dict slot, the tuple and the revision; 49 B of str header)."""
    return 229 + len(key) + (0 if data is None else len(data))
