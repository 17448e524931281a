"""One running instance per consumer: a lock entry per durable consumer, kept alive by a heartbeat.

Two processes on one durable consumer would split its events between them: two audits (into two
directories) would each write half of the events, two compactors could summarise one range twice,
two materialisers could race on one conversation's chunks, two webhooks could deliver a
conversation's events out of order. So every worker is exclusive: ``run`` holds, for each stream
it consumes, the KV entry ``<stream>.<consumer>`` in the bucket ``botwire-locks`` (no namespace's
bucket can be named so: theirs are ``botwire_<ns>``), and a second instance is refused with
``Conflict`` naming the holder (``botwire consume`` exits 2 with that message).

The entry holds the holder's ``host/pid`` and is rewritten every ``HEARTBEAT`` s (conditionally,
on its revision). A holder that is gone is detected without waiting when it ran on this host (its
pid no longer exists: a SIGKILLed worker restarted at once takes over); one of another host is
taken over once its entry has not changed for ``STALE`` s. A holder that finds its entry taken
over (it was stalled beyond ``STALE``) stops, as on SIGTERM.

Fencing: a holder stalled past ``STALE`` (SIGSTOP, a long pause) and taken over must not write
what it finds on waking (measured before: an audit resumed after a takeover fetched, wrote and
acknowledged 20 new events before its next heartbeat noticed; the new holder never saw them). So
the runtime asks ``Lease.check()`` before each fetch, batch and idle round: no round trip while the
last confirmed rewrite was sent less than ``STALE / 2`` ago (a taker waits ``STALE`` from then at
the earliest), else one conditional rewrite that either renews the lease or finds it taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from typing import Final

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from botwire_stream.errors import Conflict
from botwire_stream.nats.jetstream import Connection

__all__ = ["BUCKET", "HEARTBEAT", "STALE", "Holder", "Lease", "hold"]

BUCKET: Final = "botwire-locks"
HEARTBEAT: Final = 1.0  # seconds between rewrites of a held entry
STALE: Final = 5.0  # an entry unchanged this long (s) belongs to a holder that is gone


class Holder(msgspec.Struct, frozen=True):
    """Who holds a consumer: ``host``, ``pid``, and the consumer's name."""

    host: str
    pid: int
    consumer: str

    def __str__(self) -> str:
        return f"{self.host}/{self.pid}"


def _gone(holder: Holder) -> bool:
    """Whether ``holder`` is a process of this host that no longer exists."""
    if holder.host != socket.gethostname():
        return False
    if holder.pid == os.getpid():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


async def _bucket(conn: Connection) -> KeyValue:
    try:
        return await conn.js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return await conn.js.create_key_value(bucket=BUCKET, history=1)


async def _take(kv: KeyValue, key: str, me: bytes, consumer: str) -> int:
    """Create or take over ``key``; its revision, or ``Conflict`` naming a live holder."""
    while True:
        try:
            return await kv.create(key, me)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue  # released meanwhile
        try:
            holder = msgspec.json.decode(entry.value or b"", type=Holder)
        except msgspec.ValidationError:
            holder = Holder("?", 0, consumer)
        revision = entry.revision or 0
        if not _gone(holder):
            # Alive on this host, or elsewhere: wait for one heartbeat-less STALE period.
            if holder.host == socket.gethostname():
                raise Conflict(f"consumer {consumer} is already running as {holder} (stop it first: one per name)")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + STALE
            while loop.time() < deadline:
                await asyncio.sleep(HEARTBEAT / 2)
                try:
                    now = await kv.get(key)
                except nats.js.errors.KeyNotFoundError:
                    break
                if now.revision != revision:
                    raise Conflict(f"consumer {consumer} is already running as {holder} (stop it first: one per name)")
        try:
            return await kv.update(key, me, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # someone else moved first: look again


class Lease:
    """The entries held by this process, and whether it may still write (see the module's Fencing)."""

    def __init__(self, conn: Connection, kv: KeyValue, me: bytes, lost: asyncio.Event) -> None:
        self.conn, self.kv, self.me, self.lost = conn, kv, me, lost
        self.nc = conn.nc  # the client ``kv`` was made on
        self.taken = False  # an entry was found taken over: this process must write nothing more
        self.held: dict[str, int] = {}
        self.confirmed = time.monotonic()  # when the last successful rewrite (or take) was sent
        self._renewing = asyncio.Lock()  # one rewrite at a time: two on one revision would clash

    async def renew(self) -> bool:
        """Rewrite every entry on its revision: False (and ``lost`` set) when one was taken over.
        A connection error is raised (the holder cannot tell; the caller tries again)."""
        async with self._renewing:
            if self.taken:
                return False
            sent = time.monotonic()
            if self.conn.nc is not self.nc:  # replaced (conn.recover): the old client is closed
                self.kv, self.nc = await _bucket(self.conn), self.conn.nc
            for key in list(self.held):
                if not await self._rewrite(key):
                    self.taken = True  # taken over: another instance runs now
                    self.lost.set()
                    return False
            self.confirmed = sent
            return True

    async def _rewrite(self, key: str) -> bool:
        """Rewrite ``key`` on its revision; False when another process holds it now."""
        for _ in range(3):  # bounded: only a late rewrite of this process moves the revision on
            try:
                self.held[key] = await self.kv.update(key, self.me, last=self.held[key])
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            # A rewrite that timed out may still have been stored once the server went on
            # (measured: its nats-server SIGSTOPped 9 s, a materialiser then found its own entry
            # "taken over" and exited 0, nobody holding it). Still ours: go on from its revision.
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                return False
            if entry.value != self.me or not entry.revision:
                return False
            self.held[key] = entry.revision
        raise asyncio.TimeoutError  # cannot tell: the caller asks again later

    async def check(self) -> bool:
        """Whether this process still holds every entry and may write now; False when it was
        taken over (``lost`` is set) or cannot tell (disconnected: ask again later)."""
        if self.taken:
            return False
        if time.monotonic() - self.confirmed < STALE / 2:
            return True
        if not self.conn.nc.is_connected:
            # Cannot tell, at once: a rewrite sent now would wait out its 5 s timeout (and hold
            # ``_renewing`` meanwhile), so a caller that revives a dead embedded server between
            # checks (runtime.may_write) first did so ~15 s late (measured, tests/test_qa_p10.py).
            return False
        try:
            return await self.renew()
        except (nats.errors.Error, asyncio.TimeoutError):
            return False


@contextlib.asynccontextmanager
async def hold(conn: Connection, consumer: str, streams: Sequence[str], lost: asyncio.Event) -> AsyncIterator[Lease]:
    """Hold ``consumer`` on each of ``streams`` while inside (``Conflict`` when another process
    does); ``lost`` is set if an entry is taken over meanwhile (then stop). Yields the ``Lease``,
    whose ``check()`` guards every write."""
    kv = await _bucket(conn)
    me = msgspec.json.encode(Holder(socket.gethostname(), os.getpid(), consumer))
    lease = Lease(conn, kv, me, lost)
    held = lease.held
    try:
        for stream in sorted(set(streams)):
            key = f"{stream}.{consumer}"
            held[key] = await _take(kv, key, me, consumer)

        async def beat() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT)
                if not lease.conn.nc.is_connected:
                    continue  # cannot reach the server: nothing to hold ``_renewing`` for (see check)
                try:
                    if not await lease.renew():
                        return
                except (nats.errors.Error, asyncio.TimeoutError):
                    pass  # disconnected: the next beat tries again

        task = asyncio.create_task(beat())
        try:
            yield lease
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        for key, revision in held.items():
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await lease.kv.delete(key, last=revision)
