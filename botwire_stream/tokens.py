"""Resumable token streams: append-only, offset-addressed byte or JSON streams that any process
can read from any offset, catch up, then follow live until the writer closes them (the storage
model of the Durable Streams protocol, which ``botwire serve`` speaks over HTTP).

``AsyncTokenStream("answers/42")`` is one stream; ``TokenStreams`` serves any number of them
over one connection (the HTTP server uses it). Both validate and encode here and store through a
``TokenBackend`` (``botwire_stream.nats.tokens``: JetStream; read its docstring for the layout).

- **Offsets** are opaque strings ``<16 digits>_<16 digits>`` that sort and strictly increase:
  the first part is the JetStream sequence of the last chunk read. ``-1`` is the start, ``now``
  the tail. A fork shares its source's offsets up to the fork point.
- **Writes** are compare-and-set on the stream's state, so closing, producer checks and
  ``stream_seq`` checks hold across processes; idempotent producers (id, epoch, seq) commit their
  state with the chunk atomically, so a retried append is stored once.
- **TTL** (seconds, sliding: every read and write renews it) or **expires_at** (fixed). An
  expired stream is gone: reads say not found, and the path can be created again.
- **JSON streams** (``application/json``) keep message boundaries: an append of a JSON array
  stores its items (one level), and a read returns a JSON array of the messages.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Self

import msgspec

from ._backend import CommitResult, Snapshot, TokenBackend, TokenState, open_tokens
from .client import StreamClient, check_options
from .errors import (
    Conflict,
    ContentTypeMismatch,
    InvalidArgument,
    InvalidOffset,
    ProducerFenced,
    ProducerSeqGap,
    StreamClosed,
    StreamDeleted,
    StreamNotFound,
    ValueTooLarge,
)
from .settings import resolve

__all__ = [
    "AppendResult",
    "AsyncTokenStream",
    "TokenRead",
    "TokenStreamInfo",
    "TokenStreams",
    "format_offset",
    "media_type",
]

START = "-1"
NOW = "now"
MAX_PATH_BYTES = 1024
_OFFSET = re.compile(r"([0-9]{1,16})_([0-9]{1,16})")  # ASCII only: \d also takes other scripts' digits
_JSON = "application/json"
_MAX_TRIES = 100  # compare-and-set rounds before giving up (each one lost to another writer)
_CACHE_SIZE = 10_000  # snapshots of streams without TTL kept for one-publish appends
READ_BYTES = 4 << 20  # a read returns about this much at most; page on with next_offset


def format_offset(seq: int) -> str:
    """The offset after the chunk stored at JetStream sequence ``seq`` (0: the start)."""
    return f"{seq:016d}_{0:016d}"


def parse_offset(offset: str) -> int:
    """The sequence an offset stands for (``-1``: 0); ``InvalidOffset`` for anything else."""
    if offset == START:
        return 0
    m = _OFFSET.fullmatch(offset) if isinstance(offset, str) else None
    if m is None:
        raise InvalidOffset(f"offset must be -1, now, or an offset this stream returned, not {offset!r}")
    return int(m.group(1))


def media_type(content_type: str) -> str:
    """``Text/Plain; charset=utf-8`` -> ``text/plain`` (what appends are matched on)."""
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str) -> bool:
    return media_type(content_type) == _JSON


class TokenRead(msgspec.Struct, frozen=True):
    """One read: the bytes (a JSON array for JSON streams), the offset to continue from, whether
    it reached the tail, and whether the stream is closed and this read reached its end."""

    data: bytes
    next_offset: str
    up_to_date: bool
    closed: bool
    chunks: int = 0
    content_type: str = ""
    created: float = 0.0  # the stream's creation time: which stream at this path was read


class AppendResult(msgspec.Struct, frozen=True):
    """An append's outcome: the offset after it, whether the stream is now closed, whether it was
    a producer's retry (stored before, not again), and the producer's accepted epoch/seq."""

    next_offset: str
    closed: bool = False
    duplicate: bool = False
    producer_epoch: int | None = None
    producer_seq: int | None = None


class TokenStreamInfo(msgspec.Struct, frozen=True):
    """A stream's configuration and tail."""

    path: str
    content_type: str
    next_offset: str
    closed: bool
    ttl: int | None
    expires_at: str | None


def check_path(path: object) -> str:
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"a token stream path must be a non-empty str, not {path!r}")
    try:
        size = len(path.encode())
    except UnicodeEncodeError:
        raise InvalidArgument("a token stream path must be valid UTF-8") from None
    if size > MAX_PATH_BYTES or any(ord(c) < 32 for c in path):
        raise InvalidArgument(f"a token stream path must be at most {MAX_PATH_BYTES} bytes, without control characters")
    return path


def _expiry(expires_at: datetime | str | None) -> tuple[str | None, float | None]:
    if expires_at is None:
        return None, None
    if isinstance(expires_at, datetime):
        if expires_at.tzinfo is None:
            raise InvalidArgument("expires_at needs a time zone")
        return expires_at.isoformat(), expires_at.timestamp()
    if isinstance(expires_at, str):
        try:
            when = datetime.fromisoformat(expires_at.replace("z", "Z").replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f"expires_at must be an RFC 3339 time, not {expires_at!r}") from None
        if when.tzinfo is None or "T" not in expires_at.upper():
            raise InvalidArgument(f"expires_at must be an RFC 3339 time with a zone, not {expires_at!r}")
        return expires_at, when.timestamp()
    raise InvalidArgument(f"expires_at must be a datetime or an RFC 3339 string, not {expires_at!r}")


def _check_ttl(ttl: object) -> int | None:
    if ttl is None:
        return None
    if type(ttl) is not int or ttl < 1:
        # 0 was taken, then the stream was gone at once: a PUT wrote it, purged it, answered 404
        raise InvalidArgument(f"ttl must be a whole number of seconds (1 or more), not {ttl!r}")
    return ttl


def encode_json_chunk(body: bytes, *, allow_empty: bool) -> bytes | None:
    """A JSON append as stored: its messages (a top-level array is flattened one level), each
    one per line as the writer sent it. Kept as raw text (``msgspec.Raw``), not decoded and
    encoded again: that turned 1.0000000000000000000001 into 1.0, -0 into 0, and dropped all
    but the last of duplicate keys. A raw newline can only be whitespace between tokens (never
    inside a JSON string), so it becomes a space. None: an empty array."""
    try:
        whole = msgspec.json.decode(body, type=msgspec.Raw)
        raw = [whole] if bytes(whole)[:1] != b"[" else msgspec.json.decode(body, type=list[msgspec.Raw])
    except (msgspec.DecodeError, RecursionError):  # nesting deeper than ~1000 levels: RecursionError
        raise InvalidArgument("the body is not valid JSON (or nested too deeply)") from None
    if not raw:
        if allow_empty:
            return None
        raise InvalidArgument("an append of an empty JSON array stores nothing; send at least one message")
    return b"\n".join(bytes(x).replace(b"\n", b" ") for x in raw)


def _json_body(chunks: list[bytes]) -> bytes:
    return b"[" + b",".join(c.replace(b"\n", b",") for c in chunks) + b"]"


def _base_end(state: TokenState) -> int:
    return state.base[-1][2] if state.base else 0


def _tail(snap: Snapshot) -> int:
    return snap.last or _base_end(snap.state)


def _same_stream(path: str, old: Snapshot, new: Snapshot) -> None:
    """``StreamNotFound`` when ``new`` is another stream at the path (deleted and created again
    while a live read waited): its chunks must not reach that reader as the old stream's."""
    if new.state.created != old.state.created:
        raise StreamNotFound(f"the token stream at {path!r} was deleted (and created again)")


def _expired(snap: Snapshot, now: float) -> bool:
    st = snap.state
    if st.expires is not None and now >= st.expires:
        return True
    return st.ttl is not None and now >= snap.activity + st.ttl


class TokenStreams:
    """Every token stream, over one backend: what ``AsyncTokenStream`` and the HTTP server use.

    Methods take the stream's path; errors are ``botwire_stream.errors`` classes
    (``StreamNotFound``, ``StreamDeleted``, ``StreamClosed``, ``ContentTypeMismatch``,
    ``ProducerFenced``, ``ProducerSeqGap``, ``Conflict``, ``InvalidArgument``, ``ValueTooLarge``).
    """

    def __init__(self, backend: TokenBackend) -> None:
        self._b = backend
        # key -> the last snapshot this process saw of a stream without TTL: a plain append
        # goes straight to a compare-and-set publish on its version (a conflict reloads it)
        self._cache: dict[str, Snapshot] = {}

    # -- loading --------------------------------------------------------------------------------
    async def _load(self, path: str, *, renew: bool = False, fresh: bool = True) -> Snapshot:
        key = self._b.key(check_path(path))
        snap = None if fresh else self._cache.get(key)
        if snap is None:
            snap = await self._checked(path, key, await self._b.load(key), renew)
        if snap.state.deleted:
            raise StreamDeleted(f"the token stream at {path!r} was deleted (its forks still read it)")
        return snap

    async def _checked(self, path: str, key: str, snap: Snapshot | None, renew: bool) -> Snapshot:
        """A freshly loaded snapshot, unless missing or expired (``StreamNotFound``); cached
        when the stream has no TTL, its TTL renewed when ``renew``."""
        if snap is None:
            self._cache.pop(key, None)
            raise StreamNotFound(f"no token stream at {path!r}")
        if _expired(snap, time.time()):
            self._cache.pop(key, None)
            if not snap.state.deleted:  # marked already: whoever marked it purges (and releases sources once)
                await self._drop(snap)
            raise StreamNotFound(f"no token stream at {path!r} (it expired)")
        if snap.state.ttl is None and snap.state.expires is None:
            if len(self._cache) >= _CACHE_SIZE:  # a long-running server: forget the oldest
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = snap
        elif renew and snap.state.ttl is not None:
            await self._b.touch(key)
        return snap

    async def _drop(self, snap: Snapshot) -> None:
        """Remove an expired or deleted stream: marked deleted while forks read it, else purged
        (releasing its own sources, which may then go too)."""
        st = snap.state
        if not st.deleted:
            # marked first, compare-and-set, even with no fork: a fork taking hold of it
            # meanwhile fails this (and retries, finding it deleted); purging on the snapshot
            # alone lost the chunks of a fork created in between (56 of 300 raced tries)
            try:
                await self._b.commit(snap.key, snap.version, None, msgspec.structs.replace(st, deleted=True))
            except Conflict:
                return  # changed meanwhile: the next access decides again
        if st.refs > 0:
            return
        await self._b.purge(snap.key)
        self._cache.pop(snap.key, None)
        for source in st.sources:
            await self._release(source)

    async def _release(self, key: str) -> None:
        for _ in range(_MAX_TRIES):
            snap = await self._b.load(key)
            if snap is None:
                return
            st = msgspec.structs.replace(snap.state, refs=max(0, snap.state.refs - 1))
            if st.refs == 0 and st.deleted:
                await self._drop(msgspec.structs.replace(snap, state=st))
                return
            try:
                await self._b.commit(key, snap.version, None, st)
                return
            except Conflict:
                continue

    async def _hold(self, key: str) -> None:
        """Count one more fork reading ``key``'s chunks."""
        for _ in range(_MAX_TRIES):
            snap = await self._b.load(key)
            if snap is None or snap.state.deleted:
                raise Conflict("the fork's source was deleted")
            try:
                await self._b.commit(key, snap.version, None, msgspec.structs.replace(snap.state, refs=snap.state.refs + 1))
                self._cache.pop(key, None)
                return
            except Conflict:
                continue
        raise Conflict("the fork's source changed on every try")

    # -- create ---------------------------------------------------------------------------------
    async def create(
        self,
        path: str,
        *,
        content_type: str | None = None,
        ttl: int | None = None,
        expires_at: datetime | str | None = None,
        data: bytes = b"",
        closed: bool = False,
        fork_from: str | None = None,
        fork_offset: str | None = None,
        fork_sub_offset: int = 0,
    ) -> tuple[bool, TokenStreamInfo]:
        """Create the stream (True) or find it with the same configuration (False); ``Conflict``
        when it exists with another one. ``fork_from``: a fork of that stream up to
        ``fork_offset`` (default: its tail) plus ``fork_sub_offset`` bytes (JSON: messages) of
        the next chunk."""
        check_path(path)
        ttl = _check_ttl(ttl)
        if ttl is not None and expires_at is not None:
            raise InvalidArgument("give ttl or expires_at, not both")
        expires_text, expires = _expiry(expires_at)
        if expires is not None and expires <= time.time():
            # stored, it was gone at once: the PUT answered 404 after writing and purging
            raise InvalidArgument(f"expires_at {expires_text} is in the past")
        if type(fork_sub_offset) is not int or fork_sub_offset < 0:
            raise InvalidArgument(f"fork_sub_offset must be an int >= 0, not {fork_sub_offset!r}")
        if fork_from is None and (fork_offset is not None or fork_sub_offset):
            raise InvalidArgument("a fork offset needs fork_from")
        if fork_sub_offset and fork_offset is None:
            raise InvalidArgument("a fork sub-offset needs a fork offset")
        if fork_offset is not None:
            parse_offset(fork_offset)
        key = self._b.key(path)
        source: Snapshot | None = None
        if fork_from is not None:
            try:
                source = await self._load(fork_from)
            except StreamDeleted:
                raise Conflict(f"cannot fork {fork_from!r}: it was deleted") from None
            if content_type is None:
                content_type = source.state.content_type
            elif media_type(content_type) != media_type(source.state.content_type):
                raise ContentTypeMismatch(f"a fork's content type must be its source's ({source.state.content_type})")
            if ttl is None and expires is None:
                ttl, expires_text, expires = source.state.ttl, source.state.expires_at, source.state.expires
        content_type = content_type or "application/octet-stream"
        chunk: bytes | None = None
        if data:
            chunk = encode_json_chunk(data, allow_empty=True) if is_json(content_type) else data
        fork_req = None
        if source is not None:
            fork_req = (fork_from or "", parse_offset(fork_offset) if fork_offset is not None else -1, fork_sub_offset)

        def same(existing: TokenState) -> bool:
            return (
                media_type(existing.content_type) == media_type(content_type or "")
                and existing.ttl == ttl
                and existing.expires_at == expires_text
                and existing.closed == closed
                and (fork_req is None or existing.fork == fork_req)
            )

        try:
            snap = await self._load(path)
        except StreamNotFound:
            snap = None
        except StreamDeleted:
            raise Conflict(f"the token stream at {path!r} was deleted while forks read it; use another path") from None
        if snap is not None:
            if same(snap.state):
                return False, self._info(snap)
            raise Conflict(f"a token stream exists at {path!r} with another configuration")

        state = TokenState(
            path=path, content_type=content_type, created=time.time(), ttl=ttl,
            expires_at=expires_text, expires=expires, closed=closed, fork=fork_req,
        )
        if source is not None:
            src = source.state
            tail = _tail(source)
            at = parse_offset(fork_offset) if fork_offset is not None else tail
            if at > tail:
                raise InvalidArgument("the fork offset is beyond the source's tail")
            base = [(k, a, min(u, at)) for k, a, u in src.base if a < at]
            end = _base_end(src)
            if at > end:
                base.append((source.key, end, at))
            if fork_sub_offset:
                nxt = await self._b.read(self._segments(source, at), 1)
                if not nxt:
                    raise InvalidArgument("the fork sub-offset points past the source's tail")
                body = nxt[0][1]
                if is_json(content_type):
                    items = body.split(b"\n")
                    if fork_sub_offset > len(items):
                        raise InvalidArgument("the fork sub-offset is beyond the messages of that append")
                    part = b"\n".join(items[:fork_sub_offset])
                else:
                    if fork_sub_offset > len(body):
                        raise InvalidArgument("the fork sub-offset is beyond the bytes of that append")
                    part = body[:fork_sub_offset]
                chunk = part + (b"\n" + chunk if chunk and is_json(content_type) else chunk or b"")
            # the direct source too, even when the fork shares none of its own chunks (forked
            # at its base): deleting it must leave it soft-deleted while this fork lives
            sources = sorted({k for k, _, _ in base} | {source.key})
            state = msgspec.structs.replace(state, base=base, sources=sources)
            for k in sources:
                await self._hold(k)
        try:
            await self._b.commit(key, 0, chunk, state)
        except Conflict:
            for k in state.sources:
                await self._release(k)
            # created by another writer meanwhile: the same configuration is fine
            snap = await self._load(path)
            if same(snap.state):
                return False, self._info(snap)
            raise
        return True, self._info(await self._load(path))

    # -- append ---------------------------------------------------------------------------------
    async def append(
        self,
        path: str,
        data: bytes,
        *,
        content_type: str | None = None,
        close: bool = False,
        producer: tuple[str, int, int] | None = None,
        stream_seq: str | None = None,
    ) -> AppendResult:
        """Append ``data`` (and/or close the stream); see the class docstring for the errors."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"data must be bytes, not {type(data).__name__}")
        data = bytes(data)
        if not data and not close:
            raise InvalidArgument("an append needs a non-empty body (or close=True)")
        if producer is not None:
            pid, epoch, pseq = producer
            if not isinstance(pid, str) or not pid or type(epoch) is not int or type(pseq) is not int or epoch < 0 or pseq < 0:
                raise InvalidArgument("producer must be (non-empty id, epoch >= 0, seq >= 0)")
        fresh = False
        for _ in range(_MAX_TRIES):
            snap = await self._load(path, renew=True, fresh=fresh or not data)
            fresh = True
            try:
                return await self._append_once(snap, data, content_type, close, producer, stream_seq)
            except Conflict as exc:
                if type(exc) is not Conflict or not getattr(exc, "_cas", False):
                    raise
                self._cache.pop(snap.key, None)
        raise Conflict(f"the token stream at {path!r} changed on every try; try again")

    async def _append_once(
        self,
        snap: Snapshot,
        data: bytes,
        content_type: str | None,
        close: bool,
        producer: tuple[str, int, int] | None,
        stream_seq: str | None,
    ) -> AppendResult:
        st = snap.state
        tail = format_offset(_tail(snap))
        new: TokenState | None = None
        epoch = pseq = None
        if producer is not None:
            pid, epoch, pseq = producer
            current = st.producers.get(pid)
            if current is not None and epoch < current[0]:
                raise ProducerFenced(f"producer {pid!r} epoch {epoch} is stale (now {current[0]})", epoch=current[0])
        if st.closed:
            if producer is not None and st.closed_by == tuple(producer):
                last = st.producers.get(producer[0], (epoch, pseq))
                return AppendResult(tail, True, True, last[0], last[1])
            if not data and producer is None:
                return AppendResult(tail, True)  # closing again: idempotent
            raise StreamClosed("the token stream is closed", next_offset=tail)
        if data and content_type is not None and media_type(content_type) != media_type(st.content_type):
            raise ContentTypeMismatch(f"the stream's content type is {st.content_type}, not {content_type}")
        if producer is not None:
            pid, epoch, pseq = producer
            current = st.producers.get(pid)
            if current is not None and epoch == current[0]:
                if pseq <= current[1]:
                    return AppendResult(tail, False, True, epoch, current[1])
                if pseq > current[1] + 1:
                    raise ProducerSeqGap(f"producer seq {pseq}, expected {current[1] + 1}", current[1] + 1, pseq)
            elif pseq != 0:
                if current is None:
                    raise ProducerSeqGap(f"a new producer starts at seq 0, not {pseq}", 0, pseq)
                raise InvalidArgument(f"a new producer epoch starts at seq 0, not {pseq}")
            new = msgspec.structs.replace(st, producers={**st.producers, pid: (epoch, pseq)})
        if stream_seq is not None:
            if st.stream_seq is not None and stream_seq.encode() <= st.stream_seq.encode():
                raise Conflict(f"Stream-Seq {stream_seq!r} is not above the last one ({st.stream_seq!r})")
            new = msgspec.structs.replace(new or st, stream_seq=stream_seq)
        if close:
            new = msgspec.structs.replace(new or st, closed=True, closed_by=tuple(producer) if producer else None)
        chunk: bytes | None = None
        if data:
            chunk = encode_json_chunk(data, allow_empty=False) if is_json(st.content_type) else data
            assert chunk is not None
            if len(chunk) > self._b.max_chunk:
                raise ValueTooLarge(f"an append holds at most {self._b.max_chunk} bytes, not {len(chunk)}")
        try:
            done: CommitResult = await self._b.commit(snap.key, snap.version, chunk, new)
        except Conflict as exc:
            exc._cas = True  # type: ignore[attr-defined]
            raise
        if snap.key in self._cache:
            self._cache[snap.key] = msgspec.structs.replace(
                snap, state=new or st, version=done.version, last=done.seq or snap.last
            )
        offset = format_offset(done.seq) if done.seq else tail
        return AppendResult(offset, close, False, epoch, pseq)

    # -- read -----------------------------------------------------------------------------------
    def _segments(self, snap: Snapshot, after: int) -> list[tuple[str, int, int]]:
        """What to read after ``after``: the shared segments of a fork, then the stream's own
        chunks up to at least its tail in ``snap`` (0: it has none yet, read what there is)."""
        segs = [(k, max(a, after), u) for k, a, u in snap.state.base if u > after]
        segs.append((snap.key, max(after, _base_end(snap.state)), snap.last))
        return segs

    async def read(self, path: str, offset: str = START, *, max_bytes: int = READ_BYTES) -> TokenRead:
        """The chunks after ``offset`` (``-1``: all, ``now``: none), up to about ``max_bytes``."""
        snap = await self._load(path, renew=True)
        return await self._read(snap, offset, max_bytes)

    async def _read(self, snap: Snapshot, offset: str, max_bytes: int) -> TokenRead:
        after = _tail(snap) if offset == NOW else parse_offset(offset)
        chunks = await self._b.read(self._segments(snap, after), max_bytes) if after < _tail(snap) else []
        return self._result(snap, after, chunks)

    @staticmethod
    def _result(snap: Snapshot, after: int, chunks: list[tuple[int, bytes]]) -> TokenRead:
        tail = _tail(snap)
        json = is_json(snap.state.content_type)
        bodies = [c for _, c in chunks]
        data = _json_body(bodies) if json else b"".join(bodies)
        end = chunks[-1][0] if chunks else after  # none read below the tail: not up to date, read again
        up_to_date = end >= tail
        closed = snap.state.closed and up_to_date
        return TokenRead(
            data, format_offset(end), up_to_date, closed, len(chunks), snap.state.content_type, snap.state.created
        )

    async def _read_live(self, path: str, snap: Snapshot, offset: str) -> tuple[Snapshot, TokenRead]:
        """A fresh snapshot and the chunks after ``offset``. For a stream that is not a fork,
        both requests go out together (live delivery waits for one round trip, not two); a read
        that runs ahead of its snapshot is fine (chunks are immutable), one behind it says not
        up to date, and the next read continues."""
        if snap.state.base:
            fresh = await self._load(path)
            _same_stream(path, snap, fresh)
            return fresh, await self._read(fresh, offset, READ_BYTES)
        after = parse_offset(offset)
        loaded, chunks = await asyncio.gather(
            self._b.load(snap.key), self._b.read([(snap.key, after, 0)], READ_BYTES)
        )
        fresh = await self._checked(path, snap.key, loaded, False)
        if fresh.state.deleted:
            raise StreamDeleted(f"the token stream at {path!r} was deleted (its forks still read it)")
        _same_stream(path, snap, fresh)
        if fresh.state.base:  # deleted and created again as a fork meanwhile
            return fresh, await self._read(fresh, offset, READ_BYTES)
        return fresh, self._result(fresh, after, chunks)

    async def wait(
        self, path: str, offset: str, timeout: float, *, stop: asyncio.Event | None = None, created: float | None = None
    ) -> TokenRead:
        """A long-poll: the chunks after ``offset`` as soon as there are any (or the stream is
        closed), else an empty read at ``timeout`` (or when ``stop`` is set). ``created``: the
        ``TokenRead.created`` of the read that gave ``offset``; ``StreamNotFound`` when the path
        now holds another stream (deleted and created again between two reads)."""
        snap = await self._load(path, renew=True)
        if created is not None and snap.state.created != created:
            raise StreamNotFound(f"the token stream at {path!r} was deleted (and created again)")
        if offset == NOW:
            offset = format_offset(_tail(snap))
        event = asyncio.Event()
        await self._b.watch(snap.key, event)
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            behind = 0
            while True:
                snap, got = await self._read_live(path, snap, offset)  # after subscribing: none slips by
                if got.chunks or got.closed:
                    return got
                behind = behind + 1 if not got.up_to_date else 0
                if 0 < behind <= 3:
                    continue  # the read ran behind its snapshot: read again, no need to wait
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0 or (stop is not None and stop.is_set()):
                    return got
                waiters = [asyncio.ensure_future(event.wait())]
                if stop is not None:
                    waiters.append(asyncio.ensure_future(stop.wait()))
                try:
                    await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
                event.clear()
        finally:
            await self._b.unwatch(snap.key, event)

    async def follow(
        self, path: str, offset: str = START, *, idle: float = 30.0, stop: asyncio.Event | None = None
    ) -> AsyncIterator[TokenRead]:
        """Catch-up reads, then each new batch live, until the stream is closed (its last read
        says ``closed``), ``stop`` is set, or nothing came for ``idle`` seconds (an up-to-date
        empty read is yielded then, as a keep-alive)."""
        got = await self.read(path, offset)
        yield got
        while not got.closed and not (stop is not None and stop.is_set()):
            got = await self.wait(path, got.next_offset, idle, stop=stop, created=got.created)
            yield got

    async def info(self, path: str) -> TokenStreamInfo:
        """The stream's configuration and tail (does not renew a TTL)."""
        return self._info(await self._load(path))

    @staticmethod
    def _info(snap: Snapshot) -> TokenStreamInfo:
        st = snap.state
        return TokenStreamInfo(st.path, st.content_type, format_offset(_tail(snap)), st.closed, st.ttl, st.expires_at)

    async def delete(self, path: str) -> None:
        """Delete the stream (``StreamNotFound`` when there is none). While forks read it, it is
        only marked deleted (gone for everything but them) and removed with the last of them."""
        for _ in range(_MAX_TRIES):
            snap = await self._load(path)
            self._cache.pop(snap.key, None)
            st = msgspec.structs.replace(snap.state, deleted=True)
            try:  # see _drop: marked deleted under compare-and-set first, then purged if no fork holds it
                version = (await self._b.commit(snap.key, snap.version, None, st)).version
            except Conflict:
                continue  # written meanwhile (an append, a new fork): decide again
            if st.refs == 0:
                await self._drop(msgspec.structs.replace(snap, state=st, version=version))
            return
        raise Conflict(f"the token stream at {path!r} changed on every try; try again")


class _TokenClient(StreamClient[TokenBackend]):
    def __init__(
        self,
        replicas: int | None,
        timeout: float,
        url: str | None,
        token: str | None,
        user: str | None,
        password: str | None,
        creds: str | None,
    ) -> None:
        super().__init__(resolve(url, token=token, user=user, password=password, creds=creds))
        self._replicas, self._timeout = check_options(replicas, timeout)
        self._store: TokenStreams | None = None

    async def _open(self) -> TokenBackend:
        return await open_tokens(self._opts, replicas=self._replicas, timeout=self._timeout)

    async def store(self) -> TokenStreams:
        backend = await self._connection()
        if self._store is None:
            self._store = TokenStreams(backend)
        return self._store


async def open_token_streams(
    *,
    url: str | None = None,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    replicas: int | None = None,
    timeout: float = 5.0,
) -> tuple[TokenStreams, StreamClient[TokenBackend]]:
    """``TokenStreams`` on a shared connection, and the client to ``close()`` when done."""
    client = _TokenClient(replicas, timeout, url=url, token=token, user=user, password=password, creds=creds)
    return await client.store(), client


class AsyncTokenStream:
    """One resumable token stream at ``path`` (any UTF-8 string up to 1024 bytes).

    ``s = AsyncTokenStream("answers/42"); await s.create(content_type="text/plain")``,
    ``await s.append(b"Hel")``, ``await s.close_stream()``; a reader anywhere:
    ``async for part in s.follow(): ...`` (catch-up, then live, ends when closed).
    """

    def __init__(
        self,
        path: str,
        *,
        url: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
        replicas: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.path = check_path(path)
        self._client = _TokenClient(replicas, timeout, url=url, token=token, user=user, password=password, creds=creds)

    async def _s(self) -> TokenStreams:
        return await self._client.store()

    async def open(self) -> Self:
        """Connect (the first call does it anyway)."""
        await self._s()
        return self

    async def create(
        self,
        *,
        content_type: str = "application/octet-stream",
        ttl: int | None = None,
        expires_at: datetime | str | None = None,
        data: bytes = b"",
        closed: bool = False,
    ) -> bool:
        """Create the stream; False when it exists with the same settings (``Conflict`` if not)."""
        created, _ = await (await self._s()).create(
            self.path, content_type=content_type, ttl=ttl, expires_at=expires_at, data=data, closed=closed
        )
        return created

    async def fork(self, path: str, offset: str | None = None, sub_offset: int = 0) -> AsyncTokenStream:
        """A new stream at ``path`` with this one's chunks up to ``offset`` (default: all)."""
        await (await self._s()).create(path, fork_from=self.path, fork_offset=offset, fork_sub_offset=sub_offset)
        twin = AsyncTokenStream.__new__(AsyncTokenStream)
        twin.path, twin._client = path, self._client
        return twin

    async def append(
        self,
        data: bytes | str,
        *,
        producer: tuple[str, int, int] | None = None,
        stream_seq: str | None = None,
        close: bool = False,
    ) -> AppendResult:
        """Append a chunk (str: UTF-8). ``producer=(id, epoch, seq)``: a retry with the same
        tuple is stored once (``duplicate=True``). ``close=True`` appends and closes atomically."""
        raw = data.encode() if isinstance(data, str) else data
        return await (await self._s()).append(self.path, raw, close=close, producer=producer, stream_seq=stream_seq)

    async def close_stream(self, *, producer: tuple[str, int, int] | None = None) -> AppendResult:
        """Close the stream: no more appends; readers get the end after the last chunk."""
        return await (await self._s()).append(self.path, b"", close=True, producer=producer)

    async def read(self, offset: str = START) -> TokenRead:
        """The chunks after ``offset``, up to the tail (or about 4 MiB; page on with next_offset)."""
        return await (await self._s()).read(self.path, offset)

    async def wait(self, offset: str, timeout: float = 30.0) -> TokenRead:
        """Long-poll: the chunks after ``offset`` once there are any, or an empty read at ``timeout``."""
        return await (await self._s()).wait(self.path, offset, timeout)

    async def follow(self, offset: str = START) -> AsyncIterator[TokenRead]:
        """Catch up from ``offset``, then every new chunk live, until the stream is closed."""
        store = await self._s()
        async for got in store.follow(self.path, offset):
            if got.chunks or got.closed:
                yield got

    async def info(self) -> TokenStreamInfo:
        return await (await self._s()).info(self.path)

    async def delete(self) -> None:
        await (await self._s()).delete(self.path)

    async def close(self) -> None:
        """Release the connection (the stream stays; see ``close_stream`` to end it)."""
        await self._client.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncTokenStream({self.path!r})"

