"""``AsyncMemory``: the one async core of the key-value memory.

Each namespace is a NATS KV bucket (``botwire_<namespace>``, stream ``KV_botwire_<namespace>``)
with direct gets and per-key TTL limit markers. Every write is one JetStream publish on
``$KV.botwire_<namespace>.<encoded key>`` carrying a ``Botwire-Origin`` header, so the stream is
also the namespace's event log. Values larger than one message are written as chunks to a
companion stream first and committed by one small manifest on the key: a reader sees either the
old value or the whole new one.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final, NamedTuple

import msgspec
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy, StreamConfig

from . import codec, keys
from .client import StreamClient, check_options
from .errors import (
    BotWireError,
    ChangedWhileRead,
    Conflict,
    InvalidArgument,
    QuotaExceeded,
    ServerUnavailable,
    ValueTooLarge,
)
from .live import LiveIterator
from .models import Change, Op, Revision
from .nats.connect import origin_headers
from .nats.jetstream import Connection
from .nats.retry import SAFE
from .settings import resolve
from .times import parse_time, ttl_seconds

__all__ = ["AsyncMemory", "Watch", "MAX_VALUE_BYTES", "DEFAULT_HISTORY", "op_of"]

MAX_VALUE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_HISTORY: Final = 16
_MISSING: Final = object()
_DELETE_OPS: Final = frozenset({"DEL", "PURGE"})
_CHUNK_TTL_MARGIN: Final = 60  # seconds the chunks of a value with a TTL outlive its manifest
# A chunked value's chunks share one deadline: the timeout plus one second per this many bytes (as
# extend's); reading its chunks gets the same per request. Loopback moves 64 MiB in well under 4 s.
BYTES_PER_SECOND: Final = 16 * 1024 * 1024
_background: set[asyncio.Task[None]] = set()  # chunk purges left running after a failed write


class _ChunksGone(BotWireError):
    """A chunked value was replaced (and its chunks reclaimed) while it was being read."""


class _Manifest(msgspec.Struct):
    """What a chunked value's key holds: where its chunks are."""

    blob: str
    size: int
    chunks: int
    first_seq: int


class _Outcome(NamedTuple):
    """What a write is, and whether repeating it is safe, for an ``OutcomeUnknown``."""

    what: str
    advice: str


_REREAD: Final = "read the key before repeating the update"
_manifest_decoder = msgspec.json.Decoder(_Manifest)


def op_of(headers: dict[str, str] | None) -> Op:
    """What a stored KV message means: a set, a delete, or an expiry marker."""
    if not headers:
        return "set"
    reason = headers.get("Nats-Marker-Reason")
    if reason is not None:
        return "expire" if reason == "MaxAge" else "delete"
    if headers.get("KV-Operation") in _DELETE_OPS:
        return "delete"
    return "set"


class AsyncMemory(StreamClient):
    """Namespaced key-value memory shared by every process that opens the same namespace.

    ``async with AsyncMemory("chat-app") as memory: await memory.set("k", {"a": 1})``. The
    connection is opened on first use; ``url`` and the credentials resolve as documented in the
    README (argument, then ``BOTWIRE_*`` environment, then the embedded server).
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
        replicas: int = 1,
        timeout: float = 5.0,
    ) -> None:
        self.namespace = keys.check_namespace(namespace)
        if history is not None and (type(history) is not int or not 1 <= history <= 64):
            raise InvalidArgument(f"history must be an int from 1 to 64 revisions per key, not {history!r}")
        self._replicas, self._timeout = check_options(replicas, timeout)
        super().__init__(resolve(url, token=token, user=user, password=password, creds=creds))
        self._history = history
        self.bucket = f"botwire_{namespace}"
        self.stream = f"KV_{self.bucket}"
        self._prefix = f"$KV.{self.bucket}."
        self._blob_stream = f"BOTWIRE_BLOBS_{namespace}"
        self._blob_prefix = f"botwire.{namespace}.blob."

    def _streams(self) -> list[StreamConfig]:
        return [
            StreamConfig(
                name=self.stream,
                subjects=[f"{self._prefix}>"],
                max_msgs_per_subject=self._history or DEFAULT_HISTORY,
                discard=DiscardPolicy.NEW,
                allow_rollup_hdrs=True,
                deny_delete=True,
                allow_direct=True,
                allow_msg_ttl=True,
                subject_delete_marker_ttl=1,
                duplicate_window=120,
                max_consumers=-1,
                max_msgs=-1,
                num_replicas=self._replicas,
                metadata={"botwire.namespace": self.namespace},
            )
        ]

    def __repr__(self) -> str:
        return f"AsyncMemory({self.namespace!r})"

    async def _opened(self, conn: Connection) -> None:
        """Apply an explicit ``history=`` to a namespace that keeps another number of revisions."""
        if self._history is not None:
            await conn.set_max_per_subject(self.stream, self._history, self._timeout)

    # -- reading --------------------------------------------------------------------------------
    async def _last(self, key: str) -> tuple[Connection, str, Msg | None]:
        subject = self._prefix + keys.encode_key(key)
        conn = self._conn or await self._connection()
        return conn, subject, await conn.direct_get_last(self.stream, subject, self._timeout)

    async def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when it is missing, deleted or expired."""
        _, value = await self._current(key)
        return default if value is _MISSING else value

    async def _current(self, key: str) -> tuple[Msg | None, Any]:
        """The last message of ``key`` and its value (``_MISSING`` when none)."""
        gone = None
        for _ in range(5):
            conn, _, msg = await self._last(key)
            if msg is None:
                return None, _MISSING
            try:
                return msg, await self._value(conn, key, msg)
            except _ChunksGone:
                hdr = msg.headers or {}
                if gone == hdr["Nats-Sequence"] and "Nats-TTL" in hdr:
                    return msg, _MISSING  # still the last: its chunks expired first, so it is expiring
                gone = hdr["Nats-Sequence"]
                continue  # overwritten while we read its chunks: read the new value
        raise ChangedWhileRead(f"the value of {key!r} kept changing while it was read; try again")

    async def contains(self, key: str) -> bool:
        """Whether ``key`` holds a value now."""
        _, _, msg = await self._last(key)
        return msg is not None and op_of(msg.headers) == "set"

    async def _value(self, conn: Connection, key: str, msg: Msg) -> Any:
        """Decode a stored message; ``_MISSING`` for delete and expiry markers."""
        hdr = msg.headers
        if hdr:
            if op_of(hdr) != "set":
                return _MISSING
            if "Botwire-Blob" in hdr:
                return await self._read_blob(conn, key, _manifest_decoder.decode(msg.data))
        return codec.decode(msg.data)

    async def revisions(self, key: str) -> list[Revision]:
        """The audit trail of ``key``, oldest first: the last ``history`` writes the server keeps
        (the namespace's setting: 16 unless opened with another ``history=``)."""
        subject = self._prefix + keys.encode_key(key)
        conn = await self._connection()
        msgs = await conn.read_subject(self.stream, subject, page=self._history or 64, timeout=self._timeout)
        out = []
        for m in msgs:
            hdr = m.headers or {}
            op = op_of(hdr)
            value = None
            if op == "set":
                try:
                    value = await self._value(conn, key, m)
                except BotWireError:
                    value = None  # an overwritten chunked value whose chunks are reclaimed
            out.append(
                Revision(
                    revision=int(hdr["Nats-Sequence"]),
                    op=op,
                    value=value,
                    time=parse_time(hdr["Nats-Time-Stamp"]),
                )
            )
        return out

    async def list_keys(self, pattern: str = "*") -> list[str]:
        """The keys matching the glob ``pattern`` (fnmatch; ``*`` spans ``:``), sorted.

        The literal leading ``:``-segments of the pattern narrow the search on the server, so the
        cost follows the candidate keys (their kept revisions, headers only), not the size of the
        namespace.
        """
        subject_filter, exact = keys.pattern_filter(pattern)
        conn = await self._connection()
        if exact:
            msg = await conn.direct_get_last(self.stream, self._prefix + subject_filter, self._timeout)
            return [pattern] if msg is not None and op_of(msg.headers) == "set" else []
        msgs = await conn.pull_headers(
            self.stream, self._prefix + subject_filter, last_per_subject=False, timeout=self._timeout
        )
        live: dict[str, bool] = {}
        for m in msgs:  # stream order: the last revision of each key decides
            live[m.subject] = op_of(m.headers) == "set"
        n = len(self._prefix)
        found = []
        for subject, is_set in live.items():
            if is_set:
                key = keys.decode_key(subject[n:])
                if keys.matches(key, pattern):
                    found.append(key)
        found.sort()
        return found

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
        replaced: Msg | None = None,
        what: str = "set",
    ) -> int:
        """Publish ``data`` as ``key``'s new value; ``expected``: only over that revision, which is
        ``replaced`` (known to ``update``, whose chunks are then reclaimed). ``what`` names the
        write in an ``OutcomeUnknown``."""
        token = keys.encode_key(key)
        size = len(data)
        if size > MAX_VALUE_BYTES:
            raise ValueTooLarge(
                f"value of {key!r} encodes to {size} bytes; the limit is {MAX_VALUE_BYTES} (64 MiB)"
            )
        conn = self._conn or await self._connection()
        headers = origin_headers()
        if ttl is not None:
            # Roll up older revisions: when this one expires, the key must read as missing,
            # not fall back to an older revision.
            headers["Nats-TTL"] = str(ttl)
            headers["Nats-Rollup"] = "sub"
        if expected is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected)
        subject = self._prefix + token
        # A set repeated writes the same value again; an update repeated applies fn twice.
        outcome = _Outcome(f"{what} of {key!r}", SAFE if expected is None else _REREAD)
        if size <= conn.max_body:
            return await conn.publish(subject, data, headers, self._timeout, what=outcome.what, advice=outcome.advice)
        return await self._write_blob(conn, key, subject, data, ttl, headers, expected, replaced, outcome)

    def _blob_subject(self, key: str) -> str:
        # The whole key as one token, so that a purge of this key's chunks touches no other key.
        return self._blob_prefix + base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()

    async def _ensure_blob_stream(self, conn: Connection) -> None:
        await conn.ensure_stream(
            StreamConfig(
                name=self._blob_stream,
                subjects=[f"{self._blob_prefix}>"],
                allow_direct=True,
                allow_msg_ttl=True,
                num_replicas=self._replicas,
                max_msgs=-1,
                metadata={"botwire.namespace": self.namespace},
            ),
            self._timeout,
        )

    async def _write_blob(
        self,
        conn: Connection,
        key: str,
        subject: str,
        data: bytes,
        ttl: int | None,
        headers: dict[str, str],
        expected: int | None,
        replaced: Msg | None,
        outcome: _Outcome,
    ) -> int:
        """Write the chunks, then commit them with one manifest on the key.

        The manifest is published over a known revision (``update``'s, else the last one read just
        before), so the value it replaces is known exactly even when a TTL rollup removes it, and
        only that value's chunks are reclaimed: never the chunks of a write still in progress.
        """
        await self._ensure_blob_stream(conn)
        blob = conn.new_id()
        base = self._blob_subject(key)
        step = conn.max_body
        # The chunks are written before the manifest, so with the same TTL they would expire
        # first, as long before as the write took (measured: a 16 MiB value in 4 KiB messages read
        # as "kept changing" until its manifest expired); they outlive it by a margin instead.
        chunk_headers = {"Nats-TTL": str(ttl + _CHUNK_TTL_MARGIN)} if ttl is not None else None
        view = memoryview(data)
        seqs = []
        committing = False
        loop = asyncio.get_running_loop()
        budget = self._timeout + len(data) / BYTES_PER_SECOND
        deadline = loop.time() + budget
        try:
            try:
                for i, start in enumerate(range(0, len(data), step)):
                    chunk = bytes(view[start : start + step])
                    remaining = max(deadline - loop.time(), 0.001)
                    seqs.append(await conn.publish(f"{base}.{blob}.{i}", chunk, chunk_headers, remaining))
            except ServerUnavailable as exc:  # OutcomeUnknown too: without its manifest, no chunk counts
                raise ServerUnavailable(
                    f"the server did not store the {outcome.what} ({len(data)} bytes in chunks) within {budget:.3g} s "
                    f"(its timeout plus 1 s per 16 MiB); nothing was stored: {SAFE}"
                ) from exc
            manifest = msgspec.json.encode(_Manifest(blob=blob, size=len(data), chunks=len(seqs), first_seq=seqs[0]))
            headers["Botwire-Blob"] = blob
            committing = True
            try:
                if expected is not None:
                    rev = await conn.publish(subject, manifest, headers, self._timeout, what=outcome.what, advice=outcome.advice)
                else:
                    rev, replaced = await self._commit_over_last(conn, key, subject, manifest, headers, outcome)
            except Conflict:
                # On the embedded server a publish that timed out is sent again, and the second
                # copy conflicts with the first when that one was stored (measured: SIGSTOP of the
                # server for 1.5 s with timeout=1): then the value is committed, look before purging.
                last = await conn.direct_get_last(self.stream, subject, self._timeout)
                if last is None or not last.headers or last.headers.get("Botwire-Blob") != blob:
                    raise
                rev = int(last.headers["Nats-Sequence"])
        except BaseException as exc:
            # A manifest publish that timed out, lost its connection or was cancelled may still be
            # stored (measured: a server stalled past the timeout stores it when it resumes), and
            # purging its chunks would leave the key unreadable for good. Only a refusal by the
            # server proves it is not stored; otherwise the chunks stay (they cost space only).
            if not committing or (isinstance(exc, BotWireError) and not isinstance(exc, ServerUnavailable)):
                purge = asyncio.ensure_future(self._purge_quietly(conn, f"{base}.{blob}.*"))
                if isinstance(exc, ServerUnavailable):
                    # A server that did not answer would cost the caller one more timeout: purge
                    # in the background, so the call fails within its own deadline.
                    _background.add(purge)
                    purge.add_done_callback(_background.discard)
                else:
                    await asyncio.shield(purge)
            raise
        await self._reclaim(conn, key, replaced, before=rev, keep=blob)
        return rev

    async def _commit_over_last(
        self, conn: Connection, key: str, subject: str, manifest: bytes, headers: dict[str, str], outcome: _Outcome
    ) -> tuple[int, Msg | None]:
        """Publish ``manifest`` over the key's last message; its revision and the message it replaced.

        A set is unconditional for the user: on a race with another writer only this small publish
        is retried, over the new last message.
        """
        for _ in range(100):
            last = await conn.direct_get_last(self.stream, subject, self._timeout)
            headers["Nats-Expected-Last-Subject-Sequence"] = (last.headers or {})["Nats-Sequence"] if last else "0"
            try:
                return await conn.publish(subject, manifest, headers, self._timeout, what=outcome.what, advice=outcome.advice), last
            except Conflict:
                continue  # another write landed between the read and the publish: commit over it
        raise Conflict(f"set of {key!r} kept racing with other writers; try again")

    async def _reclaim(self, conn: Connection, key: str, replaced: Msg | None, *, before: int, keep: str) -> None:
        """Purge the chunks of the chunked values that the write or delete at ``before`` replaced.

        That is ``replaced`` and any older kept revision that references chunks (e.g. a big value
        overwritten by a small one, which does not look). Chunks no kept revision references may
        belong to a write still in progress and are left alone.
        """
        blobs = set()
        if replaced is not None and replaced.headers and op_of(replaced.headers) == "set":
            blob = replaced.headers.get("Botwire-Blob")
            if blob:
                blobs.add(blob)
        base = self._blob_subject(key)
        try:
            counts = await conn.subject_counts(self._blob_stream, f"{base}.>", self._timeout)
            present = {s.rsplit(".", 2)[1] for s in counts}
            present.discard(keep)
            if present - blobs:  # chunks of other values: those of replaced revisions go too
                kept = await conn.pull_headers(
                    self.stream, self._prefix + keys.encode_key(key), last_per_subject=False, timeout=self._timeout
                )
                for m in kept:
                    blob = (m.headers or {}).get("Botwire-Blob")
                    if blob and m.metadata.sequence.stream < before:
                        blobs.add(blob)
            blobs &= present
        except BotWireError:
            pass  # no blob stream yet, or the server went away: leftover chunks cost space only
        for blob in blobs:
            await self._purge_quietly(conn, f"{base}.{blob}.*")

    async def _purge_quietly(self, conn: Connection, subject: str) -> None:
        try:
            await conn.purge(self._blob_stream, subject, timeout=self._timeout)
        except BotWireError:
            pass  # leftover chunks cost space, never correctness

    async def _read_blob(self, conn: Connection, key: str, manifest: _Manifest) -> Any:
        """The value from its chunks, by batch direct gets paged until all are read.

        nats-server ends one batch reply once it has sent 64 MiB (measured: 9 of 12 messages of
        8 MiB, 3 left pending). A 64 MiB value just fits, but the read goes on from the last chunk
        received until every chunk is in, so that message overhead or a server with a lower limit
        cannot cut it short.
        """
        subject = f"{self._blob_subject(key)}.{manifest.blob}.*"
        msgs: list[Msg] = []
        seq = manifest.first_seq
        while len(msgs) < manifest.chunks:
            batch = await conn.direct_batch(
                self._blob_stream,
                {"next_by_subj": subject, "seq": seq, "batch": manifest.chunks - len(msgs)},
                timeout=self._timeout + manifest.size / BYTES_PER_SECOND,
            )
            if not batch.msgs:
                break
            msgs.extend(batch.msgs)
            seq = batch.last_seq + 1
        if len(msgs) != manifest.chunks:
            raise _ChunksGone(f"the chunks of {key!r} are incomplete ({len(msgs)}/{manifest.chunks})")
        return codec.decode(b"".join(m.data for m in msgs))

    async def delete(self, key: str) -> bool:
        """Delete ``key``; True when it held a value. The delete is kept in its revisions."""
        for _ in range(100):
            conn, subject, msg = await self._last(key)
            if msg is None or op_of(msg.headers) != "set":
                return False
            hdr = msg.headers or {}
            headers = origin_headers()
            headers["KV-Operation"] = "DEL"
            headers["Nats-Expected-Last-Subject-Sequence"] = hdr["Nats-Sequence"]
            try:
                rev = await conn.publish(subject, b"", headers, self._timeout, what=f"delete of {key!r}", advice=SAFE)
            except Conflict:
                continue  # written meanwhile: look again
            except QuotaExceeded:
                # At the storage limit: free the chunks first, then the revisions themselves.
                seq = int(hdr["Nats-Sequence"])
                await self._reclaim(conn, key, msg, before=seq + 1, keep="")
                await self._delete_at_limit(conn, subject, seq, headers)
                return True
            await self._reclaim(conn, key, msg, before=rev, keep="")
            return True
        raise Conflict(f"delete of {key!r} kept racing with other writers; try again")

    async def _delete_at_limit(self, conn: Connection, subject: str, seq: int, marker: dict[str, str]) -> None:
        """Delete at the storage limit, where the delete marker (a new message) is refused.

        Purges the key's revisions up to ``seq`` (the one read), which frees their space and keeps
        any newer write; then records the delete when it fits and nobody wrote meanwhile.
        """
        await conn.purge(self.stream, subject, before_seq=seq + 1, timeout=self._timeout)
        marker["Nats-Expected-Last-Subject-Sequence"] = "0"  # the key has no message left
        try:
            await conn.publish(subject, b"", marker, self._timeout)
        except (Conflict, QuotaExceeded):
            pass  # a newer value was written, or no room even now: the key is deleted all the same

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
        for _ in range(max_attempts):
            msg, value = await self._current(key)
            expected = 0 if msg is None else int((msg.headers or {})["Nats-Sequence"])
            new = fn(default if value is _MISSING else value)
            try:
                await self._write(key, codec.encode(new), seconds, expected=expected, replaced=msg, what="update")
            except Conflict:
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 0.05)
                continue
            return new
        raise Conflict(f"update of {key!r} lost {max_attempts} races in a row; try again later")

    # -- live changes ---------------------------------------------------------------------------
    def watch(self, pattern: str = "*") -> Watch:
        """Live changes of keys matching ``pattern``, made by any process, from now on.

        Use ``async for change in memory.watch("user:*")``, or ``async with memory.watch() as w``
        to be sure the subscription is live before writing.
        """
        subject_filter, exact = keys.pattern_filter(pattern)
        return Watch(self, self._prefix + subject_filter, pattern, exact)

    async def _change(self, conn: Connection, msg: Msg) -> Change | None:
        """The change ``msg`` records; None for a chunked value already replaced (a later change
        with the newer value follows)."""
        key = keys.decode_key(msg.subject[len(self._prefix) :])
        op = op_of(msg.headers)
        value = None
        if op == "set":
            try:
                value = await self._value(conn, key, msg)
            except _ChunksGone:
                return None
        meta = msg.metadata
        return Change(key=key, op=op, value=value, revision=meta.sequence.stream, time=meta.timestamp)


class Watch(LiveIterator[Change]):
    """An async iterator of ``Change`` (see ``AsyncMemory.watch``); close it when done."""

    def __init__(self, memory: AsyncMemory, subject: str, pattern: str, exact: bool) -> None:
        super().__init__(memory._connection, memory.stream, memory._timeout)
        self._memory = memory
        self._subject = subject
        self._pattern = pattern
        self._exact = exact

    async def _subscribe(self, conn: Connection, start_seq: int) -> Any:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
        return await conn.js.subscribe(self._subject, ordered_consumer=True, config=config)

    async def _convert(self, conn: Connection, msg: Msg) -> Change | None:
        change = await self._memory._change(conn, msg)
        if change is None or not (self._exact or keys.matches(change.key, self._pattern)):
            return None
        return change
