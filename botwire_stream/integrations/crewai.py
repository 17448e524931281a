"""CrewAI adapters: a memory storage backend and memory tools, in a botwire-stream namespace.

``pip install 'botwire-stream[crewai]'``, then::

    from crewai import Crew
    from crewai.memory import Memory
    from botwire_stream.integrations.crewai import BotWireStorage, memory_tools

    crew = Crew(agents=..., tasks=..., memory=Memory(storage=BotWireStorage("my-crew"), embedder=...))
    agent = Agent(..., tools=memory_tools("my-crew-facts"))

- ``BotWireStorage``: CrewAI's ``StorageBackend`` (crewai 1.x unified memory). Each record is one
  key of an ``AsyncMemory`` namespace, ``rec:<scope>#<id>``, holding the record and its embedding,
  so concurrent savers never overwrite each other and every process sees the same memories.
  Similarity search runs in this process: cosine similarity between the query embedding and
  the stored embeddings of the records in the searched scope (NATS has no vector index). It
  suits the thousands of records a crew accumulates, not millions.
- ``memory_tools(namespace)``: tools an agent calls to remember, recall, list and forget facts
  (key -> text), like the hosted product's ``memory_tools``; the facts are ``Memory`` keys.

The sync methods (which CrewAI calls, from its background save threads too) run on
botwire-stream's background loop and are thread-safe; the ``a*`` methods run on the caller's loop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Final

try:
    from crewai.memory.storage.backend import EmbeddingDimensionMismatchError
    from crewai.memory.types import MemoryRecord, ScopeInfo
    from crewai.tools import BaseTool
    from pydantic import BaseModel, Field, PrivateAttr
except ImportError as exc:  # tests/test_package.py runs this with crewai blocked
    from ..errors import MissingDependency

    raise MissingDependency(
        "botwire_stream.integrations.crewai needs crewai: pip install 'botwire-stream[crewai]'"
    ) from exc

from .. import keys
from ..errors import BotWireError, InvalidArgument, InvalidValue
from ..memory import AsyncMemory
from ..portal import call
from ..sync import Memory as SyncMemory
from ._base import LoopBound, map_bounded, memory_cores

__all__ = ["BotWireStorage", "memory_tools"]

_PREFIX: Final = "rec:"
_SEP: Final = "#"  # between scope and id: the id is what follows the last one
_FORMAT: Final = 1


def _norm_scope(scope: object, name: str = "scope") -> str:
    """``"/a//b/"`` -> ``"/a/b"``; ``"a"`` -> ``"/a"``; root is ``"/"`` (CrewAI's ``normalize_scope_path``)."""
    if not isinstance(scope, str):
        raise InvalidArgument(f"{name} must be a str path like '/project/alpha', not {type(scope).__name__}")
    scope = re.sub(r"/+", "/", scope.strip()).rstrip("/")
    if not scope:
        return "/"
    return scope if scope.startswith("/") else "/" + scope


def _in_scope(scope: str, prefix: str | None) -> bool:
    """Whether ``scope`` is ``prefix`` or below it (path segments: ``/a`` holds ``/a/b``, not ``/ab``)."""
    if prefix is None:
        return True
    p = _norm_scope(prefix, "scope_prefix")
    return p == "/" or scope == p or scope.startswith(p + "/")


def _key(scope: str, record_id: str) -> str:
    return f"{_PREFIX}{scope}{_SEP}{record_id}"


def _split(key: str) -> tuple[str, str]:
    """``(scope, id)`` of a record key."""
    scope, _, record_id = key[len(_PREFIX) :].rpartition(_SEP)
    return scope, record_id


def _check_record(record: object) -> MemoryRecord:
    if not isinstance(record, MemoryRecord):
        raise InvalidValue(f"a CrewAI storage holds MemoryRecord objects, not {type(record).__name__}")
    if not isinstance(record.id, str) or not record.id or _SEP in record.id:
        raise InvalidArgument(f"record id {record.id!r} must be a non-empty str without {_SEP!r}")
    if record.embedding is not None:
        _check_vector(record.embedding, "the record's embedding")
    keys.check_key(_key(_norm_scope(record.scope), record.id))  # InvalidKey before anything is written
    return record


def _check_vector(vector: object, name: str) -> list[float]:
    if isinstance(vector, (str, bytes, Mapping)) or not isinstance(vector, Sequence) or not vector:
        raise InvalidArgument(f"{name} must be a non-empty list of numbers")
    out = []
    for x in vector:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise InvalidArgument(f"{name} holds {x!r}; it must hold finite numbers only")
        out.append(float(x))
    return out


def _check_limit(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(f"{name} must be an int >= {low}, not {value!r}")
    return value


def _stored(record: MemoryRecord) -> dict[str, Any]:
    # MemoryRecord excludes its embedding from dumps; it is kept beside the record.
    return {"format": _FORMAT, "record": record.model_dump(mode="json"), "embedding": record.embedding}


def _record(value: Any) -> MemoryRecord | None:
    """The record of a stored value, or None when it is not one of ours (or deleted meanwhile)."""
    if not isinstance(value, dict) or value.get("format") != _FORMAT:
        return None
    return MemoryRecord.model_validate({**value["record"], "embedding": value.get("embedding")})


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _matches(
    record: MemoryRecord,
    categories: list[str] | None,
    metadata_filter: dict[str, Any] | None,
    older_than: datetime | None = None,
) -> bool:
    if categories and not any(c in record.categories for c in categories):
        return False
    if metadata_filter and not all(record.metadata.get(k) == v for k, v in metadata_filter.items()):
        return False
    return older_than is None or _aware(record.created_at) < _aware(older_than)


class BotWireStorage(LoopBound[AsyncMemory]):
    """CrewAI's memory ``StorageBackend`` in a botwire-stream namespace (see the module doc).

    ``Memory(storage=BotWireStorage("my-crew"), embedder=...)``. Scopes are paths: a
    ``scope_prefix`` of ``/a`` covers ``/a`` and ``/a/b``, not ``/ab``. ``search`` scores records
    by cosine similarity (clipped to 0..1) with ``query_embedding``; records without an embedding
    are not returned by it. Filters combine with AND: ``categories`` (any of them),
    ``metadata_filter`` (every pair equal), ``record_ids``, ``older_than`` (``created_at``
    before it). ``connect_options`` are those of ``AsyncMemory`` (``token``, ``creds``, ``cache``...).
    """

    def __init__(self, namespace: str = "crewai-memory", *, url: str | None = None, **connect_options: Any) -> None:
        self.namespace = namespace
        self._cores = memory_cores(namespace, url, connect_options)

    def __repr__(self) -> str:
        return f"BotWireStorage({self.namespace!r})"

    # -- sync face (what CrewAI calls) ---------------------------------------------------------------
    def save(self, records: list[MemoryRecord]) -> None:
        """Store the records (a record with the same id and scope is replaced)."""
        call(self.asave, records)

    def search(
        self,
        query_embedding: list[float],
        scope_prefix: str | None = None,
        categories: list[str] | None = None,
        metadata_filter: dict[str, Any] | None = None,
        limit: int = 10,
        min_score: float = 0.0,
    ) -> list[tuple[MemoryRecord, float]]:
        """The ``limit`` most similar records with a score >= ``min_score``, best first."""
        return call(self.asearch, query_embedding, scope_prefix, categories, metadata_filter, limit, min_score)

    def delete(
        self,
        scope_prefix: str | None = None,
        categories: list[str] | None = None,
        record_ids: list[str] | None = None,
        older_than: datetime | None = None,
        metadata_filter: dict[str, Any] | None = None,
    ) -> int:
        """Delete the records matching every given criterion; the number deleted."""
        return call(self.adelete, scope_prefix, categories, record_ids, older_than, metadata_filter)

    def update(self, record: MemoryRecord) -> None:
        """Replace the record with the same id (wherever its scope was)."""
        call(self.aupdate, record)

    def get_record(self, record_id: str) -> MemoryRecord | None:
        """The record with this id, or None."""
        return call(self.aget_record, record_id)

    def list_records(self, scope_prefix: str | None = None, limit: int = 200, offset: int = 0) -> list[MemoryRecord]:
        """The records in the scope, newest first (``created_at``)."""
        return call(self.alist_records, scope_prefix, limit, offset)

    def get_scope_info(self, scope: str) -> ScopeInfo:
        """Record count, categories, oldest/newest and child scopes of ``scope`` (and below)."""
        return call(self.aget_scope_info, scope)

    def list_scopes(self, parent: str = "/") -> list[str]:
        """The immediate child scopes of ``parent`` that hold records (at any depth), sorted."""
        return call(self.alist_scopes, parent)

    def list_categories(self, scope_prefix: str | None = None) -> dict[str, int]:
        """How many records of the scope carry each category."""
        return call(self.alist_categories, scope_prefix)

    def count(self, scope_prefix: str | None = None) -> int:
        """The number of records in the scope (and below)."""
        return call(self.acount, scope_prefix)

    def reset(self, scope_prefix: str | None = None) -> None:
        """Delete every record in the scope (None or ``/``: all of this storage's records)."""
        call(self.areset, scope_prefix)

    def touch_records(self, record_ids: list[str]) -> None:
        """Set ``last_accessed`` of the records to now (CrewAI calls this after a recall)."""
        call(self.atouch_records, record_ids)

    # -- native async face ---------------------------------------------------------------------
    async def _keys(self, scope_prefix: str | None = None) -> list[str]:
        found = await self._cores.get().list_keys(_PREFIX + "*")
        return [k for k in found if _in_scope(_split(k)[0], scope_prefix)]

    async def _load(self, record_keys: list[str]) -> list[tuple[str, MemoryRecord]]:
        values = await map_bounded(self._cores.get().get, record_keys)
        out = []
        for key, value in zip(record_keys, values, strict=True):
            record = _record(value)
            if record is not None:
                out.append((key, record))
        return out

    async def _records(self, scope_prefix: str | None) -> list[tuple[str, MemoryRecord]]:
        return await self._load(await self._keys(scope_prefix))

    async def asave(self, records: list[MemoryRecord]) -> None:
        """Store the records; a bad one raises before any is written."""
        if isinstance(records, MemoryRecord) or not isinstance(records, Iterable):
            raise InvalidValue("save takes a list of MemoryRecord objects")
        checked = [_check_record(r) for r in records]
        # As CrewAI's LanceDB backend: one batch holds one embedding dimension (a record of
        # another would make every later search of its scope raise the mismatch).
        dims = [len(r.embedding) for r in checked if r.embedding is not None]
        if any(d != dims[0] for d in dims):
            raise EmbeddingDimensionMismatchError(dims[0], next(d for d in dims if d != dims[0]))
        core = self._cores.get()

        async def put(record: MemoryRecord) -> int:
            return await core.set(_key(_norm_scope(record.scope), record.id), _stored(record))

        await map_bounded(put, checked)

    async def asearch(
        self,
        query_embedding: list[float],
        scope_prefix: str | None = None,
        categories: list[str] | None = None,
        metadata_filter: dict[str, Any] | None = None,
        limit: int = 10,
        min_score: float = 0.0,
    ) -> list[tuple[MemoryRecord, float]]:
        """The ``limit`` most similar records with a score >= ``min_score``, best first."""
        query = _check_vector(query_embedding, "query_embedding")
        _check_limit(limit, "limit", 1)
        scored = []
        for _, record in await self._records(scope_prefix):
            if record.embedding is None or not _matches(record, categories, metadata_filter):
                continue
            if len(record.embedding) != len(query):
                raise EmbeddingDimensionMismatchError(len(record.embedding), len(query))
            score = max(0.0, min(1.0, _cosine(query, record.embedding)))
            if score >= min_score:
                scored.append((record, score))
        scored.sort(key=lambda pair: pair[1], reverse=True)
        return scored[:limit]

    async def adelete(
        self,
        scope_prefix: str | None = None,
        categories: list[str] | None = None,
        record_ids: list[str] | None = None,
        older_than: datetime | None = None,
        metadata_filter: dict[str, Any] | None = None,
    ) -> int:
        """Delete the records matching every given criterion; the number deleted."""
        if older_than is not None and not isinstance(older_than, datetime):
            raise InvalidArgument(f"older_than must be a datetime, not {type(older_than).__name__}")
        found = await self._keys(scope_prefix)
        if record_ids is not None:
            wanted = set(record_ids)
            found = [k for k in found if _split(k)[1] in wanted]
        if categories or metadata_filter or older_than is not None:
            found = [k for k, r in await self._load(found) if _matches(r, categories, metadata_filter, older_than)]
        deleted = await map_bounded(self._cores.get().delete, found)
        return sum(deleted)

    async def aupdate(self, record: MemoryRecord) -> None:
        """Replace the record with the same id (a changed scope moves it)."""
        record = _check_record(record)
        new_key = _key(_norm_scope(record.scope), record.id)
        core = self._cores.get()
        await core.set(new_key, _stored(record))
        stale = [k for k in await self._keys() if _split(k)[1] == record.id and k != new_key]
        await map_bounded(core.delete, stale)

    async def aget_record(self, record_id: str) -> MemoryRecord | None:
        """The record with this id, or None."""
        found = [k for k in await self._keys() if _split(k)[1] == record_id]
        loaded = await self._load(found)
        return loaded[0][1] if loaded else None

    async def alist_records(
        self, scope_prefix: str | None = None, limit: int = 200, offset: int = 0
    ) -> list[MemoryRecord]:
        """The records in the scope, newest first (``created_at``)."""
        _check_limit(limit, "limit", 0)
        _check_limit(offset, "offset", 0)
        records = [r for _, r in await self._records(scope_prefix)]
        records.sort(key=lambda r: _aware(r.created_at), reverse=True)
        return records[offset : offset + limit]

    async def aget_scope_info(self, scope: str) -> ScopeInfo:
        """Record count, categories, oldest/newest and child scopes of ``scope`` (and below)."""
        path = _norm_scope(scope)
        records = [r for _, r in await self._records(path)]
        # returned as stored (CrewAI's own records carry naive UTC times); compared as UTC
        created = sorted((r.created_at for r in records), key=_aware)
        return ScopeInfo(
            path=path,
            record_count=len(records),
            categories=sorted({c for r in records for c in r.categories}),
            oldest_record=created[0] if created else None,
            newest_record=created[-1] if created else None,
            child_scopes=_children(path, [_norm_scope(r.scope) for r in records]),
        )

    async def alist_scopes(self, parent: str = "/") -> list[str]:
        """The immediate child scopes of ``parent`` that hold records (at any depth), sorted."""
        path = _norm_scope(parent, "parent")
        return _children(path, [_split(k)[0] for k in await self._keys(path)])

    async def alist_categories(self, scope_prefix: str | None = None) -> dict[str, int]:
        """How many records of the scope carry each category."""
        counts: dict[str, int] = {}
        for _, record in await self._records(scope_prefix):
            for category in record.categories:
                counts[category] = counts.get(category, 0) + 1
        return counts

    async def acount(self, scope_prefix: str | None = None) -> int:
        """The number of records in the scope (and below); reads keys only."""
        return len(await self._keys(scope_prefix))

    async def areset(self, scope_prefix: str | None = None) -> None:
        """Delete every record in the scope (None or ``/``: all of this storage's records)."""
        await map_bounded(self._cores.get().delete, await self._keys(scope_prefix))

    async def atouch_records(self, record_ids: list[str]) -> None:
        """Set ``last_accessed`` of the records to now."""
        wanted = set(record_ids)
        now = datetime.now(timezone.utc)
        core = self._cores.get()

        def touch(value: Any) -> Any:
            record = _record(value)
            if record is None:
                # deleted meanwhile (a reset or delete racing): returning the None would store
                # a null under the key, a record that count() and list_scopes() still see
                raise _Gone
            # CrewAI writes naive UTC times (datetime.utcnow): keep the record's convention
            stamp = now if record.last_accessed.tzinfo is not None else now.replace(tzinfo=None)
            return _stored(record.model_copy(update={"last_accessed": stamp}))

        async def one(key: str) -> Any:
            try:
                return await core.update(key, touch)
            except _Gone:
                return None

        await map_bounded(one, [k for k in await self._keys() if _split(k)[1] in wanted])


class _Gone(Exception):
    """A record deleted before its ``last_accessed`` was set."""


def _children(parent: str, scopes: Iterable[str]) -> list[str]:
    base = "/" if parent == "/" else parent + "/"
    return sorted({base + s[len(base) :].split("/", 1)[0] for s in scopes if s.startswith(base) and s != base})


# -- memory tools ------------------------------------------------------------------------------
class _KeyValue(BaseModel):
    key: str = Field(description="A short name for the fact, e.g. 'user_name' or 'project:deadline'.")
    value: str = Field(description="The fact to keep, as text.")


class _Key(BaseModel):
    key: str = Field(description="The name the fact was stored under.")


class _Pattern(BaseModel):
    pattern: str = Field(default="*", description="A glob over the names, e.g. 'project:*'; '*' for all.")


class _MemoryTool(BaseTool):
    """A CrewAI tool over a botwire-stream ``Memory`` (the sync face: CrewAI runs tools in threads)."""

    _memory: SyncMemory = PrivateAttr()

    def bind(self, memory: SyncMemory) -> _MemoryTool:
        self._memory = memory
        return self


def _answer(act: Callable[[], str]) -> str:
    """``act()``, or the error as the tool's answer: the key or pattern comes from an LLM, which
    reads the answer and can correct itself; a bad one writes nothing."""
    try:
        return act()
    except BotWireError as exc:
        return f"error: {exc}"


class _Remember(_MemoryTool):
    name: str = "Remember a fact"
    description: str = "Store a fact (text) under a key in persistent memory, replacing what was there."
    args_schema: type[BaseModel] = _KeyValue

    def _run(self, key: str, value: str) -> str:
        def act() -> str:
            self._memory.set(key, value)
            return f"stored {key!r}"

        return _answer(act)


class _Recall(_MemoryTool):
    name: str = "Recall a fact"
    description: str = "Fetch the fact stored under a key; answers 'not found' when there is none."
    args_schema: type[BaseModel] = _Key

    def _run(self, key: str) -> str:
        def act() -> str:
            value = self._memory.get(key)
            return "not found" if value is None else value if isinstance(value, str) else repr(value)

        return _answer(act)


class _List(_MemoryTool):
    name: str = "List remembered keys"
    description: str = "List the keys of the facts in memory (optionally those matching a glob)."
    args_schema: type[BaseModel] = _Pattern

    def _run(self, pattern: str = "*") -> str:
        return _answer(lambda: ", ".join(self._memory.list_keys(pattern)) or "(empty)")


class _Forget(_MemoryTool):
    name: str = "Forget a fact"
    description: str = "Delete the fact stored under a key."
    args_schema: type[BaseModel] = _Key

    def _run(self, key: str) -> str:
        return _answer(lambda: f"forgot {key!r}" if self._memory.delete(key) else f"{key!r} was not in memory")


def memory_tools(namespace: str, *, url: str | None = None, **connect_options: Any) -> list[BaseTool]:
    """Four CrewAI tools over the namespace: remember, recall, list and forget facts.

    ``Agent(..., tools=memory_tools("research-crew"))``. Facts are ``Memory`` keys holding text,
    so an app reads them with ``Memory("research-crew").get(key)``. The tools' names are those of
    the hosted product's ``memory_tools`` plus "Forget a fact". A bad namespace raises now.
    """
    memory = SyncMemory(namespace, url=url, **connect_options)
    return [tool().bind(memory) for tool in (_Remember, _Recall, _List, _Forget)]
