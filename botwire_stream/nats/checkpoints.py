"""LangGraph checkpoints over NATS: one JetStream stream per namespace, one subject per record.

Layout (stream ``BOTWIRE_LG_<namespace>``, subjects ``botwire.<namespace>.lg.>``, at most one
message per subject)::

    <prefix>.<thread>.<ns>.c.<checkpoint id>                  a checkpoint (with its metadata)
    <prefix>.<thread>.<ns>.w.<checkpoint id>.<task id>.<idx>  one pending write of a task

Every name is one subject token (``keys`` segment encoding: plain ``[A-Za-z0-9_-]`` as it is,
anything else, the empty checkpoint namespace included, as ``=`` + base64url), so a thread, a
namespace or a checkpoint is a subject filter and the server's per-subject index does the lookups:

- the latest checkpoint of a thread and namespace is the highest id on ``<thread>.<ns>.c.*``
  (LangGraph's ids grow with time; ``list`` and ``prune`` order by id too, whatever order two
  processes stored them in): the ids from the subject index, then the record and its writes by
  subject (all sent together when the process knows the latest id already), or, when a
  subscription proves nothing changed since this process read it, from its cache after one
  ping (``_Watch``: each write returns only once the server has handed it to every watch);
  a given checkpoint and its writes are two requests sent together;
- a thread's checkpoints and writes are batch direct gets on its filters (paged);
- deleting a thread, a checkpoint or its writes is a purge by subject filter.

A checkpoint put again under the same id replaces the stored one (one message per subject).
Regular pending writes (``idx >= 0``) are stored only if none is stored under the same task and
index (``Nats-Expected-Last-Subject-Sequence: 0``), as LangGraph's own savers keep the first;
special ones (negative ``idx``: errors, interrupts, resumes) replace it. A task's writes are separate
messages, not one atomic batch (``put_writes`` says why).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Final

from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from ..errors import Conflict, ServerUnavailable, ValueTooLarge
from ..keys import _decode_token, _encode_segment
from ..settings import ConnectOptions
from .jetstream import Connection
from .pool import acquire, release
from .retry import SAFE

__all__ = ["NatsCheckpoints", "open_checkpoints"]

_PAGE: Final = 1000
_IN_FLIGHT: Final = 64  # publishes or purges awaited at once
_MULTI_LAST: Final = 256  # subjects per multi-last get (their names fill the request: up to ~2 KB each)
_LATEST_KEPT: Final = 4096  # threads whose latest checkpoint id a process remembers (the oldest dropped)
_CACHED: Final = 1024  # threads whose latest checkpoint (record and writes) a backend keeps
_PENDING_KEPT: Final = 4096  # threads whose changes seen but not yet read back a watch remembers

# (stream, thread/ns subject base) -> the id of the checkpoint this process last stored or read as
# the latest there. It only lets ``latest`` ask for that checkpoint's writes together with the
# latest record; the record read decides, and a different one costs a second request.
_latest_ids: dict[tuple[str, str], str] = {}


def _remember(stream: str, base: str, checkpoint_id: str) -> None:
    key = (stream, base)
    _latest_ids.pop(key, None)
    if len(_latest_ids) >= _LATEST_KEPT:
        _latest_ids.pop(next(iter(_latest_ids)), None)  # the oldest
    _latest_ids[key] = checkpoint_id


def _token(name: str) -> str:
    return _encode_segment(name)


def _name(token: str) -> str:
    return _decode_token(token)


async def open_checkpoints(
    opts: ConnectOptions, namespace: str, *, replicas: int | None, timeout: float
) -> NatsCheckpoints:
    """The shared connection for ``opts`` with the namespace's checkpoint stream made sure to exist."""
    store = NatsCheckpoints(namespace, timeout)
    conn = await acquire(opts)
    try:
        await conn.ensure_stream(store.config(replicas), timeout)
    except BaseException:
        await release(conn)
        raise
    store.conn = conn
    return store


async def _bounded(aws: Sequence[Coroutine[Any, Any, None]]) -> None:
    i = 0
    try:
        for i in range(0, len(aws), _IN_FLIGHT):
            await asyncio.gather(*aws[i : i + _IN_FLIGHT])
    finally:
        for aw in aws[i + _IN_FLIGHT :]:  # never started after a round failed: no "never awaited" warning
            aw.close()


class _Pong:
    """What ``_ping`` queues in nats-py's list of PINGs awaiting their PONG: the reader calls its
    ``set_result`` when the PONG comes (nats-py 2.16 ``_process_pong``; a reconnect drops the list),
    which wakes the ping at once, and does nothing once the ping gave up (timed out, cancelled)."""

    __slots__ = ("waiter",)

    def __init__(self, waiter: asyncio.Future[bool]) -> None:
        self.waiter = waiter

    def set_result(self, result: bool) -> None:
        if not self.waiter.done():
            self.waiter.set_result(True)


def _give_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


_PING: Final = b"PING\r\n"


async def _ping(nc: Any, timeout: float) -> bool:
    """One PING/PONG round trip on ``nc``: True once the server answered (so it has handled
    every command this connection sent before, and everything it queued for this connection
    before is read). Not ``nc.flush(timeout)``: on a timeout it
    cancels its future but leaves it queued, and the late PONG then fails in nats-py's reader
    (``InvalidStateError``: measured with a SIGSTOPped server), which breaks the connection.

    The PING is written here rather than by ``nc._send_ping``, which also wakes nats-py's flusher
    task for nothing, and the PONG wakes this coroutine directly (``_Pong``), not through
    ``wait_for(shield(...))``'s chain of futures: each of those cost a turn of the event loop, and
    a ping is on the path of every cached ``latest`` (sync ``get_tuple``, cProfile: 7.4 turns of
    the loop a call before, 5 after; 29 % fewer Python function calls)."""
    if not nc.is_connected:
        return False
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()
    try:
        # nats-py 2.16 writes a PING straight to the socket, ahead of the commands its flusher task
        # has not written yet: a PUB or SUB just made could reach the server after this PING (seen
        # in 4 of 200 publish-then-flush round trips). Write them first, as the flusher would.
        if nc._pending_data_size > 0:
            nc._transport.writelines(nc._pending[:])
            nc._pending = []
            nc._pending_data_size = 0
        nc._transport.write(_PING)
        nc._pongs.append(_Pong(waiter))  # (after the write: a PING never sent must not take a PONG)
    except Exception:
        return False
    timer = loop.call_later(timeout, _give_up, waiter)
    try:
        return await waiter
    finally:
        timer.cancel()


class _Miss:
    __slots__ = ()


_MISS: Final = _Miss()
_Latest = tuple[str, bytes, list[tuple[str, int, bytes]]] | None


class _Pending:
    """A thread's changes seen by the watch that no read has shown yet: the highest checkpoint
    id (with a hash of its record) and the pending writes ``(checkpoint id, task id, idx)``
    (a special one's record hashed: it replaces the stored one)."""

    __slots__ = ("checkpoint", "record", "writes")

    def __init__(self) -> None:
        self.checkpoint: str | None = None
        self.record = 0
        self.writes: dict[tuple[str, str, int], int] = {}

    def add(self, kind: str, rest: list[str], data: bytes) -> None:
        cid = _name(rest[0])
        if kind == "c":
            if self.checkpoint is None or cid >= self.checkpoint:
                self.checkpoint, self.record = cid, hash(data)
        elif kind == "w" and len(rest) == 3:
            self.writes[(cid, _name(rest[1]), int(rest[2]))] = hash(data)

    def confirm(self, found: _Latest) -> bool:
        """Drop what ``found`` (a read of the thread) shows; True when nothing is left."""
        if found is None:
            return self.checkpoint is None and not self.writes
        latest, record, writes = found
        if self.checkpoint is not None and (
            latest > self.checkpoint or (latest == self.checkpoint and hash(record) == self.record)
        ):
            self.checkpoint = None
        if self.writes:
            read = {(latest, task, idx): hash(data) for task, idx, data in writes}
            for key, h in list(self.writes.items()):
                cid, _, idx = key
                if cid < latest or (key in read and (idx >= 0 or read[key] == h)):
                    del self.writes[key]
        return self.checkpoint is None and not self.writes


class _Watch:
    """Each thread's latest checkpoint as last read by this backend, served only while a core
    subscription on the namespace's records proves that nothing of the thread changed since.

    Why it is exact across processes (single server): nats-server fans a published record out
    from the writer's connection (its read loop, one command after another), but stores and
    acknowledges it from the stream's own goroutine, which may run first: the ack can reach the
    writer while this subscription's copy is still held back (seen under CI load as an older
    checkpoint served right after another process's put returned; a stalled subscriber makes it
    happen every few puts, tests/test_langgraph_latest.py). So a write returns only after a ping
    on its own connection (``NatsCheckpoints._handed_off``): the server reads that PING after the
    record, so the fan-out is done and the record sits in this connection's outbound queue ahead
    of anything queued for it later. This process's ping then returns after the record was read
    (nats-py resolves a PONG in its reader, after queueing the messages read before it for the
    callback; a change still queued is a miss), and the callback has dropped the entry. Purges publish nothing on the records' subjects: the purge
    requests are watched (``$JS.API.STREAM.PURGE/DELETE``), and BotWireSaver's own deletes also
    send a notice once done (``deleted``), so a read racing the purge is not kept either.
    An entry is served only under the connection generation it was read in, while connected
    (a reconnect may have lost changes: everything is dropped); a ping that fails is an error,
    never a stale answer. Not used on a cluster: a record reaches subscribers on other servers
    over routes, which a ping to this server does not wait for.

    The fan-out may as well hand a record to this subscription before the stream has stored it
    (a stalled subscriber between the two holds the store back, tests/test_langgraph_latest.py),
    so a read begun after the change was seen may still answer the older state. Each change seen
    therefore stays pending (``unconfirmed``) until a read's content shows it: a checkpoint by
    an id read above its own, or its own id with the same record; a pending write by its task
    and index among the writes read (a special one, ``idx < 0``, with the same record), or by a
    higher checkpoint id read (its checkpoint is no longer the latest). A read that leaves a
    change pending is answered (the write has not returned yet: it is not stored) but not kept.
    The pending changes belong to the backend, so a reconnect's new watch keeps them too (a
    record the new subscription missed, fanned out before it existed, is not covered). They are
    kept for at most ``_PENDING_KEPT`` threads, the least recently changed one forgotten first
    (it changed that many other threads ago, long past a store's microseconds); a record never
    stored (its put failed) only costs its thread the cache until a newer checkpoint is read."""

    def __init__(
        self, conn: Connection, sub: Any, gen: tuple[int, int], unconfirmed: OrderedDict[str, _Pending]
    ) -> None:
        self.conn = conn
        self.sub = sub
        self.gen = gen
        self.nc = conn.nc
        self.entries: OrderedDict[str, _Latest] = OrderedDict()
        self.inflight: dict[str, list[int]] = {}  # base -> [reads in flight, changes seen meanwhile]
        self.epoch = 0  # bumped by a purge or delete: no read in flight across one is kept
        # base -> changes no read showed yet; the backend's, so kept across watches (a change
        # seen before a reconnect may still be on its way to the stream)
        self.unconfirmed = unconfirmed

    def valid(self) -> bool:
        return self.conn.nc is self.nc and self.nc.is_connected and self.conn.generation() == self.gen

    def changed(self, base: str, kind: str = "", rest: list[str] | None = None, data: bytes = b"") -> None:
        self.entries.pop(base, None)
        if rest:
            pending = self.unconfirmed.pop(base, None) or _Pending()
            pending.add(kind, rest, data)
            self.unconfirmed[base] = pending  # the most recently changed last
            if len(self.unconfirmed) > _PENDING_KEPT:
                self.unconfirmed.popitem(last=False)
        seen = self.inflight.get(base)
        if seen is not None:
            seen[1] += 1

    def reset(self) -> None:
        self.entries.clear()
        self.epoch += 1

    async def lookup(self, base: str, timeout: float) -> _Latest | _Miss:
        if base not in self.entries or not self.valid():
            return _MISS
        if not await _ping(self.nc, timeout):
            return _MISS  # not proven: the read that follows answers or raises the library's error
        # The reader has queued every change sent before the PONG; each subscription's callback
        # runs in its own task, so one still queued means an unapplied change.
        if not self.valid() or any(sub.pending_msgs for sub in self.sub):
            return _MISS
        return self.entries.get(base, _MISS)

    def begin(self, base: str) -> tuple[int, int]:
        seen = self.inflight.setdefault(base, [0, 0])
        seen[0] += 1
        return self.epoch, seen[1]

    def store(self, base: str, ticket: tuple[int, int], found: _Latest) -> None:
        seen = self.inflight.get(base)
        if seen is None or (self.epoch, seen[1]) != ticket or not self.valid():
            return  # changed while it was read: the read may be older than the change
        pending = self.unconfirmed.get(base)
        if pending is not None:
            if not pending.confirm(found):
                return  # a change seen is not in what was read: not stored yet when read
            del self.unconfirmed[base]
        self.entries[base] = found
        self.entries.move_to_end(base)
        while len(self.entries) > _CACHED:
            self.entries.popitem(last=False)

    def end(self, base: str) -> None:
        seen = self.inflight.get(base)
        if seen is not None:
            seen[0] -= 1
            if seen[0] <= 0:
                del self.inflight[base]


class NatsCheckpoints:
    """One namespace's checkpoints and pending writes (an ``integrations.langgraph.CheckpointBackend``).

    Records cross as encoded bytes; what they hold is the caller's business.
    """

    conn: Connection

    def __init__(self, namespace: str, timeout: float) -> None:
        self.namespace = namespace
        self.timeout = timeout
        self.stream = f"BOTWIRE_LG_{namespace}"
        self.prefix = f"botwire.{namespace}.lg"
        self.deleted = f"botwire.{namespace}.lgdeleted"  # notices of deletes (outside the stream)
        self._watch: _Watch | None = None
        self._watch_lock = asyncio.Lock()
        self._unconfirmed: OrderedDict[str, _Pending] = OrderedDict()  # ``_Watch.unconfirmed``

    def config(self, replicas: int | None) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.>"],
            allow_direct=True,
            max_msgs_per_subject=1,  # a record put again replaces the stored one
            duplicate_window=120,
            max_msgs=-1,
            max_consumers=-1,
            num_replicas=replicas,
            metadata={"botwire.namespace": self.namespace},
        )

    async def close(self) -> None:
        await self._unwatch()
        await release(self.conn)

    # -- the watch behind latest() ---------------------------------------------------------------
    async def _watching(self) -> _Watch | None:
        """The watch, (re)subscribed when the connection was replaced or reconnected; None on a
        cluster."""
        if self.conn.cluster_size() > 1:
            return None
        watch = self._watch
        if watch is not None and watch.valid():
            return watch
        async with self._watch_lock:
            if self._watch is not None and self._watch.valid():
                return self._watch
            await self._unwatch()
            conn = self.conn
            # Made before subscribing, so a change that arrives during the subscribing ping is kept.
            w = _Watch(conn, [], conn.generation(), self._unconfirmed)
            cut = len(self.prefix) + 1
            purges = (
                f"$JS.API.STREAM.PURGE.{self.stream}",
                f"$JS.API.STREAM.DELETE.{self.stream}",
                f"$JS.API.STREAM.MSG.DELETE.{self.stream}",
                self.deleted,
            )

            async def on_msg(msg: Msg) -> None:
                if msg.subject in purges:
                    w.reset()
                    return
                try:
                    t, n, kind, *rest = msg.subject[cut:].split(".")
                    w.changed(f"{self.prefix}.{t}.{n}", kind, rest, msg.data)
                except ValueError:  # not a record's subject (a foreign publish): keep nothing
                    w.reset()

            # No pending limits: nats-py drops what is over them (a "slow consumer"), and a dropped
            # change would leave a stale entry. The callback is a dict update on the reader's own
            # loop, so the queue cannot outgrow what the reader just read.
            subs = [
                await conn.nc.subscribe(subject, cb=on_msg, pending_msgs_limit=0, pending_bytes_limit=0)
                for subject in (f"{self.prefix}.>", *purges)
            ]
            if not await _ping(conn.nc, self.timeout):  # subscribed before anything is read
                for sub in subs:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                return None
            w.sub = subs
            self._watch = w
            return w

    async def _unwatch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            for sub in watch.sub:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _handed_off(self, what: str) -> None:
        """Return once every watch on this server has been handed what this connection just
        wrote: nats-server acknowledges a stored record from the stream's own goroutine while
        the writer's connection may still be fanning it out (``_Watch`` says why this matters);
        it answers this connection's PING only after that fan-out. Unproven (the server did not
        answer in time): ``ServerUnavailable``, the write itself being done and safe to repeat.
        Skipped on a cluster, where no process watches (``_watching``)."""
        if self.conn.cluster_size() <= 1 and not await _ping(self.conn.nc, self.timeout):
            raise ServerUnavailable(
                f"the {what} is done, but the server did not confirm within {self.timeout} s that other "
                "processes watching this namespace were told; repeating the call is safe"
            )

    async def _publish(self, subject: str, data: bytes, headers: Mapping[str, str] | None, what: str) -> None:
        """``conn.publish``, returning once the record is also handed to every watch on this
        server (as ``_handed_off``), at no extra round trip: a ping follows each try right
        behind its PUB, and its PONG comes back about with the ack (the PONG needs no store)."""
        pings: list[asyncio.Task[bool]] = []
        watched = self.conn.cluster_size() <= 1

        def sent() -> None:
            if watched:
                pings.append(asyncio.ensure_future(_ping(self.conn.nc, self.timeout)))

        try:
            await self.conn.publish(subject, data, headers, self.timeout, what=what, advice=SAFE, on_sent=sent)
        except BaseException:
            for ping in pings:
                ping.cancel()
            raise
        for ping in pings[:-1]:  # earlier tries, on a connection since lost
            ping.cancel()
        if pings and not await pings[-1]:
            await self._handed_off(what)  # the ping was lost with a connection: one more

    async def _notify_deleted(self) -> None:
        """Tell every watch of the namespace that records were removed (purges publish nothing
        on their subjects), before returning (``_handed_off``)."""
        with contextlib.suppress(Exception):
            await self.conn.nc.publish(self.deleted, b"")
        await self._handed_off("delete")

    async def _deleting(self, aw: Coroutine[Any, Any, None]) -> None:
        """Run a delete, then notify the watches; a delete that failed raises its own error."""
        try:
            await aw
        except BaseException:
            with contextlib.suppress(Exception):  # some of it may be done: tell the watches anyway
                await self._notify_deleted()
            raise
        await self._notify_deleted()

    # -- subjects -------------------------------------------------------------------------------
    def _base(self, thread: str | None, ns: str | None) -> str:
        t = "*" if thread is None else _token(thread)
        n = "*" if ns is None else _token(ns)
        return f"{self.prefix}.{t}.{n}"

    def _parse(self, subject: str) -> tuple[str, str, str, list[str]]:
        """(thread, ns, kind, rest of the tokens) of a stored subject."""
        tokens = subject[len(self.prefix) + 1 :].split(".")
        return _name(tokens[0]), _name(tokens[1]), tokens[2], tokens[3:]

    # -- writes ---------------------------------------------------------------------------------
    async def put_checkpoint(self, thread: str, ns: str, checkpoint_id: str, data: bytes) -> None:
        """Store (or replace) one checkpoint record (``ValueTooLarge`` past one message's body)."""
        if len(data) > self.conn.max_body:
            # nats-py checks the body alone against max_payload; the server counts the headers too
            # and closes the connection on a PUB over it (measured: a 65,300-byte record under a
            # 64 KiB max_payload cost OutcomeUnknown, then "connection closed" on every later call).
            raise ValueTooLarge(
                f"a checkpoint record of {len(data):,} bytes is over one message's body; nothing was written"
            )
        base = self._base(thread, ns)
        subject = f"{base}.c.{_token(checkpoint_id)}"
        await self._publish(subject, data, None, "checkpoint put")
        _remember(self.stream, base, checkpoint_id)

    async def put_writes(
        self, thread: str, ns: str, checkpoint_id: str, task_id: str, writes: Sequence[tuple[int, bytes]]
    ) -> None:
        """Store a task's writes, ``(idx, record)`` each: a regular one (``idx >= 0``) only when
        none is stored under the same task and index, a special one (``idx < 0``) replacing it.

        Not atomic: a server dying mid-save can leave part of a task stored (each record names the
        indexes its call wrote, so BotWireSaver shows none of such a call until a retry completes
        it; the retry stores each write once: first wins). JetStream's atomic
        batch (``Nats-Batch-*``, ``allow_atomic``) would fit first-write-wins (each regular write
        conditional on an empty subject; a batch with one already stored is refused whole, then
        sent one by one), and held a SIGKILLed server to whole-or-nothing tasks, but it cost
        too much here (nats-server 2.15.1, R1 file stream, measured): a 2-write task 3.4 ms p50
        in one process instead of ~0.3 ms, and four writer processes 40 steps/s (p50 59 ms)
        instead of 1,172 (the benchmark's target, faster than SQLite, was lost)."""
        base = f"{self._base(thread, ns)}.w.{_token(checkpoint_id)}.{_token(task_id)}"
        # Checked whole first: the writes are separate messages, and a task with some of its
        # writes stored is taken as done when the graph resumes (the missing ones lost).
        largest = max((len(data) for _, data in writes), default=0)
        if largest > self.conn.max_body:
            raise ValueTooLarge(
                f"a pending write is {largest:,} bytes encoded, more than one message of the server may hold "
                "(its max_payload, less room for headers); nothing was written"
            )

        async def one(idx: int, data: bytes) -> None:
            headers = {"Nats-Expected-Last-Subject-Sequence": "0"} if idx >= 0 else None
            try:
                await self._publish(f"{base}.{idx}", data, headers, "pending write")
            except Conflict:
                pass  # already stored by an earlier run of the task: the first write is kept (no change)

        await _bounded([one(idx, data) for idx, data in writes])

    # -- reads ----------------------------------------------------------------------------------
    async def latest(self, thread: str, ns: str) -> tuple[str, bytes, list[tuple[str, int, bytes]]] | None:
        """The thread's latest checkpoint in the namespace, the one with the highest id (as
        ``list`` and ``prune`` order them; not the one stored last: two processes resuming one
        thread may store an older id last): ``(checkpoint id, record, its writes)``.

        Served from this backend's cache when the watch proves nothing of the thread changed
        since it was read (``_Watch``: one ping); else read: the ids from the subject index,
        then the record and its writes by subject (writes stored before their checkpoint are
        found). When this process knows the latest id (``_latest_ids``) all three requests go
        together: one round trip."""
        base = self._base(thread, ns)
        watch = await self._watching()
        if watch is not None:
            hit = await watch.lookup(base, self.timeout)
            if hit is not _MISS:
                return hit  # type: ignore[return-value]
            ticket = watch.begin(base)
        try:
            found = await self._read_latest(thread, ns, base)
            if watch is not None:
                watch.store(base, ticket, found)
            return found
        finally:
            if watch is not None:
                watch.end(base)

    async def _read_latest(
        self, thread: str, ns: str, base: str
    ) -> tuple[str, bytes, list[tuple[str, int, bytes]]] | None:
        known = _latest_ids.get((self.stream, base))
        for _ in range(8):  # the highest id removed between the index and the read: read again
            counts_aw = self.conn.subject_counts(self.stream, f"{base}.c.*", self.timeout)
            if known is None:
                counts, data, writes = await counts_aw, None, None
            else:  # all at once: right when the latest is still the one this process knows
                counts, data, writes = await asyncio.gather(
                    counts_aw, self.checkpoint(thread, ns, known), self.writes(thread, ns, known)
                )
            if not counts:
                _latest_ids.pop((self.stream, base), None)
                return None
            checkpoint_id = max(_name(subject.rsplit(".", 1)[1]) for subject in counts)
            if checkpoint_id != known or data is None or writes is None:
                data, writes = await asyncio.gather(
                    self.checkpoint(thread, ns, checkpoint_id), self.writes(thread, ns, checkpoint_id)
                )
            if data is not None and writes is not None:
                _remember(self.stream, base, checkpoint_id)
                return checkpoint_id, data, writes
            known = None
        raise Conflict(f"the latest checkpoint of thread {thread!r} kept being removed while it was read")

    async def checkpoint(self, thread: str, ns: str, checkpoint_id: str) -> bytes | None:
        msg = await self.conn.direct_get_last(
            self.stream, f"{self._base(thread, ns)}.c.{_token(checkpoint_id)}", self.timeout
        )
        return None if msg is None else msg.data

    async def writes(self, thread: str, ns: str, checkpoint_id: str) -> list[tuple[str, int, bytes]]:
        """The checkpoint's pending writes, ``(task id, idx, record)``, in the order stored."""
        subject = f"{self._base(thread, ns)}.w.{_token(checkpoint_id)}.>"
        out = []
        for msg in await self._read(subject):
            _, _, _, rest = self._parse(self._subject(msg))
            out.append((_name(rest[1]), int(rest[2]), msg.data))
        return out

    async def checkpoints(self, thread: str | None, ns: str | None) -> list[tuple[str, str, str, bytes]]:
        """Every checkpoint ``(thread, ns, checkpoint id, record)`` of the thread and namespace
        (None: all), in the order stored."""
        out = []
        for msg in await self._read(f"{self._base(thread, ns)}.c.*"):
            t, n, _, rest = self._parse(self._subject(msg))
            out.append((t, n, _name(rest[0]), msg.data))
        return out

    async def checkpoint_ids(self, thread: str | None, ns: str | None) -> list[tuple[str, str, str]]:
        """``(thread, ns, checkpoint id)`` of every checkpoint of the thread and namespace (None:
        all), from the server's subject index: no record is read (one request per 100,000)."""
        counts = await self.conn.subject_counts(self.stream, f"{self._base(thread, ns)}.c.*", self.timeout)
        out = []
        for subject in counts:
            t, n, _, rest = self._parse(subject)
            out.append((t, n, _name(rest[0])))
        return out

    async def records(self, items: Sequence[tuple[str, str, str]]) -> list[bytes | None]:
        """The records of the checkpoints ``(thread, ns, checkpoint id)``, in that order (None:
        removed meanwhile): one multi-last get per ``_MULTI_LAST`` of them, paged on when a reply
        stops at the server's byte cap."""
        subjects = [f"{self._base(t, n)}.c.{_token(cid)}" for t, n, cid in items]
        found: dict[str, bytes] = {}
        for i in range(0, len(subjects), _MULTI_LAST):
            chunk = subjects[i : i + _MULTI_LAST]
            request: dict[str, Any] = {"multi_last": chunk}
            while True:
                batch = await self.conn.direct_batch(self.stream, request, self.timeout)
                for msg in batch.msgs:
                    found[self._subject(msg)] = msg.data
                if not batch.msgs or not batch.pending:
                    break
                request = {"multi_last": chunk, "seq": batch.last_seq + 1, "up_to_seq": batch.up_to_seq or None}
        return [found.get(subject) for subject in subjects]

    async def all_writes(self, thread: str | None, ns: str | None) -> list[tuple[str, str, str, str, int, bytes]]:
        """Every pending write ``(thread, ns, checkpoint id, task id, idx, record)`` (None: all)."""
        out = []
        for msg in await self._read(f"{self._base(thread, ns)}.w.>"):
            t, n, _, rest = self._parse(self._subject(msg))
            out.append((t, n, _name(rest[0]), _name(rest[1]), int(rest[2]), msg.data))
        return out

    async def _read(self, subject_filter: str) -> list[Msg]:
        return await self.conn.read_subject(self.stream, subject_filter, page=_PAGE, timeout=self.timeout)

    @staticmethod
    def _subject(msg: Msg) -> str:
        # A direct get answers on the reply inbox and names the stored subject in a header.
        headers = msg.headers or {}
        return headers.get("Nats-Subject", msg.subject)

    # -- deletes --------------------------------------------------------------------------------
    async def delete_thread(self, thread: str) -> None:
        """Remove every checkpoint and write of the thread (every namespace): one purge."""
        await self._deleting(self.conn.purge(self.stream, f"{self.prefix}.{_token(thread)}.>", timeout=self.timeout))

    async def delete_checkpoints(self, items: Sequence[tuple[str, str, str]]) -> None:
        """Remove the checkpoints ``(thread, ns, checkpoint id)`` and their writes."""
        aws = []
        for thread, ns, checkpoint_id in items:
            base, cid = self._base(thread, ns), _token(checkpoint_id)
            aws.append(self.conn.purge(self.stream, f"{base}.c.{cid}", timeout=self.timeout))
            aws.append(self.conn.purge(self.stream, f"{base}.w.{cid}.>", timeout=self.timeout))
        await self._deleting(_bounded(aws))

    async def copy_thread(self, source: str, target: str) -> None:
        """Store every record of ``source`` under ``target``, in the order stored (so the latest
        checkpoint of each namespace stays the latest)."""
        msgs = await self._read(f"{self.prefix}.{_token(source)}.>")
        if not msgs:
            return
        head = f"{self.prefix}.{_token(target)}."
        cut = len(self.prefix) + 1
        items: list[tuple[str, bytes, Mapping[str, str]]] = []
        for msg in msgs:
            rest = self._subject(msg)[cut:].split(".", 1)[1]
            items.append((head + rest, msg.data, {}))
        for i in range(0, len(items), _PAGE):
            await self.conn.publish_pipelined(items[i : i + _PAGE], self.timeout, what="thread copy", advice=SAFE)
        await self._handed_off("thread copy")
