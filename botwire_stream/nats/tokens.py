"""Token streams on JetStream: the NATS side of ``AsyncTokenStream`` (``TokenBackend``).

Layout: one JetStream stream ``BOTWIRE_TOKENS`` (subjects ``tok.>``) holds every token stream.
A stream named ``path`` lives under ``tok.<h>`` with ``h`` the first 32 hex digits of
sha256(path) (any UTF-8 path fits a subject that way):

- ``tok.<h>.s`` its state (msgspec JSON: config, closed, producers, Stream-Seq, fork base,
  fork references, soft delete); each state message rolls up the previous one, so the last
  message *is* the state, and its sequence is the stream's version.
- ``tok.<h>.d`` its chunks, one message per append, header-less. A chunk's JetStream sequence is
  its offset: strictly increasing, and shared with a fork up to the fork point for free.
- ``tok.<h>.t`` the last read of a stream with a sliding TTL (an empty message, rolled up).

Every write is compare-and-set against the state's sequence
(``Nats-Expected-Last-Subject-Sequence`` with ``...-Subject: tok.<h>.s``): a plain append is one
publish; an append that changes the state (producer, Stream-Seq, close) is an atomic batch of the
chunk and the new state, so producer state is committed with its data or not at all (measured:
a stale expected sequence refuses the whole batch, 10071, nothing stored). Deleting purges
``tok.<h>.>``; a new stream at the same path then starts at a higher sequence, with no trace.

Live readers subscribe (plain NATS) to ``tokw.<h>.*``, where the stream republishes the headers
of every message once it is stored (``republish``), only as a wake-up: they read from the stream
afterwards, so a slow reader drops wake-ups, never data, and never slows a writer.
(Subscribing to ``tok.<h>.*`` itself woke readers before the write was stored: an atomic batch's
staged messages reach subscribers before its commit, and a read right then missed the append
until the next keep-alive, 0.5 s, in 11 of 12 tries. A wake-up published by the writer after
the ack worked, but cost every append a second publish: 841 vs 1,511 trivial appends/s.)
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import RePublish, StreamConfig

from .._backend import CommitResult, Snapshot, TokenState
from ..settings import ConnectOptions
from .errors import raise_api_error
from .jetstream import Connection
from .pool import acquire, release

__all__ = ["NatsTokenBackend", "TOKENS_STREAM", "token_stream_config"]

TOKENS_STREAM = "BOTWIRE_TOKENS"
_PREFIX = "tok"
_WAKE = "tokw"  # where stored messages are republished (headers only); outside the stream's subjects

_state_decoder = msgspec.json.Decoder(TokenState)


def token_stream_config(replicas: int | None = None) -> StreamConfig:
    """The JetStream stream that holds every token stream."""
    return StreamConfig(
        name=TOKENS_STREAM,
        subjects=[f"{_PREFIX}.>"],
        allow_direct=True,
        allow_atomic=True,
        allow_rollup_hdrs=True,
        duplicate_window=120,
        republish=RePublish(src=f"{_PREFIX}.>", dest=f"{_WAKE}.>", headers_only=True),
        max_msgs=-1,
        max_consumers=-1,
        num_replicas=replicas,
    )


def _stamp(msg: Msg) -> float:
    """A direct-get reply's ``Nats-Time-Stamp`` as POSIX seconds (RFC 3339 with nanoseconds)."""
    raw = (msg.headers or {}).get("Nats-Time-Stamp", "")
    if not raw:
        return 0.0
    head, _, frac = raw.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + (float("0." + frac[:6]) if frac else 0.0)


class _Wakeups:
    """One plain-NATS subscription per watched token stream in this process, shared by all its
    waiters (1,000 SSE readers of one stream cost one subscription); each message sets an event."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._subs: dict[str, tuple[Subscription, set[asyncio.Event]]] = {}

    async def add(self, key: str, event: asyncio.Event) -> None:
        entry = self._subs.get(key)
        if entry is None:
            waiters: set[asyncio.Event] = set()

            async def wake(_msg: Msg) -> None:
                for ev in waiters:
                    ev.set()

            sub = await self._conn.nc.subscribe(f"{_WAKE}.{key}.*", cb=wake)
            entry = self._subs.setdefault(key, (sub, waiters))
            if entry[0] is not sub:
                await sub.unsubscribe()
        entry[1].add(event)

    async def remove(self, key: str, event: asyncio.Event) -> None:
        entry = self._subs.get(key)
        if entry is None:
            return
        entry[1].discard(event)
        if not entry[1]:
            del self._subs[key]
            try:
                await entry[0].unsubscribe()
            except Exception:  # the connection is gone: so is the subscription
                pass


async def open_tokens(opts: ConnectOptions, *, replicas: int | None, timeout: float) -> NatsTokenBackend:
    """The shared connection for ``opts`` with the token streams' JetStream stream made sure to exist."""
    conn = await acquire(opts)
    try:
        await conn.ensure_stream(token_stream_config(replicas), timeout)
    except BaseException:
        await release(conn)
        raise
    return NatsTokenBackend(conn, timeout)


class NatsTokenBackend:
    """``TokenBackend`` over one shared ``Connection``."""

    def __init__(self, conn: Connection, timeout: float = 5.0) -> None:
        self._conn = conn
        self._timeout = timeout
        self._wakeups = _Wakeups(conn)

    async def close(self) -> None:
        """Release the shared connection (it closes with its last user)."""
        await release(self._conn)

    @property
    def max_chunk(self) -> int:
        return self._conn.max_body

    def key(self, path: str) -> str:
        return hashlib.sha256(path.encode()).hexdigest()[:32]

    async def load(self, key: str) -> Snapshot | None:
        """The state, its version and the last chunk's sequence (one multi-last direct get)."""
        subjects = [f"{_PREFIX}.{key}.{x}" for x in ("s", "d", "t")]
        batch = await self._conn.direct_batch(
            TOKENS_STREAM, {"multi_last": subjects, "batch": 3}, self._timeout
        )
        state: TokenState | None = None
        version = last = 0
        activity = 0.0
        for msg in batch.msgs:
            hdr = msg.headers or {}
            subject, seq = hdr.get("Nats-Subject", ""), int(hdr.get("Nats-Sequence", 0))
            if subject.endswith(".s"):
                state, version = _state_decoder.decode(msg.data), seq
            elif subject.endswith(".d"):
                last = seq
            activity = max(activity, _stamp(msg))
        if state is None:
            return None
        return Snapshot(key, state, version, last, activity)

    def _headers(self, key: str, version: int) -> dict[str, str]:
        return {
            "Nats-Expected-Last-Subject-Sequence": str(version),
            "Nats-Expected-Last-Subject-Sequence-Subject": f"{_PREFIX}.{key}.s",
        }

    async def commit(
        self, key: str, version: int, chunk: bytes | None, state: TokenState | None
    ) -> CommitResult:
        """Store ``chunk`` and/or the new ``state`` if the state is still at ``version`` (0: no
        stream yet); ``Conflict`` otherwise, with nothing stored."""
        cas = self._headers(key, version)
        data_subject, state_subject = f"{_PREFIX}.{key}.d", f"{_PREFIX}.{key}.s"
        if state is None:
            assert chunk is not None
            seq = await self._conn.publish(data_subject, chunk, cas, self._timeout, what="append")
            return CommitResult(seq, version)
        body = msgspec.json.encode(state)
        rollup = {"Nats-Rollup": "sub"}
        if chunk is None:
            seq = await self._conn.publish(state_subject, body, {**cas, **rollup}, self._timeout, what="stream update")
            return CommitResult(0, seq)
        seq = await self._batch(data_subject, state_subject, chunk, body, cas)
        return CommitResult(seq - 1, seq)

    async def _batch(
        self, data_subject: str, state_subject: str, chunk: bytes, body: bytes, cas: Mapping[str, str]
    ) -> int:
        """The chunk then the state, as one atomic batch under the compare-and-set of ``cas``;
        the state's sequence (the chunk's is one less: a batch is stored contiguously)."""
        conn = self._conn
        ids = [conn.new_id(), conn.new_id()]
        tries = 0

        async def run() -> int:
            nonlocal tries
            tries += 1
            batch_id = conn.new_id()
            first = {**cas, "Nats-Msg-Id": ids[0], "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": "1"}
            await conn.nc.publish(data_subject, chunk, headers=first)
            last = {
                "Nats-Msg-Id": ids[1],
                "Nats-Rollup": "sub",
                "Nats-Batch-Id": batch_id,
                "Nats-Batch-Sequence": "2",
                "Nats-Batch-Commit": "1",
            }
            msg = await conn.request(state_subject, body, last, self._timeout)
            ack = msgspec.json.decode(msg.data)
            err = ack.get("error")
            if err is None:
                return int(ack["seq"])
            if tries > 1 and err.get("err_code") in (10071, 10201):
                # re-sent after a lost connection: the first copy may have landed
                found = await conn._landed(state_subject, ids[1], self._timeout)
                if found is not None:
                    return found
            raise_api_error(err)

        return await conn.call(run, timeout=self._timeout)

    async def read(self, segments: Sequence[tuple[str, int, int]], max_bytes: int) -> list[tuple[int, bytes]]:
        """The chunks of ``(key, after, upto)`` segments, in order, at least one and about
        ``max_bytes`` in all: sequences in (after, upto] of each key's chunks, except that the
        last segment (the stream's own chunks) may also return chunks after ``upto``.

        A fork's shared segments are read with headers (each chunk's sequence, to stop at the
        fork point); the own segment without (``no_hdr``): nats-py parses headers in Python, and
        a catch-up of 1,000 chunks took 68 ms with them, most of it in that parsing. Without,
        only the last chunk of each page has its sequence (the page's end); the others get 0.
        """
        out: list[tuple[int, bytes]] = []
        size = 0
        last = len(segments) - 1
        for i, (key, after, upto) in enumerate(segments):
            seq = after + 1
            subject = f"{_PREFIX}.{key}.d"
            while seq <= upto or (i == last and upto == 0):
                req: dict[str, Any] = {"next_by_subj": subject, "seq": seq, "batch": 1000, "max_bytes": max(max_bytes - size, 1)}
                if i == last:
                    req["no_hdr"] = True
                batch = await self._conn.direct_batch(TOKENS_STREAM, req, self._timeout)
                if not batch.msgs:
                    break
                if i == last:
                    out.extend((0, m.data) for m in batch.msgs)
                    out[-1] = (batch.last_seq, out[-1][1])
                    page = sum(len(m.data) for m in batch.msgs)
                    size += page
                    seq = batch.last_seq + 1
                    if batch.last_seq >= upto > 0:
                        break
                    # fewer than asked, and well under the byte cap (which also counts each
                    # message's subject and framing): the server had no more; skip the empty page
                    if len(batch.msgs) < req["batch"] and page + 512 * len(batch.msgs) < req["max_bytes"]:
                        break
                else:
                    for m in batch.msgs:
                        s = int((m.headers or {}).get("Nats-Sequence", 0))
                        if s > upto:
                            seq = upto + 1
                            break
                        out.append((s, m.data))
                        size += len(m.data)
                        seq = s + 1
                if size >= max_bytes:
                    return out
        return out

    async def purge(self, key: str) -> None:
        await self._conn.purge(TOKENS_STREAM, f"{_PREFIX}.{key}.>", timeout=self._timeout)
        try:  # a purge is not republished: wake the readers, who then find the stream gone
            await self._conn.nc.publish(f"{_WAKE}.{key}.p", b"")
        except Exception:  # they find out at their next keep-alive read
            pass

    async def touch(self, key: str) -> None:
        """Record a read of a stream with a sliding TTL (renews it)."""
        await self._conn.publish(f"{_PREFIX}.{key}.t", b"", {"Nats-Rollup": "sub"}, self._timeout, what="touch")

    async def watch(self, key: str, event: asyncio.Event) -> None:
        await self._wakeups.add(key, event)

    async def unwatch(self, key: str, event: asyncio.Event) -> None:
        await self._wakeups.remove(key, event)
