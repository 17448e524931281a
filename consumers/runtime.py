"""The worker runtime: durable pull consumers, one fetch loop per source, a graceful SIGTERM stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from botwire_stream import keys, settings
from botwire_stream.errors import BotWireError
from botwire_stream.nats.chatlog import NatsChat
from botwire_stream.nats.jetstream import Connection
from botwire_stream.nats.kv import NatsMemory
from botwire_stream.nats.pool import acquire, release
from botwire_stream.nats.rawsub import RawSubscription, header
from botwire_stream.nats.rawsub import status as raw_status

from .lock import Lease, hold

__all__ = ["ConsumerStatus", "Delivery", "Source", "Worker", "ack_many", "chat_source", "kv_source", "run", "status"]

PREFIX: Final = "botwire-"  # every consumer this package makes is named botwire-<kind>[-<id>]
_ACK_WAIT: Final = 60.0  # seconds before an unacknowledged event is delivered again
FETCH_WAIT: Final = 0.5  # seconds a fetch waits for events: also how soon a stop is noticed
# Seconds disconnected before a raw worker revives the embedded server itself (nats-py gets back
# to a server restarted on the same port by itself, within its reconnect wait).
_REVIVE_AFTER: Final = 2.0


@dataclass(frozen=True)
class Source:
    """A stream a worker consumes: which stream, which subjects, and how to create it if missing."""

    stream: str
    subject: str
    namespace: str
    kind: str  # "keys" or "chat"
    config: StreamConfig
    # A chat source's second subject family: its conversations' summary and clear events
    # (``botwire.<ns>.chatev.<id>``, nats/replay.py), consumed with the messages in stream order.
    events: str = ""

    def token(self, m: Msg | Delivery) -> tuple[bool, str]:
        """Whether ``m`` is a conversation event (a summary or a clear, not a message or a key
        write), and the subject tokens of its key or conversation."""
        if self.events and m.subject.startswith(self.events):
            return True, m.subject[len(self.events) :]
        return False, m.subject[len(self.subject) - 1 :]


class Delivery:
    """One event as a raw batch pull delivers it (``Worker.raw``): what a worker reads of it, with
    no nats-py ``Msg`` and no header parse (``botwire_stream.nats.rawsub``). The stream sequence,
    stored time (ns) and pending count come from the reply subject,
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>`` (or 12 tokens, with
    domain and account hash after ``$JS.ACK`` and a random token at the end)."""

    __slots__ = ("_nc", "_reply", "data", "hdr", "pending", "seq", "subject", "ts")

    def __init__(self, nc: Any, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
        self._nc = nc
        self.subject = subject.decode()
        self._reply = reply
        self.data = data
        self.hdr = hdr
        t = reply.split(b".")  # on bytes: once per event (int() takes bytes)
        i = 5 if len(t) == 9 else 7
        self.seq, self.ts, self.pending = int(t[i]), int(t[i + 2]), int(t[i + 3])

    @property
    def reply(self) -> str:
        return self._reply.decode()

    def header(self, name: bytes) -> str | None:
        return header(self.hdr, name)

    async def ack(self) -> None:
        """Acknowledge (explicit ack policy: this event only)."""
        await self._nc.publish(self.reply, b"+ACK")


async def ack_many(deliveries: Sequence[Delivery]) -> None:
    """Acknowledge every one of ``deliveries`` (each on its own: explicit ack policy) in one write
    to the socket: nats-py's ``publish`` per ack was a seventh of the materialiser's time at 5k
    events/s (measured, cProfile), for a message that is always the same 4 bytes. Like a
    ``publish``, it is buffered while the connection is being re-established (dropped on a closed client); an ack lost with a
    connection only delays the event's redelivery, which changes nothing twice."""
    if not deliveries:
        return
    nc = deliveries[0]._nc
    if nc.is_closed:
        return  # delivered by a client since replaced (raw_pump): delivered again on the new one
    # the PUB line nats-py writes for publish(reply, b"+ACK"): subject, size, payload
    await nc._send_command(b"".join([b"PUB " + d._reply + b" 4\r\n+ACK\r\n" for d in deliveries]))
    stats = nc.stats
    stats["out_msgs"] += len(deliveries)
    stats["out_bytes"] += 4 * len(deliveries)
    await nc._flush_pending()


async def _revive(conn: Connection, lost: float | None) -> float | None:
    """While the connection is down (``lost``: since when; None: up), revive the embedded server
    after ``_REVIVE_AFTER`` s: nothing else restarts a dead one while a worker only waits for
    events (a write would, through ``call``), as a watch does. Returns the new ``lost``."""
    if conn.nc.is_connected:
        return None
    now = time.monotonic()
    if lost is None:
        return now
    if conn.restart is not None and now - lost > _REVIVE_AFTER:
        with contextlib.suppress(Exception):  # anything: tried again later
            await asyncio.wait_for(conn.recover(), 3 * _REVIVE_AFTER + 5)
        return time.monotonic()
    return lost


def kv_source(conn: Connection, namespace: str) -> Source:
    kv = NatsMemory(conn, namespace, history=None, replicas=1, timeout=5.0)
    return Source(kv.stream, kv.prefix + ">", namespace, "keys", kv.config())


def chat_source(conn: Connection, namespace: str) -> Source:
    chat = NatsChat(namespace, 5.0)
    return Source(chat.stream, chat.chat + ">", namespace, "chat", chat.config(1), chat.events)


class Worker(ABC):
    """A consumer: its durable name, its sources, and what it does with a batch of events."""

    kind: str = "worker"
    batch: int = 500
    # True: ``handle`` gets ``Delivery`` objects from a raw batch pull (no nats-py Msg per event,
    # events handed over as they arrive rather than per fetch); False: nats-py ``Msg``s.
    raw: bool = False
    # Events delivered and not yet acknowledged, at most: the server stops delivering beyond, so
    # this bounds what a worker holds in memory (-1, unlimited, is kept as such by nats-server 2.15).
    max_ack_pending: int = 10_000
    # Set before ``finish`` when the lease was taken over: finish writes nothing then (lock.py).
    fenced: bool = False

    def __init__(self, namespaces: Sequence[str], kinds: Sequence[str], *, name: str | None = None) -> None:
        self.namespaces = [keys.check_namespace(ns) for ns in namespaces]  # InvalidNamespace before connecting
        self.kinds = list(kinds)
        self.sources: list[Source] = []
        self.durable = PREFIX + self.kind + (f"-{name}" if name else "")
        self.stopping = asyncio.Event()  # set by ``run`` on SIGTERM/SIGINT: long waits end on it
        self.conn: Connection
        self._lease: Lease | None = None  # set by ``run``: the instance lock (lock.py)

    async def held(self) -> bool:
        """Whether this process still holds its consumer (lock.py, Fencing): asked by ``run``
        before each batch, and by a worker before each write of a long batch (a webhook's POST,
        a summary, a conversation's chunks), so one stalled meanwhile and taken over stops."""
        return self._lease is None or await self._lease.check()

    async def setup(self) -> None:
        """Prepare before the first batch (the connection is open)."""

    @abstractmethod
    async def handle(self, source: Source, msgs: list[Any], caught_up: bool) -> None:
        """Process ``msgs`` (in stream order; ``Msg``s, or ``Delivery``s for a ``raw`` worker)
        and acknowledge each one once it is safe.
        ``caught_up``: nothing more was pending when the last of them was delivered."""

    async def idle(self) -> None:
        """Called when a fetch found nothing (every ``FETCH_WAIT`` s while idle)."""

    async def finish(self) -> None:
        """Called once when stopping, after the last batch."""

    async def made_again(self, source: Source) -> None:
        """``source``'s stream was deleted (``nats stream rm``, another client's ``delete_stream``)
        and made again since: its sequences start anew, and its consumer is made again from its
        start. Called before that; what the worker keeps of the old stream is stale."""


async def _subscribe(conn: Connection, worker: Worker, source: Source) -> Any:
    await conn.ensure_stream(source.config)
    config = ConsumerConfig(
        durable_name=worker.durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=_ACK_WAIT,
        max_ack_pending=worker.max_ack_pending,
    )
    if source.events:
        from botwire_stream.nats.replay import NatsReplay

        await NatsReplay(conn, source.namespace, 5.0).ensure_events()  # a stream made before it lacks it
        config.name = worker.durable
        config.filter_subjects = [source.subject, source.events + ">"]
        # created, or updated from the single filter of a consumer made before the events
        # subject existed (nats-py's pull_subscribe binds an existing consumer as it is)
        await conn.js.add_consumer(source.stream, config)
    else:
        config.filter_subject = source.subject
    sub = await conn.js.pull_subscribe(source.subject, durable=worker.durable, stream=source.stream, config=config)
    # Resume at once from the ack floor: what a killed run had fetched but not acknowledged would
    # otherwise wait out ack_wait (measured: a restarted audit idle for the full 60 s). Needs
    # nats-server 2.14 (consumer reset); one process per consumer name is expected.
    await conn.js.reset_consumer(source.stream, worker.durable)
    return sub


async def _created(conn: Connection, stream: str) -> datetime | None:
    """When ``stream`` was made (None: it does not exist): a stream deleted and made again has
    another time."""
    try:
        info = await conn.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return None
    return info.created


async def _subscribe_again(conn: Connection, worker: Worker, source: Source, made: dict[str, datetime | None]) -> Any:
    """After a pull found no consumer (the stream was deleted, or the consumer alone): the
    consumer made again once the stream exists (None until then: a worker does not make a deleted
    namespace again, its next write does), the worker told first when the stream is a new one
    (``Worker.made_again``). Before, the materialiser asked for events of a consumer that was no
    more, in a loop, for ever (tests/test_namespace_deleted.py)."""
    created = await _created(conn, source.stream)
    if created is None:
        return None
    if created != made.get(source.stream):
        await worker.made_again(source)
    sub = await _subscribe(conn, worker, source)
    made[source.stream] = created
    return sub


async def run(worker: Worker, url: str | None = None, *, stop: asyncio.Event | None = None) -> None:
    """Run ``worker`` until SIGTERM/SIGINT (or ``stop`` is set): each source fetched by its own
    loop, batches handled one at a time. A stop lets the batch in hand finish and be acknowledged."""
    stop = stop or asyncio.Event()
    worker.stopping = stop
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests run it in-process)
            pass
    conn = await acquire(settings.resolve(url))
    worker.conn = conn
    makers = {"keys": kv_source, "chat": chat_source}
    worker.sources = [makers[k](conn, ns) for ns in worker.namespaces for k in worker.kinds]
    lock = asyncio.Lock()
    instance = contextlib.AsyncExitStack()
    try:
        # one process per consumer name (consumers/lock.py): a second one is refused, Conflict
        lease = await instance.enter_async_context(hold(conn, worker.durable, [s.stream for s in worker.sources], stop))
        worker._lease = lease

        async def may_write() -> bool:
            """The lease still held (consumers/lock.py, Fencing): asked before each pull, batch and
            idle round, so a holder resumed after a takeover fetches and writes nothing more.
            While it cannot tell (disconnected, a slow server), it asks again: what it holds is
            kept for then, not dropped to wait out ack_wait (a stop lets a batch in hand finish
            while the lease holds). False: taken over, or stopping and cannot tell."""
            lost: float | None = None
            while True:
                if await lease.check():
                    return True
                if lease.taken or stop.is_set():
                    return False
                # the embedded server may have died: revived here too, else this waits for ever
                lost = await _revive(conn, lost)
                await asyncio.sleep(0.2)

        await worker.setup()
        subs = [(s, await _subscribe(conn, worker, s)) for s in worker.sources]
        made = {s.stream: await _created(conn, s.stream) for s in worker.sources}
        if worker.raw:
            for _, sub in subs:  # the durable consumer stays; its deliveries come to raw_pump's inbox
                await sub.unsubscribe()

        async def raw_pump(source: Source) -> None:
            """Batch pull requests answered on a raw inbox: a long poll of ``batch`` events
            (expires ``FETCH_WAIT``) kept outstanding, the events handled as they arrive."""
            arrived: deque[Delivery] = deque()
            ready = asyncio.Event()
            state = {"done": True, "gone": False}  # done: the outstanding request ended (satisfied, expired, refused)
            nc = conn.nc

            def sink(subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
                if reply:
                    arrived.append(Delivery(nc, subject, reply, data, hdr))
                    got[0] += 1
                    if got[0] >= worker.batch:
                        state["done"] = True
                elif (code := raw_status(hdr, data)) != 100:  # 408 expired, 409 refused/changed; 100 heartbeat
                    state["done"] = True
                    if code == 503:  # no responders: no such consumer (its stream deleted)
                        state["gone"] = True
                ready.set()

            got = [0]
            inbox = await RawSubscription(nc, nc.new_inbox(), sink).start()
            subject = f"$JS.API.CONSUMER.MSG.NEXT.{source.stream}.{worker.durable}"
            request = msgspec.json.encode({"batch": worker.batch, "expires": int(FETCH_WAIT * 1e9)})
            sent = 0.0
            active = time.monotonic()  # when a batch was last handled, or idle last called
            reconnects = nc.stats["reconnects"]
            lost: float | None = None  # since when the connection is down
            try:
                while not stop.is_set():
                    if conn.nc is not nc:
                        # Replaced by ``conn.recover`` (the embedded server came back on another
                        # port, or the old client could not reach it again): the inbox belongs to
                        # the old client, which is closed. The deliveries in hand are dropped, not
                        # acknowledged: delivered again after the reset below (idempotent).
                        await inbox.stop()
                        arrived.clear()
                        try:
                            inbox = await RawSubscription(conn.nc, conn.nc.new_inbox(), sink).start()
                        except nats.errors.Error:
                            await asyncio.sleep(0.2)  # tried again next round
                            continue
                        nc = conn.nc
                        reconnects, state["done"] = -1, True  # reset from the ack floor, ask again
                    lost = await _revive(conn, lost)
                    if state["gone"] and nc.is_connected:
                        try:
                            again = await _subscribe_again(conn, worker, source, made)
                        except (nats.errors.Error, asyncio.TimeoutError, BotWireError):
                            again = None
                        if again is None:
                            await asyncio.sleep(0.2)  # the stream is not made again yet: next round
                            continue
                        await again.unsubscribe()  # the consumer stays; its deliveries come to the inbox
                        arrived.clear()  # the old consumer's: never acknowledged
                        state["gone"], state["done"] = False, True
                    if nc.stats["reconnects"] != reconnects and nc.is_connected:
                        try:  # as in pump: resume from the ack floor at once
                            await conn.js.reset_consumer(source.stream, worker.durable)
                            reconnects = nc.stats["reconnects"]
                            state["done"] = True  # the server forgot the request
                        except (nats.errors.Error, asyncio.TimeoutError):
                            await asyncio.sleep(0.2)
                            continue
                    now = time.monotonic()
                    # a request lost with a connection never answers: asked again after 2x expires
                    if state["done"] or now - sent > 2 * FETCH_WAIT + 1:
                        if not await may_write():
                            continue
                        if nc.is_connected:
                            state["done"], got[0], sent = False, 0, now
                            await nc.publish(subject, request, reply=inbox.subject)
                    if not arrived:
                        ready.clear()
                        try:
                            async with asyncio.timeout(FETCH_WAIT):
                                await ready.wait()
                        except TimeoutError:
                            pass
                        if not arrived:
                            # nothing for FETCH_WAIT (a wait, or a request that expired empty):
                            # idle, as often as a fetch that finds nothing, no more
                            if time.monotonic() - active >= FETCH_WAIT and await may_write():
                                active = time.monotonic()
                                async with lock:
                                    await worker.idle()
                            continue
                    if not await may_write():
                        continue  # taken over: what arrived is the new holder's (redelivered to it)
                    n = min(len(arrived), worker.batch)
                    msgs = [arrived.popleft() for _ in range(n)]
                    caught_up = msgs[-1].pending == 0 and not arrived
                    async with lock:  # shielded: a stop never cuts a batch in half
                        await asyncio.shield(worker.handle(source, msgs, caught_up))
                    active = time.monotonic()
            finally:
                await inbox.stop()

        async def pump(source: Source, sub: Any) -> None:
            nc = conn.nc
            reconnects = nc.stats["reconnects"]
            lost: float | None = None  # since when the connection is down
            while not stop.is_set():
                if conn.nc is not nc:
                    # Replaced by ``conn.recover`` (as in raw_pump): the pull subscription belongs
                    # to the old, closed client; made again on the new one (from the ack floor).
                    try:
                        sub = await _subscribe(conn, worker, source)
                    except (nats.errors.Error, asyncio.TimeoutError):
                        await asyncio.sleep(0.2)  # tried again next round
                        continue
                    nc = conn.nc
                    reconnects = nc.stats["reconnects"]
                lost = await _revive(conn, lost)
                if lost is not None and not nc.is_connected:
                    await asyncio.sleep(0.05)
                    continue
                if conn.nc.stats["reconnects"] != reconnects and conn.nc.is_connected:
                    # Reconnected (the server restarted, or a link dropped): what was fetched and
                    # not yet acknowledged, or whose acknowledgement was lost, would wait out
                    # ack_wait (60 s) before redelivery; resume from the ack floor at once, as at
                    # start (redelivered events change nothing twice).
                    try:
                        await conn.js.reset_consumer(source.stream, worker.durable)
                        reconnects = conn.nc.stats["reconnects"]
                    except (nats.errors.Error, asyncio.TimeoutError):
                        await asyncio.sleep(0.2)  # the server is still coming up: next round
                        continue
                if not await may_write():
                    continue
                try:
                    msgs = await sub.fetch(worker.batch, timeout=FETCH_WAIT)
                except (nats.errors.TimeoutError, asyncio.TimeoutError, nats.errors.ConnectionClosedError):
                    msgs = []  # closed: the client was replaced meanwhile (next round)
                except (nats.errors.NoRespondersError, nats.js.errors.APIError):
                    # no such consumer: its stream was deleted (made again by a write, later)
                    try:
                        again = await _subscribe_again(conn, worker, source, made)
                    except (nats.errors.Error, asyncio.TimeoutError, BotWireError):
                        again = None
                    if again is None:
                        await asyncio.sleep(0.2)
                    else:
                        sub = again
                    continue
                if not await may_write():
                    continue  # taken over meanwhile: what was fetched is the new holder's
                if not msgs:  # nats-py also returns an empty list (measured: with several sources idle)
                    async with lock:
                        await worker.idle()
                    continue
                caught_up = msgs[-1].metadata.num_pending == 0
                async with lock:  # shielded: a stop never cuts a batch in half
                    await asyncio.shield(worker.handle(source, msgs, caught_up))

        if worker.raw:
            await asyncio.gather(*(raw_pump(s) for s, _ in subs))
        else:
            await asyncio.gather(*(pump(s, sub) for s, sub in subs))
        worker.fenced = not await lease.check()  # taken over (or cannot tell): finish writes nothing
        async with lock:
            await worker.finish()
        await conn.nc.flush(timeout=5)  # the last acknowledgements are on the wire before exit
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        await instance.aclose()
        await release(conn)


@dataclass(frozen=True)
class ConsumerStatus:
    """One consumer's lag: events not yet delivered, delivered but unacknowledged, the stream
    sequence every event up to which is acknowledged, and when it last acknowledged one."""

    name: str
    stream: str
    pending: int
    ack_pending: int
    ack_floor: int
    stream_last: int
    last_active: datetime | None


async def status(url: str | None = None) -> list[ConsumerStatus]:
    """Every ``botwire-`` consumer on every stream of the server."""
    conn = await acquire(settings.resolve(url))
    try:
        out = []
        for info in await conn.js.streams_info():
            name = info.config.name or ""
            try:
                consumers = await conn.js.consumers_info(name)
            except nats.js.errors.NotFoundError:
                continue
            for c in consumers:
                if not c.name.startswith(PREFIX):
                    continue
                floor = c.ack_floor
                active = (floor.last_active if floor else None) or (c.delivered.last_active if c.delivered else None)
                out.append(
                    ConsumerStatus(
                        name=c.name,
                        stream=name,
                        pending=c.num_pending or 0,
                        ack_pending=c.num_ack_pending or 0,
                        ack_floor=floor.stream_seq if floor else 0,
                        stream_last=info.state.last_seq,
                        last_active=active,
                    )
                )
        return sorted(out, key=lambda s: (s.name, s.stream))
    finally:
        await release(conn)
