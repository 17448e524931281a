"""LangGraph adapters: a checkpointer and a long-term store on NATS JetStream.

``pip install 'botwire-stream[langgraph]'``, then::

    from botwire_stream.integrations.langgraph import BotWireSaver, BotWireStore

    graph = builder.compile(checkpointer=BotWireSaver("my-app"), store=BotWireStore("my-app"))

- ``BotWireSaver``: a ``BaseCheckpointSaver``. Checkpoints and pending writes are records on a
  JetStream stream (``nats/checkpoints.py``: one subject per record, so the server's subject
  index answers "the latest checkpoint of this thread" in one request). Serialised with
  LangGraph's serde (``JsonPlusSerializer`` unless ``serde=`` is given), as LangGraph's savers do.
- ``BotWireStore``: a ``langgraph.store.base.BaseStore`` over ``AsyncMemory`` (one key per item).

Both are async native (the ``a*`` methods run on the caller's loop); the sync methods run the same
coroutines on botwire-stream's background loop (``botwire_stream.portal``). Connections are per
event loop (``integrations._base``): ``close()``/``aclose()`` or ``with``/``async with`` release them.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol

import msgspec

try:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import (
        WRITES_IDX_MAP,
        BaseCheckpointSaver,
        ChannelVersions,
        Checkpoint,
        CheckpointMetadata,
        CheckpointTuple,
        get_checkpoint_metadata,
        writes_sort_key,
    )
    from langgraph.checkpoint.serde.base import SerializerProtocol
    from langgraph.store.base import (
        NOT_PROVIDED,
        BaseStore,
        GetOp,
        InvalidNamespaceError,
        Item,
        ListNamespacesOp,
        NotProvided,
        Op,
        PutOp,
        Result,
        SearchItem,
        SearchOp,
        TTLConfig,
        validate_op_namespace,
    )

    # InMemoryStore's own matching, so that filters and namespace conditions mean the same here.
    from langgraph.store.memory import _compare_values, _does_match
except ImportError as exc:  # tests/test_package.py runs this with langgraph blocked
    from ..errors import MissingDependency

    raise MissingDependency(
        "botwire_stream.integrations.langgraph needs langgraph: pip install 'botwire-stream[langgraph]'"
    ) from exc

from .. import keys
from ..client import StreamClient, check_options
from ..errors import InvalidArgument, InvalidKey, InvalidNamespace, InvalidValue, ValueTooLarge
from ..memory import AsyncMemory
from ..portal import call
from ..settings import resolve
from ._base import LoopBound, PerLoop, map_bounded, memory_cores

__all__ = ["BotWireSaver", "BotWireStore", "CheckpointBackend"]


# -- checkpointer --------------------------------------------------------------------------------
class CheckpointBackend(Protocol):
    """Storage of one namespace's checkpoint records (``nats/checkpoints.NatsCheckpoints``).

    Records cross as encoded bytes. ``latest`` is the checkpoint stored last for a thread and
    namespace; lists are in the order stored.
    """

    async def put_checkpoint(self, thread: str, ns: str, checkpoint_id: str, data: bytes) -> None: ...
    async def put_writes(
        self, thread: str, ns: str, checkpoint_id: str, task_id: str, writes: Sequence[tuple[int, bytes]]
    ) -> None: ...
    async def latest(self, thread: str, ns: str) -> tuple[str, bytes, list[tuple[str, int, bytes]]] | None: ...
    async def checkpoint(self, thread: str, ns: str, checkpoint_id: str) -> bytes | None: ...
    async def writes(self, thread: str, ns: str, checkpoint_id: str) -> list[tuple[str, int, bytes]]: ...
    async def checkpoints(self, thread: str | None, ns: str | None) -> list[tuple[str, str, str, bytes]]: ...
    async def checkpoint_ids(self, thread: str | None, ns: str | None) -> list[tuple[str, str, str]]: ...
    async def records(self, items: Sequence[tuple[str, str, str]]) -> list[bytes | None]: ...
    async def all_writes(self, thread: str | None, ns: str | None) -> list[tuple[str, str, str, str, int, bytes]]: ...
    async def delete_thread(self, thread: str) -> None: ...
    async def delete_checkpoints(self, items: Sequence[tuple[str, str, str]]) -> None: ...
    async def copy_thread(self, source: str, target: str) -> None: ...
    async def close(self) -> None: ...


class _Checkpoints(StreamClient[CheckpointBackend]):
    """The async core of ``BotWireSaver`` on one event loop: its lazily opened backend."""

    def __init__(self, namespace: str, *, url: str | None, replicas: int, timeout: float, **credentials: Any) -> None:
        self.namespace = keys.check_namespace(namespace)
        self._replicas, self._timeout = check_options(replicas, timeout)
        super().__init__(resolve(url, **credentials))
        if self._opts.transport != "nats":
            raise InvalidArgument(
                "BotWireSaver stores checkpoints over NATS (nats://, tls:// or the embedded server); "
                f"the {self._opts.transport} transport is not supported"
            )

    def __repr__(self) -> str:
        return f"BotWireSaver core({self.namespace!r})"

    async def _open(self) -> CheckpointBackend:
        from ..nats.checkpoints import open_checkpoints

        return await open_checkpoints(self._opts, self.namespace, replicas=self._replicas, timeout=self._timeout)

    async def backend(self) -> CheckpointBackend:
        return await self._connection()


class _Stored(msgspec.Struct, array_like=True):
    """A checkpoint record: the serde's typed dumps of the checkpoint and of its metadata."""

    checkpoint_type: str
    checkpoint: bytes
    metadata_type: str
    metadata: bytes
    parent_id: str | None


class _Write(msgspec.Struct, array_like=True):
    """A pending write record: its channel, the serde's typed dump of the value, the task path,
    and the indexes the ``put_writes`` call that stored it wrote (``_call_indexes``), so a call
    stored only in part can be told apart (``of`` 0: a record of an earlier version)."""

    channel: str
    value_type: str
    value: bytes
    task_path: str
    of: int = 0  # how many writes the call had: a regular write's index is its position
    special: tuple[tuple[int, int], ...] = ()  # (position, index) of each special write of the call


def _call_indexes(w: _Write) -> frozenset[int]:
    """The indexes of the records the ``put_writes`` call of ``w`` stored (a special write's
    index replaces its position)."""
    positions = {pos for pos, _ in w.special}
    return frozenset(i for i in range(w.of) if i not in positions) | {idx for _, idx in w.special}


_stored_decoder: Final = msgspec.msgpack.Decoder(_Stored)
_write_decoder: Final = msgspec.msgpack.Decoder(_Write)
_encoder: Final = msgspec.msgpack.Encoder()
_PER_CHECKPOINT_READS: Final = 8  # a list of up to this many reads each one's writes; more: one scan
_LIST_PAGE: Final = 256  # checkpoint records a filtered list reads per request


# The most UTF-8 bytes of each name (its subject token is a third longer): a record's subject then
# stays far below nats-server's 4 KiB control line, past which the server drops the connection.
_MAX_NAME: Final = 512  # thread ids and checkpoint namespaces (nested subgraphs make long ones)
_MAX_ID: Final = 256  # checkpoint and task ids (LangGraph's are 36-character UUIDs)


def _text(value: str, what: str) -> bytes:
    """``value`` as UTF-8; a lone surrogate (no UTF-8 form: subjects and msgpack refuse it with a
    bare ``UnicodeEncodeError``) raises ``InvalidArgument``."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"{what} is no valid Unicode text (a lone surrogate): {value[:80]!r}; nothing was written"
        ) from None


def _sized(value: str, what: str, limit: int) -> str:
    if len(_text(value, what)) > limit:
        raise InvalidArgument(f"{what} is over {limit} UTF-8 bytes: {value[:80]!r}...; nothing was written")
    return value


def _checkpoint_id(config: RunnableConfig, what: str) -> str | None:
    """The config's ``checkpoint_id`` (None or empty: none), else ``InvalidArgument``."""
    checkpoint_id = _configurable(config).get("checkpoint_id")  # as get_checkpoint_id, checked
    if checkpoint_id is not None and not isinstance(checkpoint_id, str):
        raise InvalidArgument(f"{what}'s checkpoint_id must be a str, not {checkpoint_id!r}")
    return _sized(checkpoint_id, f"{what}'s checkpoint_id", _MAX_ID) if checkpoint_id else None


def _name(value: object, what: str) -> str:
    """A thread id (str, int or UUID as LangGraph allows; stored as its ``str``), else ``InvalidArgument``."""
    if isinstance(value, bool) or not isinstance(value, (str, int, uuid.UUID)):
        raise InvalidArgument(f"{what} must be a str (or an int or UUID), not {value!r}")
    return _sized(str(value), what, _MAX_NAME)


def _configurable(config: object) -> dict[str, Any]:
    if not isinstance(config, dict) or not isinstance(config.get("configurable"), dict):
        raise InvalidArgument(f"a checkpoint config is {{'configurable': {{'thread_id': ...}}}}, not {config!r}")
    conf: dict[str, Any] = config["configurable"]
    return conf


def _thread(config: object) -> str:
    conf = _configurable(config)
    if "thread_id" not in conf:
        raise InvalidArgument("the config names no thread: pass {'configurable': {'thread_id': ...}}")
    return _name(conf["thread_id"], "thread_id")


def _ns(conf: dict[str, Any]) -> str:
    ns = conf.get("checkpoint_ns", "")
    if not isinstance(ns, str):
        raise InvalidArgument(f"checkpoint_ns must be a str, not {ns!r}")
    return _sized(ns, "checkpoint_ns", _MAX_NAME)


def _config(thread: str, ns: str, checkpoint_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread, "checkpoint_ns": ns, "checkpoint_id": checkpoint_id}}


class BotWireSaver(LoopBound[_Checkpoints], BaseCheckpointSaver[str]):
    """A LangGraph checkpointer whose checkpoints live on NATS JetStream, shared by every process.

    ``BotWireSaver("my-app")`` (a namespace: 1-64 of ``[A-Za-z0-9_-]``); ``url`` and credentials
    resolve as for ``Memory`` (argument, ``BOTWIRE_*`` environment, the embedded server). A graph
    interrupted in one process resumes in another from the same thread. Every method exists async
    (native) and sync (the same code on the portal's loop). Bad input (a config without a thread,
    a checkpoint that is no dict, a value the serde cannot write) raises a
    ``botwire_stream.errors`` exception before anything is written.
    """

    def __init__(
        self,
        namespace: str = "langgraph",
        *,
        url: str | None = None,
        serde: SerializerProtocol | None = None,
        replicas: int = 1,
        timeout: float = 5.0,
        **credentials: Any,
    ) -> None:
        super().__init__(serde=serde)

        def make() -> _Checkpoints:
            return _Checkpoints(namespace, url=url, replicas=replicas, timeout=timeout, **credentials)

        make()  # validates the arguments now, without connecting
        self.namespace = namespace
        self._cores = PerLoop(make)

    def __repr__(self) -> str:
        return f"BotWireSaver({self.namespace!r})"

    # -- records ---------------------------------------------------------------------------------
    def _dump(self, value: object, what: str) -> tuple[str, bytes]:
        try:
            return self.serde.dumps_typed(value)
        except Exception as exc:  # the serde's own errors vary (TypeError, msgpack, pickle...)
            raise InvalidValue(f"LangGraph's serializer cannot write this {what} ({exc}); nothing was written") from exc

    def _tuple(
        self, thread: str, ns: str, checkpoint_id: str, data: bytes, writes: list[tuple[str, int, bytes]]
    ) -> CheckpointTuple:
        stored = _stored_decoder.decode(data)
        decoded = [(task_id, idx, _write_decoder.decode(raw)) for task_id, idx, raw in writes]
        stored_idx: dict[str, set[int]] = {}
        for task_id, idx, _ in decoded:
            stored_idx.setdefault(task_id, set()).add(idx)
        # A task's writes are separate messages: a call cut short (the server died mid-save)
        # leaves part of them stored, and LangGraph takes a task with any output write as
        # finished, the rest lost. A write shows only once every index its call wrote is stored
        # (by it, or by an earlier call: the first regular write wins), so the task runs again.
        whole: dict[tuple[str, int, tuple[tuple[int, int], ...]], bool] = {}
        pending = []
        for task_id, idx, w in decoded:
            call = (task_id, w.of, w.special)
            if call not in whole:  # (more regular writes than stored: not whole, without listing them)
                whole[call] = (
                    w.of - len(w.special) <= len(stored_idx[task_id]) and _call_indexes(w) <= stored_idx[task_id]
                )
            if whole[call]:
                pending.append((writes_sort_key(w.task_path, task_id, idx), task_id, w))
        pending.sort(key=lambda p: p[0])
        return CheckpointTuple(
            config=_config(thread, ns, checkpoint_id),
            checkpoint=self.serde.loads_typed((stored.checkpoint_type, stored.checkpoint)),
            metadata=self.serde.loads_typed((stored.metadata_type, stored.metadata)),
            parent_config=_config(thread, ns, stored.parent_id) if stored.parent_id else None,
            pending_writes=[
                (task_id, w.channel, self.serde.loads_typed((w.value_type, w.value))) for _, task_id, w in pending
            ],
        )

    # -- native async face -----------------------------------------------------------------------
    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint named by ``config``, or the thread's latest (in its ``checkpoint_ns``)
        when it names none; with its pending writes. None: no such checkpoint."""
        thread = _thread(config)
        conf = _configurable(config)
        ns = _ns(conf)
        backend = await self._cores.get().backend()
        checkpoint_id = _checkpoint_id(config, "the config")
        if checkpoint_id:
            # Both requests at once: one round trip.
            data, writes = await asyncio.gather(
                backend.checkpoint(thread, ns, checkpoint_id), backend.writes(thread, ns, checkpoint_id)
            )
            if data is None:
                return None
        else:
            latest = await backend.latest(thread, ns)
            if latest is None:
                return None
            checkpoint_id, data, writes = latest
        return self._tuple(thread, ns, checkpoint_id, data, writes)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints newest first: of ``config``'s thread (and ``checkpoint_ns`` when given;
        None: every thread), whose metadata has every ``filter`` item, older than ``before``'s,
        at most ``limit``. The thread's records are read whole; filters apply client-side."""
        for item in await self._list(config, filter=filter, before=before, limit=limit):
            yield item

    async def _list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        limit: int | None,
    ) -> list[CheckpointTuple]:
        thread: str | None = None
        ns: str | None = None
        wanted_id: str | None = None
        if config is not None:
            conf = _configurable(config)
            thread = _thread(config) if "thread_id" in conf else None
            ns = _ns(conf) if "checkpoint_ns" in conf else None
            wanted_id = _checkpoint_id(config, "the config")
        if filter is not None and not isinstance(filter, dict):
            raise InvalidArgument(f"filter must be a dict of metadata values, not {filter!r}")
        if limit is not None and (type(limit) is not int or limit < 0):
            raise InvalidArgument(f"limit must be an int >= 0, not {limit!r}")
        before_id = _checkpoint_id(before, "before") if before is not None else None
        backend = await self._cores.get().backend()
        # The ids come from the server's subject index; only the records that may be returned are
        # read (all of them when a filter must look at their metadata, a page at a time).
        ids = [
            (t, n, cid)
            for t, n, cid in await backend.checkpoint_ids(thread, ns)
            if not ((wanted_id and cid != wanted_id) or (before_id and cid >= before_id))
        ]
        ids.sort(key=lambda i: i[2], reverse=True)
        selected: list[tuple[str, str, str, bytes]] = []
        page = _LIST_PAGE if filter or limit is None else max(limit, 1)
        for start in range(0, len(ids), page):
            if limit is not None and len(selected) >= limit:
                break
            chunk = ids[start : start + page]
            for (t, n, cid), data in zip(chunk, await backend.records(chunk), strict=True):
                if data is None or (limit is not None and len(selected) >= limit):
                    continue  # removed since it was listed
                if filter:
                    stored = _stored_decoder.decode(data)
                    metadata = self.serde.loads_typed((stored.metadata_type, stored.metadata))
                    if not all(metadata.get(k) == v for k, v in filter.items()):
                        continue
                selected.append((t, n, cid, data))
        if not selected:
            return []
        writes: dict[tuple[str, str, str], list[tuple[str, int, bytes]]] = {}
        if len(selected) <= _PER_CHECKPOINT_READS:
            lists = await asyncio.gather(*(backend.writes(t, n, cid) for t, n, cid, _ in selected))
            writes = {(t, n, cid): w for (t, n, cid, _), w in zip(selected, lists, strict=True)}
        else:
            for t, n, cid, task_id, idx, raw in await backend.all_writes(thread, ns):
                writes.setdefault((t, n, cid), []).append((task_id, idx, raw))
        return [self._tuple(t, n, cid, data, writes.get((t, n, cid), [])) for t, n, cid, data in selected]

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store ``checkpoint`` (whole: its channel values included) with ``metadata``, as the
        child of ``config``'s checkpoint; the config naming it."""
        thread = _thread(config)
        conf = _configurable(config)
        ns = _ns(conf)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("id"), str) or not checkpoint["id"]:
            raise InvalidArgument(f"a checkpoint is a dict with a non-empty str 'id', not {checkpoint!r:.200}")
        if not isinstance(metadata, dict):
            raise InvalidArgument(f"checkpoint metadata must be a dict, not {metadata!r:.200}")
        _sized(checkpoint["id"], "the checkpoint's id", _MAX_ID)
        ctype, cdata = self._dump(checkpoint, "checkpoint")
        mtype, mdata = self._dump(get_checkpoint_metadata(config, metadata), "metadata")
        parent = conf.get("checkpoint_id")
        record = _encoder.encode(_Stored(ctype, cdata, mtype, mdata, parent if isinstance(parent, str) else None))
        backend = await self._cores.get().backend()
        try:
            await backend.put_checkpoint(thread, ns, checkpoint["id"], record)
        except ValueTooLarge as exc:
            raise ValueTooLarge(
                f"this checkpoint is {len(record):,} bytes encoded, more than one message of the server may hold "
                "(its max_payload less 16 KiB kept for headers): keep less state in the graph or raise the server's "
                "max_payload; nothing was written"
            ) from exc
        return _config(thread, ns, checkpoint["id"])

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's writes against ``config``'s checkpoint. A regular write already stored
        under the same task and index is kept (the first wins, as in LangGraph's savers);
        errors, interrupts and resumes replace theirs. Each record names the indexes its call
        wrote: a call cut short shows none of its writes until a retry completes it."""
        thread = _thread(config)
        conf = _configurable(config)
        ns = _ns(conf)
        checkpoint_id = conf.get("checkpoint_id")
        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            raise InvalidArgument("put_writes needs the config of a stored checkpoint (with its 'checkpoint_id')")
        if not isinstance(task_id, str) or not isinstance(task_path, str):
            raise InvalidArgument(f"task_id and task_path must be str, not {task_id!r} and {task_path!r}")
        _text(task_path, "task_path")
        _sized(checkpoint_id, "checkpoint_id", _MAX_ID)
        _sized(task_id, "task_id", _MAX_ID)
        dumped = []
        for idx, item in enumerate(writes):
            if not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], str):
                raise InvalidArgument(f"a write is a (channel, value) tuple, not {item!r:.200}")
            channel, value = item
            _text(channel, "a write's channel")
            vtype, vdata = self._dump(value, f"write to {channel!r}")
            dumped.append((WRITES_IDX_MAP.get(channel, idx), channel, vtype, vdata))
        special = tuple((pos, idx) for pos, (idx, *_) in enumerate(dumped) if idx < 0)
        records = [
            (idx, _encoder.encode(_Write(channel, vtype, vdata, task_path, len(dumped), special)))
            for idx, channel, vtype, vdata in dumped
        ]
        if records:
            backend = await self._cores.get().backend()
            await backend.put_writes(thread, ns, checkpoint_id, task_id, records)

    async def adelete_thread(self, thread_id: str) -> None:
        """Remove every checkpoint and write of the thread, in every checkpoint namespace."""
        backend = await self._cores.get().backend()
        await backend.delete_thread(_name(thread_id, "thread_id"))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Remove the checkpoints (and their writes) whose metadata names one of ``run_ids``.
        Reads every checkpoint of the namespace's threads to find them."""
        if isinstance(run_ids, str) or not isinstance(run_ids, Iterable):
            raise InvalidArgument(f"run_ids must be a list of run ids, not {run_ids!r}")
        wanted = {str(r) for r in run_ids}
        if not wanted:
            return
        backend = await self._cores.get().backend()
        doomed = []
        for t, n, cid, data in await backend.checkpoints(None, None):
            stored = _stored_decoder.decode(data)
            metadata = self.serde.loads_typed((stored.metadata_type, stored.metadata))
            if str(metadata.get("run_id")) in wanted:
                doomed.append((t, n, cid))
        await backend.delete_checkpoints(doomed)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and write of one thread to another (its whole parent chain)."""
        source = _name(source_thread_id, "source_thread_id")
        target = _name(target_thread_id, "target_thread_id")
        backend = await self._cores.get().backend()
        await backend.copy_thread(source, target)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``"keep_latest"``: keep only each namespace's latest checkpoint (and its writes) of the
        threads; ``"delete"``: remove the threads."""
        if strategy not in ("keep_latest", "delete"):
            raise InvalidArgument(f"strategy must be 'keep_latest' or 'delete', not {strategy!r}")
        if isinstance(thread_ids, str) or not isinstance(thread_ids, Iterable):
            raise InvalidArgument(f"thread_ids must be a list of thread ids, not {thread_ids!r}")
        threads = [_name(t, "thread_id") for t in thread_ids]
        backend = await self._cores.get().backend()
        for thread in threads:
            if strategy == "delete":
                await backend.delete_thread(thread)
                continue
            by_ns: dict[str, list[str]] = {}
            for _, n, cid in await backend.checkpoint_ids(thread, None):
                by_ns.setdefault(n, []).append(cid)
            doomed = [(thread, n, cid) for n, cids in by_ns.items() for cid in sorted(cids)[:-1]]
            await backend.delete_checkpoints(doomed)

    # -- sync face (the same coroutines on the portal's loop) -------------------------------------
    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return call(self.aget_tuple, config)

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        async def run() -> list[CheckpointTuple]:
            return await self._list(config, filter=filter, before=before, limit=limit)

        return iter(call(run))

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return call(self.aput, config, checkpoint, metadata, new_versions)

    def put_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        call(self.aput_writes, config, writes, task_id, task_path)

    def delete_thread(self, thread_id: str) -> None:
        call(self.adelete_thread, thread_id)

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        call(self.adelete_for_runs, run_ids)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        call(self.acopy_thread, source_thread_id, target_thread_id)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        async def run() -> None:
            await self.aprune(thread_ids, strategy=strategy)

        call(run)


# -- store ---------------------------------------------------------------------------------------
def _escape(label: str) -> str:
    # ':' separates the labels in the memory key, so a label's own ':' (and '%') are escaped.
    return label.replace("%", "%25").replace(":", "%3A")


def _unescape(part: str) -> str:
    return part.replace("%3A", ":").replace("%25", "%")


def _item_key(namespace: tuple[str, ...], key: str) -> str:
    return ":".join(_escape(label) for label in namespace) + ":" + _escape(key)


def _split_key(stored: str) -> tuple[tuple[str, ...], str]:
    parts = [_unescape(p) for p in stored.split(":")]
    return tuple(parts[:-1]), parts[-1]


def _prefix_pattern(prefix: tuple[str, ...]) -> str:
    if not prefix:
        return "*"
    return keys.glob_escape(":".join(_escape(label) for label in prefix)) + ":*"


class _Record(msgspec.Struct):
    """An item as stored: its value, created/updated times (ISO 8601) and TTL (minutes)."""

    value: dict[str, Any]
    created_at: str
    updated_at: str
    ttl: float | None = None


_WORD: Final = re.compile(r"\w+")


def _score(query: str, value: dict[str, Any]) -> float:
    """The share of the query's words found in the value's JSON text (a client-side ranking)."""
    words = set(_WORD.findall(query.lower()))
    if not words:
        return 0.0
    text = set(_WORD.findall(json.dumps(value, default=str).lower()))
    return len(words & text) / len(words)


_OPERATORS: Final = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})  # InMemoryStore's


def _check_operators(condition: object) -> None:
    """``InvalidArgument`` for an operator ``InMemoryStore`` does not know (it raises ValueError
    only once an item reaches it, or never when none does)."""
    if isinstance(condition, dict):
        for k, v in condition.items():
            if isinstance(k, str) and k.startswith("$") and k not in _OPERATORS:
                raise InvalidArgument(f"unknown filter operator {k!r}: use one of {sorted(_OPERATORS)}")
            _check_operators(v)


def _filter_matches(value: dict[str, Any], conditions: dict[str, Any]) -> bool:
    """InMemoryStore's matching, except that an ordering operator on a missing or non-numeric
    field is no match (as a JSONB comparison with NULL in LangGraph's Postgres store) rather than
    a TypeError/ValueError from ``float()`` that fails the whole search."""
    try:
        return all(_compare_values(value.get(k), v) for k, v in conditions.items())
    except (TypeError, ValueError):
        return False


def _is_record(raw: Any) -> bool:
    """Whether a stored value is a store item: the namespace is an ordinary ``Memory`` one, where
    an app may keep keys of its own beside the items."""
    try:
        msgspec.convert(raw, _Record)
    except msgspec.ValidationError:
        return False
    return True


class _Gone(Exception):
    """An item deleted, expired or put with another TTL before its TTL was refreshed."""


class BotWireStore(LoopBound[AsyncMemory], BaseStore):
    """LangGraph's long-term memory (``BaseStore``) in a botwire-stream namespace.

    Each item is one key of ``AsyncMemory(namespace)`` (its namespace labels and key joined by
    ``:``), so it is shared by every process and readable with ``Memory``. Values are dicts that
    msgspec encodes as JSON (else ``InvalidValue``, nothing written). TTLs (minutes, as LangGraph
    counts them) are kept by the server; ``ttl={"refresh_on_read": True}`` (the default) makes a
    read of an item with a TTL write it again to restart its clock. ``search`` and
    ``list_namespaces`` list the matching keys (the server's subject index) and filter
    client-side; ``query`` ranks results by the share of its words found in each value (no
    embeddings). ``default_ttl`` applies to puts that give none (``ttl=None``: never expires).
    """

    supports_ttl: bool = True

    def __init__(
        self,
        namespace: str = "langgraph-store",
        *,
        url: str | None = None,
        ttl: TTLConfig | None = None,
        **connect_options: Any,
    ) -> None:
        if ttl is not None and not isinstance(ttl, dict):
            raise InvalidArgument(f"ttl must be a TTLConfig dict, not {ttl!r}")
        self.namespace = namespace
        self.ttl_config = ttl
        self._cores = memory_cores(namespace, url, connect_options)

    def __repr__(self) -> str:
        return f"BotWireStore({self.namespace!r})"

    def put(
        self,
        namespace: tuple[str, ...],
        key: str,
        value: Mapping[str, Any],
        index: Literal[False] | list[str] | None = None,
        *,
        ttl: float | None | NotProvided = NOT_PROVIDED,
    ) -> None:
        """``BaseStore.put``, with a bad namespace raising ``InvalidNamespace`` (a ``ValueError``)."""
        try:
            super().put(namespace, key, value, index, ttl=ttl)
        except InvalidNamespaceError as exc:
            raise InvalidNamespace(f"{exc}; nothing was written") from exc

    async def aput(
        self,
        namespace: tuple[str, ...],
        key: str,
        value: Mapping[str, Any],
        index: Literal[False] | list[str] | None = None,
        *,
        ttl: float | None | NotProvided = NOT_PROVIDED,
    ) -> None:
        """``BaseStore.aput``, with a bad namespace raising ``InvalidNamespace`` (a ``ValueError``)."""
        try:
            await super().aput(namespace, key, value, index, ttl=ttl)
        except InvalidNamespaceError as exc:
            raise InvalidNamespace(f"{exc}; nothing was written") from exc

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops`` in order; their results."""
        return call(self.abatch, list(ops))

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops`` in order (every op is checked first: a bad one writes nothing); their results."""
        todo = list(ops)
        for op in todo:
            self._check(op)
        memory = self._cores.get()
        results: list[Result] = []
        for op in todo:
            if isinstance(op, GetOp):
                results.append(await self._get(memory, op))
            elif isinstance(op, SearchOp):
                results.append(await self._search(memory, op))
            elif isinstance(op, PutOp):
                await self._put(memory, op)
                results.append(None)
            else:
                assert isinstance(op, ListNamespacesOp)
                results.append(await self._list_namespaces(memory, op))
        return results

    def _check(self, op: object) -> None:
        if not isinstance(op, (GetOp, SearchOp, PutOp, ListNamespacesOp)):
            raise InvalidArgument(f"a store op is a GetOp, SearchOp, PutOp or ListNamespacesOp, not {op!r:.200}")
        try:
            validate_op_namespace(op)
            if isinstance(op, PutOp) and not op.namespace:
                raise InvalidNamespaceError("Namespace cannot be empty.")
            if isinstance(op, PutOp) and op.namespace[0] == "langgraph":
                raise InvalidNamespaceError(f'Root label for namespace cannot be "langgraph". Got: {op.namespace}')
        except InvalidNamespaceError as exc:
            raise InvalidNamespace(f"{exc}; nothing was written") from exc
        if isinstance(op, (GetOp, PutOp)):
            if not op.namespace:
                raise InvalidNamespace("a store namespace is a non-empty tuple of str labels")
            if not isinstance(op.key, str):
                raise InvalidKey(f"a store key is a str, not {op.key!r}")
            keys.check_key(_item_key(op.namespace, op.key))
        if isinstance(op, PutOp):
            if op.value is not None and not isinstance(op.value, Mapping):
                raise InvalidValue(
                    f"a store value is a dict (a Mapping), not {type(op.value).__name__}; nothing was written"
                )
            if op.ttl is not None and (
                isinstance(op.ttl, bool) or not isinstance(op.ttl, (int, float)) or not op.ttl > 0
            ):
                raise InvalidArgument(f"ttl is a positive number of minutes (or None), not {op.ttl!r}")
        if isinstance(op, SearchOp):
            if type(op.limit) is not int or op.limit < 0 or type(op.offset) is not int or op.offset < 0:
                raise InvalidArgument(f"limit and offset must be ints >= 0, not {op.limit!r} and {op.offset!r}")
            if op.filter is not None and not isinstance(op.filter, dict):
                raise InvalidArgument(f"filter must be a dict, not {op.filter!r}")
            _check_operators(op.filter)

    def _item(self, stored_key: str, raw: Any, cls: Callable[..., Item] = Item, **extra: Any) -> Item:
        record = msgspec.convert(raw, _Record)
        namespace, key = _split_key(stored_key)
        return cls(
            value=record.value,
            key=key,
            namespace=namespace,
            created_at=datetime.fromisoformat(record.created_at),
            updated_at=datetime.fromisoformat(record.updated_at),
            **extra,
        )

    def _refresh(self, refresh_ttl: bool | None) -> bool:
        if refresh_ttl is not None:
            return refresh_ttl
        return bool((self.ttl_config or {}).get("refresh_on_read", True))

    async def _touch(self, memory: AsyncMemory, stored_key: str, ttl: float) -> None:
        """Write the item again with its TTL (compare-and-set: a newer write is never undone).

        Only while the stored item still has that TTL: a ``put`` with another one (``ttl=None``
        above all) landing between the read and this write would otherwise get the old TTL back,
        and an item meant to live for ever would expire."""

        def same(old: Any) -> Any:
            if not isinstance(old, dict) or old.get("ttl") != ttl:
                raise _Gone  # deleted, expired, or written again with another TTL: leave it
            return old

        try:
            await memory.update(stored_key, same, ttl=ttl * 60)
        except _Gone:
            pass

    async def _get(self, memory: AsyncMemory, op: GetOp) -> Item | None:
        stored_key = _item_key(op.namespace, op.key)
        raw = await memory.get(stored_key)
        if raw is None:
            return None
        item = self._item(stored_key, raw)
        ttl = raw.get("ttl")
        if ttl and self._refresh(op.refresh_ttl):
            await self._touch(memory, stored_key, ttl)
        return item

    async def _put(self, memory: AsyncMemory, op: PutOp) -> None:
        stored_key = _item_key(op.namespace, op.key)
        if op.value is None:
            await memory.delete(stored_key)
            return
        # put()/aput() already turned "no ttl given" into default_ttl (LangGraph's _ensure_ttl);
        # an explicit None that reaches here means "never expires".
        ttl = op.ttl
        now = datetime.now(UTC).isoformat()
        value = dict(op.value)

        def write(old: Any) -> dict[str, Any]:
            created = old.get("created_at", now) if isinstance(old, dict) else now
            return {"value": value, "created_at": created, "updated_at": now, "ttl": ttl}

        await memory.update(stored_key, write, ttl=None if ttl is None else ttl * 60)

    async def _search(self, memory: AsyncMemory, op: SearchOp) -> list[SearchItem]:
        names = await memory.list_keys(_prefix_pattern(op.namespace_prefix))
        raws = await map_bounded(memory.get, names)
        found: list[tuple[float | None, str, str, Any]] = []
        for stored_key, raw in zip(names, raws, strict=True):
            if not _is_record(raw):
                continue  # deleted or expired since it was listed, or an app's own key
            value = raw["value"]
            if op.filter and not _filter_matches(value, op.filter):
                continue
            score = _score(op.query, value) if op.query else None
            found.append((score, raw.get("updated_at", ""), stored_key, raw))
        found.sort(key=lambda f: (f[0] or 0.0, f[1]), reverse=True)
        page = found[op.offset : op.offset + op.limit]
        if self._refresh(op.refresh_ttl):
            await map_bounded(lambda f: self._touch(memory, f[2], f[3]["ttl"]), [f for f in page if f[3].get("ttl")])
        return [self._item(k, raw, SearchItem, score=score) for score, _, k, raw in page]  # type: ignore[misc]

    async def _list_namespaces(self, memory: AsyncMemory, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        pattern = "*"
        for condition in op.match_conditions or ():
            if condition.match_type == "prefix" and "*" not in condition.path:
                pattern = _prefix_pattern(tuple(condition.path))
        namespaces: set[tuple[str, ...]] = set()
        for stored_key in await memory.list_keys(pattern):
            namespace, _ = _split_key(stored_key)
            if not namespace:
                continue  # a key without ':' is an app's own, never an item (its namespace is not empty)
            if not all(_does_match(c, namespace) for c in op.match_conditions or ()):
                continue
            namespaces.add(namespace[: op.max_depth] if op.max_depth is not None else namespace)
        return sorted(namespaces)[op.offset : op.offset + op.limit]
