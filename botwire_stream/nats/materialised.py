"""The materialised conversation layout: contiguous chunks per conversation, read in O(its length).

A namespace's conversations share one stream, so a conversation written among many others is
spread through it and a raw read costs the span it covers. The history materialiser
(``consumers/materialiser.py``, a separate process) copies each conversation into chunks in a
second stream, ``BOTWIRE_MAT_<namespace>``:

- ``botwire.<ns>.mat.c<level>.<session>``: chunks, each a run of the conversation's messages in
  order (``Chunk``: the raw sequence before the run, then each message's sequence, time and body).
  Level 0 chunks are written as messages arrive; every ``MERGE`` chunks of level 0 or 1 are
  re-packed into chunks of about ``CHUNK_BYTES`` (level 2, kept) and one smaller remainder (level
  1), and the merged ones purged; so a conversation has fewer than ``2 * MERGE`` small chunks plus
  one per ``CHUNK_BYTES`` of its messages. A message larger than a chunk is kept only in the log:
  its chunk entry has an empty body (empty messages, expiry markers, are never put in chunks).
- ``botwire.<ns>.mat.s.<session>``: the conversation's ``Summary`` (rolled up: only the newest).

This module defines the layout and its exact read; only the materialiser writes it. The read never
trusts the chunks for more than they prove: chunks are chained by ``prev`` (a chunk continues the
one whose last sequence is its ``prev``), only the messages at or after the conversation's first
raw sequence now are kept (a ``clear`` or an expiry removes every older one, and nothing else
removes messages: the stream denies deletes), and everything after the chain's last sequence is
read from the raw log. So a lagging, killed or never-run materialiser costs speed, never exactness.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Final

import msgspec
from nats.js.api import DiscardPolicy, StreamConfig

from .._backend import LogEntry
from ..errors import ChangedWhileRead
from ..times import parse_time
from .errors import SubjectPurged
from .jetstream import Connection

__all__ = [
    "CHUNK_BYTES",
    "LEVELS",
    "MERGE",
    "Chunk",
    "Summary",
    "chain",
    "chunk_subject",
    "mat_config",
    "mat_stream",
    "read_chain",
    "read_exact",
    "summary_subject",
]

LEVELS: Final = 3  # chunk levels: 0 (as written), 1 (merged remainders), 2 (full chunks)
MERGE: Final = 8  # chunks of level 0 or 1 merged at once
CHUNK_BYTES: Final = 256 * 1024  # a full chunk's message bodies (the server's max_payload is 1 MiB by default)
_TRIES: Final = 5  # reads started again after racing a clear or an expiry


class Chunk(msgspec.Struct, array_like=True, frozen=True):
    """A run of one conversation's messages: ``prev`` is the raw sequence of the conversation's
    message just before it (0: none known), then the messages' sequences, times and bodies."""

    prev: int
    seqs: list[int]
    times: list[datetime]
    data: list[bytes]

    @property
    def last(self) -> int:
        return self.seqs[-1] if self.seqs else self.prev


class Summary(msgspec.Struct, frozen=True, omit_defaults=True):
    """One conversation as the materialiser last saw it (lags the log by the materialiser's lag)."""

    session_id: str
    message_count: int
    first_activity: datetime | None
    last_activity: datetime | None
    title: str | None = None  # from the first user message
    tokens: int = 0  # an estimate: bytes / 4
    covered: int = 0  # the last raw sequence it accounts for


_chunk_decoder = msgspec.msgpack.Decoder(Chunk)


def mat_stream(namespace: str) -> str:
    return f"BOTWIRE_MAT_{namespace}"


def chunk_subject(namespace: str, level: int, token_path: str) -> str:
    return f"botwire.{namespace}.mat.c{level}.{token_path}"


def summary_subject(namespace: str, token_path: str) -> str:
    return f"botwire.{namespace}.mat.s.{token_path}"


def mat_config(namespace: str, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=mat_stream(namespace),
        subjects=[f"botwire.{namespace}.mat.>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        discard=DiscardPolicy.OLD,
        duplicate_window=120,
        num_replicas=replicas,
        metadata={"botwire.namespace": namespace, "botwire.role": "materialised chat"},
    )


async def read_chain(
    conn: Connection, namespace: str, token_path: str, timeout: float
) -> tuple[int, list[Chunk], list[int]]:
    """The chained chunks of a conversation (every level read at once): the ``prev`` the chain
    starts after, its chunks in order, and how many chunks each level holds."""
    stream = mat_stream(namespace)
    levels = await asyncio.gather(
        *(
            conn.read_subject(stream, chunk_subject(namespace, lv, token_path), headers=False, timeout=timeout)
            for lv in range(LEVELS)
        )
    )
    chunks = [_chunk_decoder.decode(m.data) for msgs in levels for m in msgs]
    start, chained = chain(chunks)
    return start, chained, [len(msgs) for msgs in levels]


def chain(chunks: list[Chunk]) -> tuple[int, list[Chunk]]:
    """The longest run of ``chunks`` linked by ``prev``, from the lowest ``prev`` on (a merged
    chunk and the ones it replaced may both be present while a merge is under way: the longest
    chunk at each step is taken, the rest skipped)."""
    if not chunks:
        return 0, []
    after: dict[int, Chunk] = {}
    for c in chunks:
        if c.seqs and (c.prev not in after or c.last > after[c.prev].last):
            after[c.prev] = c
    if not after:
        return 0, []
    start = min(after)
    out: list[Chunk] = []
    at = start
    while at in after:
        c = after[at]
        out.append(c)
        at = c.last
    return start, out


async def _first(conn: Connection, stream: str, subject: str, timeout: float) -> tuple[int, str] | None:
    """The raw sequence and time (``Nats-Time-Stamp``) of the conversation's first message now
    (None: it has none)."""
    probe = await conn.direct_batch(stream, {"next_by_subj": subject, "seq": 1, "batch": 1}, timeout)
    if not probe.msgs:
        return None
    hdr = probe.msgs[0].headers or {}
    return int(hdr["Nats-Sequence"]), hdr["Nats-Time-Stamp"]


def _same_log(chunks: list[Chunk], first: int, time: str) -> bool:
    """Whether ``chunks`` were copied from the log that holds the conversation's first message
    ``first`` (at ``time``) now, when the chain reaches it: they then hold that message, at that
    sequence and time. A log deleted and made again (``nats stream rm``, another client's
    ``delete_stream``, then a write) starts its sequences anew, and chunks of the old one covered
    sequences of the new one: read as its messages, they gave the old conversation (measured:
    4 old messages, the new one missing). Chunks that fail the check are not used (the raw log is
    read); the first message kept only in the log (an empty body) fails it too."""
    for c in chunks:
        if c.last < first:
            continue
        for s, t, d in zip(c.seqs, c.times, c.data, strict=True):
            if s == first:
                return bool(d) and t == parse_time(time)
            if s > first:
                return False
    return True  # the chain ends before it: none of its messages is used


async def read_exact(
    conn: Connection, stream: str, subject: str, namespace: str, token_path: str, timeout: float
) -> list[LogEntry]:
    """Every message of the conversation, oldest first: the chunks' messages still in the log,
    then the raw log after the chain; never a mix of before and after a concurrent clear (the
    conversation's first sequence is the same before and after the read, else it is read again)."""
    for _ in range(_TRIES):
        found = await _first(conn, stream, subject, timeout)
        if found is None:
            return []
        first, first_time = found
        start, chunks = (await read_chain(conn, namespace, token_path, timeout))[:2]
        if not _same_log(chunks, first, first_time):
            start, chunks = 0, []
        out: list[LogEntry] = []
        covered = 0
        big: list[int] = []  # messages kept only in the log
        if chunks and first > start:  # the chain covers every message from ``first`` to its end
            for c in chunks:
                for s, t, d in zip(c.seqs, c.times, c.data, strict=True):
                    if s >= first:
                        out.append(LogEntry(s, t, d))
                        if not d:
                            big.append(len(out) - 1)
            covered = chunks[-1].last
        if big:
            got = await asyncio.gather(
                *(
                    conn.direct_batch(stream, {"next_by_subj": subject, "seq": out[i].seq, "batch": 1}, timeout)
                    for i in big
                )
            )
            for i, reply in zip(big, got, strict=True):
                if not reply.msgs or reply.last_seq != out[i].seq:
                    break  # cleared meanwhile: the check below reads it again
                out[i] = LogEntry(out[i].seq, out[i].time, reply.msgs[0].data)
        try:
            tail = await conn.read_subject(
                stream,
                subject,
                start_seq=max(covered + 1, first),
                page=10_000,
                headers=True,
                snapshot=True,
                timeout=timeout,
            )
        except SubjectPurged:
            continue
        if await _first(conn, stream, subject, timeout) != found:
            continue  # cleared or expired meanwhile: read what is there now
        for m in tail:
            if m.data:
                hdr = m.headers or {}
                out.append(LogEntry(int(hdr["Nats-Sequence"]), parse_time(hdr["Nats-Time-Stamp"]), m.data))
        return out
    raise ChangedWhileRead(f"{subject} was cleared {_TRIES} times while it was read; read it again")
