"""Chunked values: a value larger than one message, written as chunks to a companion stream
(``BOTWIRE_BLOBS_<namespace>``, subjects ``botwire.<namespace>.blob.<key>.<blob id>.<n>``) and
committed by one small manifest on the key, so that a reader sees the old value or the whole new one.
"""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Final, NamedTuple

import msgspec
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from ..errors import BotWireError, Conflict, ServerUnavailable
from ..models import Op
from .jetstream import Connection
from .retry import SAFE

if TYPE_CHECKING:
    from .kv import NatsMemory

__all__ = ["BYTES_PER_SECOND", "ChunksGone", "Outcome", "blob_of", "op_of"]

_CHUNK_TTL_MARGIN: Final = 60  # seconds the chunks of a value with a TTL outlive its manifest
# A chunked value's chunks share one deadline: the timeout plus one second per this many bytes (as
# extend's); reading its chunks gets the same per request. Loopback moves 64 MiB in well under 4 s.
BYTES_PER_SECOND: Final = 16 * 1024 * 1024
_DELETE_OPS: Final = frozenset({"DEL", "PURGE"})
_background: set[asyncio.Task[None]] = set()  # chunk purges left running after a failed write


class ChunksGone(BotWireError):
    """A chunked value was replaced (and its chunks reclaimed) while it was being read."""


class _Manifest(msgspec.Struct):
    """What a chunked value's key holds: where its chunks are."""

    blob: str
    size: int
    chunks: int
    first_seq: int


class Outcome(NamedTuple):
    """What a write is, and whether repeating it is safe, for an ``OutcomeUnknown``."""

    what: str
    advice: str


_manifest_decoder = msgspec.json.Decoder(_Manifest)


def op_of(headers: dict[str, str] | None) -> Op:
    """What a stored KV message means: ``set``, ``delete``, or ``expire`` (an expiry marker)."""
    if not headers:
        return "set"
    reason = headers.get("Nats-Marker-Reason")
    if reason is not None:
        return "expire" if reason == "MaxAge" else "delete"
    if headers.get("KV-Operation") in _DELETE_OPS:
        return "delete"
    return "set"


def blob_of(msg: Msg | None) -> str | None:
    """The blob id a stored value's manifest names (None: not a chunked value)."""
    if msg is None or not msg.headers or op_of(msg.headers) != "set":
        return None
    return msg.headers.get("Botwire-Blob")


class Blobs:
    """The chunk store of one namespace's memory (``kv.NatsMemory`` owns one)."""

    def __init__(self, kv: NatsMemory) -> None:
        self._kv = kv
        self.stream = f"BOTWIRE_BLOBS_{kv.namespace}"
        self._prefix = f"botwire.{kv.namespace}.blob."

    def _subject(self, key: str) -> str:
        # The whole key as one token, so that a purge of this key's chunks touches no other key.
        return self._prefix + base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()

    async def _ensure_stream(self, conn: Connection) -> None:
        kv = self._kv
        await conn.ensure_stream(
            StreamConfig(
                name=self.stream,
                subjects=[f"{self._prefix}>"],
                allow_direct=True,
                allow_msg_ttl=True,
                num_replicas=kv.replicas,
                max_msgs=-1,
                metadata={"botwire.namespace": kv.namespace},
            ),
            kv.timeout,
        )

    async def write(
        self,
        key: str,
        subject: str,
        data: bytes,
        ttl: int | None,
        headers: dict[str, str],
        expected: int | None,
        replaced: Msg | None,
        outcome: Outcome,
    ) -> int:
        """Write the chunks, then commit them with one manifest on the key.

        The manifest is published over a known revision (``update``'s, else the last one read just
        before), so the value it replaces is known exactly even when a TTL rollup removes it, and
        only that value's chunks are reclaimed: never the chunks of a write still in progress.
        """
        kv = self._kv
        conn, timeout = kv.conn, kv.timeout
        await self._ensure_stream(conn)
        blob = conn.new_id()
        base = self._subject(key)
        step = conn.max_body
        # The chunks are written before the manifest, so with the same TTL they would expire
        # first, as long before as the write took (measured: a 16 MiB value in 4 KiB messages read
        # as "kept changing" until its manifest expired); they outlive it by a margin instead.
        chunk_headers = {"Nats-TTL": str(ttl + _CHUNK_TTL_MARGIN)} if ttl is not None else None
        view = memoryview(data)
        seqs = []
        committing = False
        loop = asyncio.get_running_loop()
        budget = timeout + len(data) / BYTES_PER_SECOND
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
                    rev = await conn.publish(subject, manifest, headers, timeout, what=outcome.what, advice=outcome.advice)
                else:
                    rev, replaced = await self._commit_over_last(key, subject, manifest, headers, outcome)
            except Conflict:
                # On the embedded server a publish that timed out is sent again, and the second
                # copy conflicts with the first when that one was stored (measured: SIGSTOP of the
                # server for 1.5 s with timeout=1): then the value is committed, look before purging.
                last = await conn.direct_get_last(kv.stream, subject, timeout)
                if last is None or not last.headers or last.headers.get("Botwire-Blob") != blob:
                    raise
                rev = int(last.headers["Nats-Sequence"])
        except BaseException as exc:
            # A manifest publish that timed out, lost its connection or was cancelled may still be
            # stored (measured: a server stalled past the timeout stores it when it resumes), and
            # purging its chunks would leave the key unreadable for good. Only a refusal by the
            # server proves it is not stored; otherwise the chunks stay (they cost space only).
            if not committing or (isinstance(exc, BotWireError) and not isinstance(exc, ServerUnavailable)):
                purge = asyncio.ensure_future(self._purge_quietly(f"{base}.{blob}.*"))
                if isinstance(exc, ServerUnavailable):
                    # A server that did not answer would cost the caller one more timeout: purge
                    # in the background, so the call fails within its own deadline.
                    _background.add(purge)
                    purge.add_done_callback(_background.discard)
                else:
                    await asyncio.shield(purge)
            raise
        await self.reclaim(key, replaced, before=rev, keep=blob)
        return rev

    async def _commit_over_last(
        self, key: str, subject: str, manifest: bytes, headers: dict[str, str], outcome: Outcome
    ) -> tuple[int, Msg | None]:
        """Publish ``manifest`` over the key's last message; its revision and the message it replaced.

        A set is unconditional for the user: on a race with another writer only this small publish
        is retried, over the new last message.
        """
        kv = self._kv
        conn, timeout = kv.conn, kv.timeout
        for _ in range(100):
            last = await conn.direct_get_last(kv.stream, subject, timeout)
            headers["Nats-Expected-Last-Subject-Sequence"] = (last.headers or {})["Nats-Sequence"] if last else "0"
            try:
                return await conn.publish(subject, manifest, headers, timeout, what=outcome.what, advice=outcome.advice), last
            except Conflict:
                continue  # another write landed between the read and the publish: commit over it
        raise Conflict(f"set of {key!r} kept racing with other writers; try again")

    async def reclaim(self, key: str, replaced: Msg | None, *, before: int, keep: str) -> None:
        """Purge the chunks of the chunked values that the write or delete at ``before`` replaced.

        That is ``replaced`` and any older kept revision that references chunks (e.g. a big value
        overwritten by a small one, which does not look). Chunks no kept revision references may
        belong to a write still in progress and are left alone.
        """
        kv = self._kv
        conn, timeout = kv.conn, kv.timeout
        blobs = set()
        blob = blob_of(replaced)
        if blob:
            blobs.add(blob)
        base = self._subject(key)
        try:
            counts = await conn.subject_counts(self.stream, f"{base}.>", timeout)
            present = {s.rsplit(".", 2)[1] for s in counts}
            present.discard(keep)
            if present - blobs:  # chunks of other values: those of replaced revisions go too
                kept = await conn.pull_headers(kv.stream, kv.subject(key), last_per_subject=False, timeout=timeout)
                for m in kept:
                    blob = (m.headers or {}).get("Botwire-Blob")
                    if blob and m.metadata.sequence.stream < before:
                        blobs.add(blob)
            blobs &= present
        except BotWireError:
            pass  # no blob stream yet, or the server went away: leftover chunks cost space only
        for blob in blobs:
            await self._purge_quietly(f"{base}.{blob}.*")

    async def _purge_quietly(self, subject: str) -> None:
        try:
            await self._kv.conn.purge(self.stream, subject, timeout=self._kv.timeout)
        except BotWireError:
            pass  # leftover chunks cost space, never correctness

    async def read(self, key: str, manifest_data: bytes) -> bytes:
        """The value from its chunks, by batch direct gets paged until all are read.

        nats-server ends one batch reply once it has sent 64 MiB (measured: 9 of 12 messages of
        8 MiB, 3 left pending). A 64 MiB value just fits, but the read goes on from the last chunk
        received until every chunk is in, so that message overhead or a server with a lower limit
        cannot cut it short.
        """
        manifest = _manifest_decoder.decode(manifest_data)
        subject = f"{self._subject(key)}.{manifest.blob}.*"
        msgs: list[Msg] = []
        seq = manifest.first_seq
        while len(msgs) < manifest.chunks:
            batch = await self._kv.conn.direct_batch(
                self.stream,
                {"next_by_subj": subject, "seq": seq, "batch": manifest.chunks - len(msgs)},
                timeout=self._kv.timeout + manifest.size / BYTES_PER_SECOND,
            )
            if not batch.msgs:
                break
            msgs.extend(batch.msgs)
            seq = batch.last_seq + 1
        if len(msgs) != manifest.chunks:
            raise ChunksGone(f"the chunks of {key!r} are incomplete ({len(msgs)}/{manifest.chunks})")
        return b"".join(m.data for m in msgs)
