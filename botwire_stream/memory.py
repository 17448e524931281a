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
import math
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Final

import msgspec
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy, StreamConfig

from . import codec, keys
from .client import StreamClient
from .errors import BotWireError, Conflict, InvalidArgument, InvalidTTL, ValueTooLarge
from .live import LiveIterator
from .models import Change, Op, Revision
from .settings import resolve
from .transport import SAFE, Connection, origin_headers

MAX_VALUE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_HISTORY: Final = 16
_MISSING: Final = object()
_DELETE_OPS: Final = frozenset({"DEL", "PURGE"})


class _ChunksGone(BotWireError):
    """A chunked value was replaced (and its chunks reclaimed) while it was being read."""


class _Manifest(msgspec.Struct):
    """What a chunked value's key holds: where its chunks are."""

    blob: str
    size: int
    chunks: int
    first_seq: int


_manifest_decoder = msgspec.json.Decoder(_Manifest)
_time_decoder = msgspec.json.Decoder(datetime)


def ttl_seconds(ttl: float | timedelta | None) -> int | None:
    """Whole seconds, rounded up (the server counts whole seconds); None means forever."""
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        seconds = float(ttl)
    else:
        raise InvalidTTL(f"ttl must be seconds (int or float) or a timedelta, not {type(ttl).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidTTL(f"ttl must be a positive number of seconds, not {ttl!r}")
    return math.ceil(seconds)


def parse_time(value: str) -> datetime:
    """An RFC 3339 time from a NATS header (nanoseconds are truncated to microseconds)."""
    return _time_decoder.decode(b'"' + value.encode() + b'"')


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
        history: int = DEFAULT_HISTORY,
        replicas: int = 1,
        timeout: float = 5.0,
    ) -> None:
        self.namespace = keys.check_namespace(namespace)
        if not 1 <= history <= 64:
            raise InvalidArgument(f"history must be between 1 and 64 revisions per key, not {history!r}")
        super().__init__(resolve(url, token=token, user=user, password=password, creds=creds))
        self._history = history
        self._replicas = replicas
        self._timeout = timeout
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
                max_msgs_per_subject=self._history,
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
        for _ in range(5):
            conn, _, msg = await self._last(key)
            if msg is None:
                return None, _MISSING
            try:
                return msg, await self._value(conn, key, msg)
            except _ChunksGone:
                continue  # overwritten while we read its chunks: read the new value
        raise BotWireError(f"the value of {key!r} kept changing while it was read; try again")

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
        """The audit trail of ``key``, oldest first: the last ``history`` writes the server keeps."""
        subject = self._prefix + keys.encode_key(key)
        conn = await self._connection()
        msgs = await conn.read_subject(self.stream, subject, page=self._history)
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
        msgs = await conn.pull_headers(self.stream, self._prefix + subject_filter, last_per_subject=False)
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
        self, key: str, data: bytes, ttl: int | None, expected: int | None, what: str = "set"
    ) -> int:
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
        if size <= conn.max_body:
            # A set repeated writes the same value again; an update repeated applies fn twice.
            advice = SAFE if expected is None else "read the key before repeating the update"
            return await conn.publish(subject, data, headers, self._timeout, what=f"{what} of {key!r}", advice=advice)
        return await self._write_blob(conn, key, subject, data, ttl, headers)

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
            )
        )

    async def _write_blob(
        self, conn: Connection, key: str, subject: str, data: bytes, ttl: int | None, headers: dict[str, str]
    ) -> int:
        await self._ensure_blob_stream(conn)
        blob = conn.new_id()
        base = self._blob_subject(key)
        step = conn.max_body
        chunk_headers = {"Nats-TTL": str(ttl)} if ttl is not None else None
        view = memoryview(data)
        seqs = []
        try:
            for i, start in enumerate(range(0, len(data), step)):
                chunk = bytes(view[start : start + step])
                seqs.append(await conn.publish(f"{base}.{blob}.{i}", chunk, chunk_headers, 30.0))
            manifest = msgspec.json.encode(_Manifest(blob=blob, size=len(data), chunks=len(seqs), first_seq=seqs[0]))
            headers["Botwire-Blob"] = blob
            rev = await conn.publish(subject, manifest, headers, self._timeout)
        except BaseException:
            await asyncio.shield(self._purge_quietly(conn, f"{base}.{blob}.*"))
            raise
        # Reclaim the chunks of the values this one replaced.
        await self._purge_quietly(conn, f"{base}.>", before_seq=seqs[0])
        return rev

    async def _purge_quietly(self, conn: Connection, subject: str, before_seq: int | None = None) -> None:
        try:
            await conn.purge(self._blob_stream, subject, before_seq=before_seq)
        except BotWireError:
            pass  # leftover chunks cost space, never correctness

    async def _read_blob(self, conn: Connection, key: str, manifest: _Manifest) -> Any:
        subject = f"{self._blob_subject(key)}.{manifest.blob}.*"
        msgs = (
            await conn.direct_batch(
                self._blob_stream,
                {"next_by_subj": subject, "seq": manifest.first_seq, "batch": manifest.chunks},
                timeout=60.0,
            )
        ).msgs
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
                await conn.publish(subject, b"", headers, self._timeout, what=f"delete of {key!r}", advice=SAFE)
            except Conflict:
                continue  # written meanwhile: look again
            if "Botwire-Blob" in hdr:
                await self._purge_quietly(conn, f"{self._blob_subject(key)}.>")
            return True
        raise Conflict(f"delete of {key!r} kept racing with other writers; try again")

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
                await self._write(key, codec.encode(new), seconds, expected=expected, what="update")
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
