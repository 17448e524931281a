"""``MemoryBackend`` over NATS: one namespace's keys as a KV bucket.

Each namespace is a NATS KV bucket (``botwire_<namespace>``, stream ``KV_botwire_<namespace>``)
with direct gets and per-key TTL limit markers. Every write is one JetStream publish on
``$KV.botwire_<namespace>.<encoded key>`` carrying a ``Botwire-Origin`` header, so the stream is
also the namespace's event log. Values larger than one message go through ``blobs.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Final

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy, StreamConfig

from .. import keys
from .._backend import ChangeFeed, Current, KeyChange, KeyRevision
from ..errors import BotWireError, ChangedWhileRead, Conflict, QuotaExceeded, ServerUnavailable
from ..settings import ConnectOptions
from ..times import parse_time
from .blobs import Blobs, ChunksGone, Outcome, op_of
from .connect import origin_headers
from .feeds import ResumingFeed
from .jetstream import Connection
from .pool import acquire, release
from .retry import SAFE

__all__ = ["CREATED", "DEFAULT_HISTORY", "KeyFeed", "NatsMemory", "created_of", "open_memory"]

DEFAULT_HISTORY: Final = 16
_REREAD: Final = "read the key before repeating the update"
# When the key last came to hold a value, carried by writes conditional on the revision they
# replace (so it is exact): that revision's own ``Nats-Time-Stamp``, or "self" (this message's).
# A plain set does not know it and leaves it out; readers then fall back to the revisions.
CREATED: Final = "Botwire-Created"
_MULTI_LAST: Final = 1024  # the most subjects one multi-last get answers (nats-server: 413 beyond)
_LIST_BYTES: Final = 256 * 1024  # the subjects named in one request: well under a 1 MiB max_payload


async def open_memory(
    opts: ConnectOptions, namespace: str, *, history: int | None, replicas: int | None, timeout: float
) -> NatsMemory:
    """The shared connection for ``opts`` with the namespace's bucket made sure to exist, and an
    explicit ``history=`` applied to a bucket that keeps another number of revisions."""
    conn = await acquire(opts)
    try:
        kv = NatsMemory(conn, namespace, history=history, replicas=replicas, timeout=timeout)
        await conn.ensure_stream(kv.config(), timeout)
        if history is not None:
            await conn.set_max_per_subject(kv.stream, history, timeout)
    except BaseException:
        await release(conn)
        raise
    return kv


def _created(expected: int, replaced: Current | None) -> str | None:
    """The ``CREATED`` header of a write conditional on revision ``expected`` (``replaced``)."""
    if expected == 0:
        return "self"  # the key has no message at all
    if replaced is None or replaced.revision != expected:
        return None
    if replaced.data is None:
        return "self"  # it replaces a delete or an expiry
    return created_of(getattr(replaced.handle, "headers", None) or {})


def created_of(headers: dict[str, str]) -> str | None:
    """The time (a NATS ``Nats-Time-Stamp``) a stored value's key came to hold a value, from the
    headers of a message read with them; None when its writer did not know."""
    created = headers.get(CREATED)
    return headers.get("Nats-Time-Stamp") if created == "self" else created


class NatsMemory:
    """One namespace's KV bucket on a shared ``Connection`` (a ``_backend.MemoryBackend``)."""

    def __init__(self, conn: Connection, namespace: str, *, history: int | None, replicas: int | None, timeout: float) -> None:
        self.conn = conn
        self.namespace = namespace
        self.history = history
        self.replicas = replicas
        self.timeout = timeout
        self.bucket = f"botwire_{namespace}"
        self.stream = f"KV_{self.bucket}"
        self.prefix = f"$KV.{self.bucket}."
        self.blobs = Blobs(self)

    def config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}>"],
            max_msgs_per_subject=self.history or DEFAULT_HISTORY,
            discard=DiscardPolicy.NEW,
            allow_rollup_hdrs=True,
            deny_delete=True,
            allow_direct=True,
            allow_msg_ttl=True,
            subject_delete_marker_ttl=1,
            duplicate_window=120,
            max_consumers=-1,
            max_msgs=-1,
            num_replicas=self.replicas,
            metadata={"botwire.namespace": self.namespace},
        )

    def subject(self, key: str) -> str:
        return self.prefix + keys.encode_key(key)

    async def close(self) -> None:
        await release(self.conn)

    # -- reading --------------------------------------------------------------------------------
    async def _data(self, key: str, msg: Msg) -> bytes | None:
        """The value bytes of a stored message (its chunks read whole); None for markers."""
        hdr = msg.headers
        if hdr:
            if op_of(hdr) != "set":
                return None
            if "Botwire-Blob" in hdr:
                return await self.blobs.read(key, msg.data)
        return msg.data

    async def get(self, key: str) -> Current | None:
        subject = self.prefix + keys.encode_key(key)
        gone = None
        for _ in range(5):
            msg = await self.conn.direct_get_last(self.stream, subject, self.timeout)
            if msg is None:
                return None
            hdr = msg.headers or {}
            try:
                return Current(int(hdr["Nats-Sequence"]), await self._data(key, msg), msg)
            except ChunksGone:
                if gone == hdr["Nats-Sequence"] and "Nats-TTL" in hdr:
                    # still the last: its chunks expired first, so it is expiring
                    return Current(int(hdr["Nats-Sequence"]), None, msg)
                gone = hdr["Nats-Sequence"]
                continue  # overwritten while we read its chunks: read the new value
        raise ChangedWhileRead(f"the value of {key!r} kept changing while it was read; try again")

    async def contains(self, key: str) -> bool:
        msg = await self.conn.direct_get_last(self.stream, self.subject(key), self.timeout)
        return msg is not None and op_of(msg.headers) == "set"

    async def revisions(self, key: str) -> list[KeyRevision]:
        msgs = await self.conn.read_subject(
            self.stream, self.subject(key), page=self.history or 64, timeout=self.timeout
        )
        out = []
        for m in msgs:
            hdr = m.headers or {}
            op = op_of(hdr)
            data = None
            if op == "set":
                try:
                    data = await self._data(key, m)
                except BotWireError:
                    data = None  # an overwritten chunked value whose chunks are reclaimed
            out.append(KeyRevision(int(hdr["Nats-Sequence"]), op, data, parse_time(hdr["Nats-Time-Stamp"])))
        return out

    async def list_keys(self, pattern: str, *, limit: int | None = None, after: str | None = None) -> list[str]:
        """The matching keys holding a value, sorted; only those after ``after``, at most ``limit``.

        Costs what it returns, not the namespace nor how the keys interleave in its log: the
        server's per-subject index names the keys under the pattern's literal leading segments
        (stream info's subjects filter, 0.3 ms for 100 among 100k keys), and one multi-last get
        per 1024 of them reads their last records (a delete or an expiry marker is no value).
        Every multi-last get is capped at the sequence the first one answered at, so the listing
        is the namespace as it was at one moment: a key written meanwhile is listed or not,
        whole; a key deleted, purged or expired before it is never listed.
        """
        subject_filter, exact = keys.pattern_filter(pattern)
        if exact:
            if limit == 0 or (after is not None and pattern <= after):
                return []
            msg = await self.conn.direct_get_last(self.stream, self.prefix + subject_filter, self.timeout)
            return [pattern] if msg is not None and op_of(msg.headers) == "set" else []
        n = len(self.prefix)
        counts, floor = await self.conn.subject_counts_at(self.stream, self.prefix + subject_filter, self.timeout)
        floor = max(floor, self.conn.stream_floor(self.stream))
        candidates = []
        for subject in counts:
            key = keys.decode_key(subject[n:])
            if keys.matches(key, pattern) and (after is None or key > after):
                candidates.append((key, subject))
        candidates.sort()
        found: list[str] = []
        up_to = 0
        i = 0
        while i < len(candidates) and (limit is None or len(found) < limit):
            want = len(candidates) if limit is None else limit - len(found)
            chunk: list[str] = []
            size = 0
            while i < len(candidates) and len(chunk) < min(want, _MULTI_LAST) and size < _LIST_BYTES:
                chunk.append(candidates[i][1])
                size += len(candidates[i][1]) + 3
                i += 1
            live, up_to = await self._last_ops(chunk, up_to, floor)
            found.extend(keys.decode_key(s[n:]) for s in chunk if s in live)
        return found

    async def _last_ops(self, subjects: list[str], up_to: int, floor: int = 0) -> tuple[set[str], int]:
        """Which of ``subjects`` held a value at sequence ``up_to`` (0: now, from a server at
        ``floor`` or later), and that sequence: one multi-last get, paged on when its reply stops
        at the server's byte cap."""
        live: set[str] = set()
        request: dict[str, Any] = {"multi_last": subjects, "up_to_seq": up_to or None}
        first = not up_to
        while True:
            if first:  # the stream leader's last sequence when the keys were named, and our own writes
                batch = await self.conn.multi_last_from(self.stream, request, floor, self.timeout)
                first = False
            else:
                batch = await self.conn.direct_batch(self.stream, request, self.timeout)
            up_to = up_to or batch.up_to_seq
            for m in batch.msgs:
                hdr = m.headers or {}
                if op_of(hdr) == "set":
                    live.add(hdr["Nats-Subject"])
            if not batch.msgs or not batch.pending:
                return live, up_to
            request = {"multi_last": subjects, "seq": batch.last_seq + 1, "up_to_seq": up_to}

    # -- writing --------------------------------------------------------------------------------
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
        conn = self.conn
        headers = origin_headers()
        if ttl is not None:
            # Roll up older revisions: when this one expires, the key must read as missing,
            # not fall back to an older revision.
            headers["Nats-TTL"] = str(ttl)
            headers["Nats-Rollup"] = "sub"
        if expected is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected)
            created = _created(expected, replaced)
            if created is not None:
                headers[CREATED] = created
        subject = self.prefix + keys.encode_key(key)
        # A set repeated writes the same value again; an update repeated applies fn twice.
        outcome = Outcome(f"{what} of {key!r}", SAFE if expected is None else _REREAD)
        if len(data) <= conn.max_body:
            return await conn.publish(subject, data, headers, self.timeout, what=outcome.what, advice=outcome.advice)
        msg = replaced.handle if replaced is not None else None
        return await self.blobs.write(key, subject, data, ttl, headers, expected, msg, outcome)

    async def delete(self, key: str) -> bool:
        conn = self.conn
        subject = self.subject(key)
        for _ in range(100):
            msg = await conn.direct_get_last(self.stream, subject, self.timeout)
            if msg is None or op_of(msg.headers) != "set":
                return False
            hdr = msg.headers or {}
            headers = origin_headers()
            headers["KV-Operation"] = "DEL"
            headers["Nats-Expected-Last-Subject-Sequence"] = hdr["Nats-Sequence"]
            try:
                rev = await conn.publish(subject, b"", headers, self.timeout, what=f"delete of {key!r}", advice=SAFE)
            except Conflict:
                continue  # written meanwhile: look again
            except QuotaExceeded:
                # At the storage limit: free the chunks first, then the revisions themselves.
                seq = int(hdr["Nats-Sequence"])
                await self.blobs.reclaim(key, msg, before=seq + 1, keep="")
                await self._delete_at_limit(subject, seq, headers)
                return True
            await self.blobs.reclaim(key, msg, before=rev, keep="")
            return True
        raise Conflict(f"delete of {key!r} kept racing with other writers; try again")

    async def _delete_at_limit(self, subject: str, seq: int, marker: dict[str, str]) -> None:
        """Delete at the storage limit, where the delete marker (a new message) is refused.

        Purges the key's revisions up to ``seq`` (the one read), which frees their space and keeps
        any newer write; then records the delete when it fits and nobody wrote meanwhile.
        """
        await self.conn.purge(self.stream, subject, before_seq=seq + 1, timeout=self.timeout)
        marker["Nats-Expected-Last-Subject-Sequence"] = "0"  # the key has no message left
        try:
            await self.conn.publish(subject, b"", marker, self.timeout)
        except (Conflict, QuotaExceeded):
            pass  # a newer value was written, or no room even now: the key is deleted all the same

    # -- live changes ---------------------------------------------------------------------------
    def watch(self, pattern: str, after: int | None = None) -> KeyFeed:
        subject_filter, exact = keys.pattern_filter(pattern)
        return KeyFeed(self, self.prefix + subject_filter, pattern, exact, after)

    def changes(self) -> ChangeFeed:
        return _CacheFeed(self, self.prefix + ">", "*", True)


class KeyFeed(ResumingFeed[KeyChange]):
    """The changes of the keys matching a glob, from an ordered consumer on the bucket."""

    def __init__(self, kv: NatsMemory, subject: str, pattern: str, exact: bool, after: int | None = None) -> None:
        super().__init__(kv.conn, kv.stream, kv.timeout)
        self._kv = kv
        self._subject = subject
        self._pattern = pattern
        self._exact = exact
        self._after = after

    def _first_seq(self) -> int | None:
        # a revision is the bucket stream's sequence: resume right after it
        return None if self._after is None else self._after + 1

    async def _subscribe(self, conn: Connection, start_seq: int) -> Any:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
        return await conn.js.subscribe(self._subject, ordered_consumer=True, config=config)

    async def _convert(self, conn: Connection, msg: Msg) -> KeyChange | None:
        """The change ``msg`` records; None for another key, or for a chunked value already
        replaced (a later change with the newer value follows)."""
        key = keys.decode_key(msg.subject[len(self._kv.prefix) :])
        if not (self._exact or keys.matches(key, self._pattern)):
            return None
        op = op_of(msg.headers)
        data = None
        if op == "set":
            try:
                data = await self._kv._data(key, msg)
            except ChunksGone:
                return None
        meta = msg.metadata
        return KeyChange(key, op, data, meta.sequence.stream, meta.timestamp)


class _CacheFeed(KeyFeed):
    """Every change of the namespace for a read cache: a chunked value is not read (its
    ``data`` is None: the cache drops the key, and reads it from the server when asked).

    A deleted namespace (its stream removed, e.g. ``nats stream rm``) takes the consumer with it
    and delivers nothing more, not even once the namespace is made again (measured: a cached
    reader kept the old value for good). The server's stream-deleted advisory marks the feed not
    coherent at once, and the feed then ends with ``ServerUnavailable`` (within 0.5 s): the
    cache empties and opens a new feed once the namespace exists again.
    """

    def __init__(self, kv: NatsMemory, subject: str, pattern: str, exact: bool) -> None:
        super().__init__(kv, subject, pattern, exact)
        self._deleted = False
        self._advisory: Any = None

    async def _subscribe(self, conn: Connection, start_seq: int) -> Any:
        if self._advisory is None:  # before the consumer: a delete after it is created is seen

            async def deleted(_: Msg) -> None:
                self._deleted = True
                self._gen = None  # the next turn of __anext__ resumes, which ends the feed

            subject = f"$JS.EVENT.ADVISORY.STREAM.DELETED.{self._kv.stream}"
            self._advisory = await conn.nc.subscribe(subject, cb=deleted)
        return await super()._subscribe(conn, start_seq)

    async def _resume(self, conn: Connection) -> None:
        if self._deleted:
            raise ServerUnavailable(f"namespace {self._kv.namespace!r} was deleted while the cache followed it")
        await super()._resume(conn)

    def coherent(self) -> object | None:
        return None if self._deleted else super().coherent()

    async def aclose(self) -> None:
        advisory, self._advisory = self._advisory, None
        if advisory is not None:
            with contextlib.suppress(Exception):
                await advisory.unsubscribe()
        await super().aclose()

    async def _convert(self, conn: Connection, msg: Msg) -> KeyChange | None:
        hdr = msg.headers
        op = op_of(hdr)
        data = msg.data if op == "set" and not (hdr and "Botwire-Blob" in hdr) else None
        meta = msg.metadata
        return KeyChange(keys.decode_key(msg.subject[len(self._kv.prefix) :]), op, data, meta.sequence.stream, meta.timestamp)
