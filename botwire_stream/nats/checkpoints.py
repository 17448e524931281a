"""LangGraph checkpoints over NATS: one JetStream stream per namespace, one subject per record.

Layout (stream ``BOTWIRE_LG_<namespace>``, subjects ``botwire.<namespace>.lg.>``, at most one
message per subject)::

    <prefix>.<thread>.<ns>.c.<checkpoint id>                  a checkpoint (with its metadata)
    <prefix>.<thread>.<ns>.w.<checkpoint id>.<task id>.<idx>  one pending write of a task

Every name is one subject token (``keys`` segment encoding: plain ``[A-Za-z0-9_-]`` as it is,
anything else, the empty checkpoint namespace included, as ``=`` + base64url), so a thread, a
namespace or a checkpoint is a subject filter and the server's per-subject index does the lookups:

- the latest checkpoint of a thread and namespace is the last message on ``<thread>.<ns>.c.*``
  (the one stored last: LangGraph's checkpoint ids grow with time, and a copy keeps their order):
  one direct get and one read of its writes by subject (sent together when the process knows
  the latest id already); a given checkpoint and its writes are two requests sent together;
- a thread's checkpoints and writes are batch direct gets on its filters (paged);
- deleting a thread, a checkpoint or its writes is a purge by subject filter.

A checkpoint put again under the same id replaces the stored one (one message per subject).
Regular pending writes (``idx >= 0``) are stored only if none is stored under the same task and
index (``Nats-Expected-Last-Subject-Sequence: 0``), as LangGraph's own savers keep the first;
special ones (negative ``idx``: errors, interrupts, resumes) replace it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Final

from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from ..errors import Conflict, ValueTooLarge
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


async def open_checkpoints(opts: ConnectOptions, namespace: str, *, replicas: int | None, timeout: float) -> NatsCheckpoints:
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
    for i in range(0, len(aws), _IN_FLIGHT):
        await asyncio.gather(*aws[i : i + _IN_FLIGHT])


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
        await release(self.conn)

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
        """Store (or replace) one checkpoint record."""
        base = self._base(thread, ns)
        subject = f"{base}.c.{_token(checkpoint_id)}"
        await self.conn.publish(subject, data, None, self.timeout, what="checkpoint put", advice=SAFE)
        _remember(self.stream, base, checkpoint_id)

    async def put_writes(
        self, thread: str, ns: str, checkpoint_id: str, task_id: str, writes: Sequence[tuple[int, bytes]]
    ) -> None:
        """Store a task's writes, ``(idx, record)`` each: a regular one (``idx >= 0``) only when
        none is stored under the same task and index, a special one (``idx < 0``) replacing it."""
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
                await self.conn.publish(f"{base}.{idx}", data, headers, self.timeout, what="pending write", advice=SAFE)
            except Conflict:
                pass  # already stored by an earlier run of the task: the first write is kept

        await _bounded([one(idx, data) for idx, data in writes])

    # -- reads ----------------------------------------------------------------------------------
    async def latest(self, thread: str, ns: str) -> tuple[str, bytes, list[tuple[str, int, bytes]]] | None:
        """The checkpoint stored last for the thread and namespace: ``(checkpoint id, record,
        its writes)``. Its record and its writes are read by subject, so writes stored before
        their checkpoint (LangGraph saves both in the background, in no set order) are found.
        One round trip when this process knows the latest id (``_latest_ids``), else two."""
        base = self._base(thread, ns)
        known = _latest_ids.get((self.stream, base))
        if known is None:
            msg = await self.conn.direct_get_last(self.stream, f"{base}.c.*", self.timeout)
            writes = None
        else:  # both at once: right when the latest is still the one this process knows
            msg, writes = await asyncio.gather(
                self.conn.direct_get_last(self.stream, f"{base}.c.*", self.timeout), self.writes(thread, ns, known)
            )
        if msg is None:
            _latest_ids.pop((self.stream, base), None)
            return None
        checkpoint_id = _name(self._subject(msg).rsplit(".", 1)[1])
        if checkpoint_id != known or writes is None:
            writes = await self.writes(thread, ns, checkpoint_id)
            _remember(self.stream, base, checkpoint_id)
        return checkpoint_id, msg.data, writes

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
        await self.conn.purge(self.stream, f"{self.prefix}.{_token(thread)}.>", timeout=self.timeout)

    async def delete_checkpoints(self, items: Sequence[tuple[str, str, str]]) -> None:
        """Remove the checkpoints ``(thread, ns, checkpoint id)`` and their writes."""
        aws = []
        for thread, ns, checkpoint_id in items:
            base, cid = self._base(thread, ns), _token(checkpoint_id)
            aws.append(self.conn.purge(self.stream, f"{base}.c.{cid}", timeout=self.timeout))
            aws.append(self.conn.purge(self.stream, f"{base}.w.{cid}.>", timeout=self.timeout))
        await _bounded(aws)

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
