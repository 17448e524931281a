"""The LangGraph adapters with real LangGraph graphs, a real nats-server and real processes.

The checkpointer's conformance suite runs in ``test_langgraph_conformance.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langgraph")

from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.store.base import GetOp, ListNamespacesOp, PutOp, SearchOp  # noqa: E402

from botwire_stream import AsyncMemory, Memory  # noqa: E402
from botwire_stream.errors import InvalidArgument, InvalidKey, InvalidNamespace, InvalidValue, ValueTooLarge  # noqa: E402
from botwire_stream.integrations.langgraph import BotWireSaver, BotWireStore  # noqa: E402
from tests import langgraph_workers, procs  # noqa: E402


@pytest.fixture
def saver(url: str, namespace: str) -> Iterator[BotWireSaver]:
    s = BotWireSaver(namespace, url=url)
    yield s
    s.close()


@pytest.fixture
async def asaver(url: str, namespace: str) -> AsyncIterator[BotWireSaver]:
    s = BotWireSaver(namespace, url=url)
    yield s
    await s.aclose()


@pytest.fixture
def store(url: str, namespace: str) -> Iterator[BotWireStore]:
    s = BotWireStore(namespace, url=url)
    yield s
    s.close()


def _cfg(thread: str, checkpoint_id: str | None = None, ns: str = "") -> dict[str, Any]:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def _checkpoint(values: dict[str, Any]) -> Any:
    cp = empty_checkpoint()
    cp["channel_values"] = values
    cp["channel_versions"] = {k: 1 for k in values}
    return cp


# -- a real graph across processes ---------------------------------------------------------------------
@pytest.mark.slow
def test_graph_interrupted_in_one_process_resumes_in_another(url: str, namespace: str) -> None:
    first = langgraph_workers.run("start", url, namespace, "refund-42")
    assert first["interrupts"] == [{"draft": "Draft: refund order 42 in full."}]
    assert first["next"] == ["review"]
    assert first["calls"] == [1, 0]

    second = langgraph_workers.run("resume", url, namespace, "refund-42", "approved by alice")
    # The new process found the thread waiting at the review with the same question...
    assert second["waiting"] == ["review"]
    assert second["pending"] == [{"draft": "Draft: refund order 42 in full."}]
    # ... resumed from the checkpoint without drafting again, and finished.
    assert second["calls"] == [0, 1]
    assert second["messages"] == [
        ["human", "Can I get a refund for order 42?"],
        ["ai", "Draft: refund order 42 in full."],
        ["human", "decision: approved by alice"],
        ["ai", "Refund sent for order 42."],
    ]
    assert second["next"] == []
    # The node's store write is long-term memory: visible to this process, through the store and
    # as a plain key of the namespace.
    assert second["stored"] == {"decision": "decision: approved by alice"}
    with BotWireStore(namespace, url=url) as store:
        item = store.get(("decisions", "ada"), "refund-42")
    assert item is not None and item.value == {"decision": "decision: approved by alice"}
    assert Memory(namespace, url=url).list_keys() == ["decisions:ada:refund-42"]
    # Every step was checkpointed: input, start, draft, review (interrupted), then send.
    assert second["checkpoints"] >= 5


# -- concurrency ---------------------------------------------------------------------------------------
@pytest.mark.slow
async def test_concurrent_writers_lose_nothing(url: str, namespace: str, tmp_path: Path) -> None:
    """Two processes and eight tasks of this one run graphs at once on one namespace: every thread
    ends complete, with exactly the checkpoints an in-memory saver records for the same run."""
    go = tmp_path / "go"
    reference = langgraph_workers.counter_graph(url, namespace)
    reference.checkpointer = InMemorySaver()
    ref_cfg = _cfg("ref")
    await reference.ainvoke({"n": 0, "seen": []}, ref_cfg)
    expected = [(c.metadata["step"], c.checkpoint["channel_values"]) for c in reference.checkpointer.list(ref_cfg)]

    graph = langgraph_workers.counter_graph(url, namespace)

    async def local() -> list[int]:
        while not go.exists():
            await asyncio.sleep(0.01)
        outs = await asyncio.gather(*(graph.ainvoke({"n": 0, "seen": []}, _cfg(f"here-{i}")) for i in range(8)))
        return [o["n"] for o in outs]

    commands = [["count-threads", url, namespace, f"p{k}", "4", str(go)] for k in range(2)]
    here, remote = await asyncio.gather(
        local(), asyncio.to_thread(procs.run_together, "tests.langgraph_workers", commands, go)
    )
    assert here == [5] * 8 and remote == [[5] * 4, [5] * 4]

    saver = BotWireSaver(namespace, url=url)
    threads = [f"here-{i}" for i in range(8)] + [f"p{k}-{i}" for k in range(2) for i in range(4)]
    for thread in threads:
        stored = [(c.metadata["step"], c.checkpoint["channel_values"]) async for c in saver.alist(_cfg(thread))]
        assert stored == expected, thread
        latest = await saver.aget_tuple(_cfg(thread))
        assert latest is not None and latest.checkpoint["channel_values"]["n"] == 5
    await saver.aclose()


async def test_concurrent_pending_writes_to_one_checkpoint_are_all_kept(asaver: BotWireSaver) -> None:
    stored = await asaver.aput(_cfg("t"), _checkpoint({"a": 1}), {"step": 0}, {"a": 1})
    await asyncio.gather(*(asaver.aput_writes(stored, [("a", i), ("b", -i)], f"task-{i}") for i in range(32)))
    tup = await asaver.aget_tuple(stored)
    assert tup is not None
    assert sorted(tup.pending_writes) == sorted(
        (f"task-{i}", ch, v) for i in range(32) for ch, v in (("a", i), ("b", -i))
    )
    # A task's regular write is kept as first stored (a re-run of the task does not replace it);
    # special writes (errors, interrupts) replace theirs.
    await asaver.aput_writes(stored, [("a", "again")], "task-0")
    await asaver.aput_writes(stored, [("__error__", "first")], "task-0")
    await asaver.aput_writes(stored, [("__error__", "second")], "task-0")
    tup = await asaver.aget_tuple(stored)
    assert tup is not None
    mine = [w for w in tup.pending_writes if w[0] == "task-0"]
    assert sorted(mine, key=str) == sorted(
        [("task-0", "a", 0), ("task-0", "b", 0), ("task-0", "__error__", "second")], key=str
    )


async def test_latest_has_its_writes_whatever_the_order_they_were_stored_in(asaver: BotWireSaver) -> None:
    """LangGraph saves a checkpoint and the writes against it in the background, in no set order
    (durability="async"): writes stored before their checkpoint are still its pending writes."""
    from botwire_stream.nats import checkpoints

    cp1 = _checkpoint({"a": 1})
    early = _cfg("t", cp1["id"])
    await asaver.aput_writes(early, [("a", "before its checkpoint")], "task-1")
    stored1 = await asaver.aput(_cfg("t"), cp1, {"step": 0}, {"a": 1})
    await asaver.aput_writes(stored1, [("a", "after it")], "task-2")
    for forget in (False, True):  # this process knows the latest id / a new process does not
        if forget:
            checkpoints._latest_ids.clear()
        tup = await asaver.aget_tuple(_cfg("t"))
        assert tup is not None and tup.config == stored1
        assert sorted(tup.pending_writes) == [("task-1", "a", "before its checkpoint"), ("task-2", "a", "after it")]
    # Another process stored a newer checkpoint: the id this process remembers is stale.
    remembered = dict(checkpoints._latest_ids)
    cp2 = _checkpoint({"a": 2})
    await asaver.aput_writes(_cfg("t", cp2["id"]), [("a", "w2")], "task-3")
    stored2 = await asaver.aput(stored1, cp2, {"step": 1}, {"a": 2})
    checkpoints._latest_ids.update(remembered)
    tup = await asaver.aget_tuple(_cfg("t"))
    assert tup is not None and tup.config == stored2 and tup.pending_writes == [("task-3", "a", "w2")]
    assert tup.parent_config == stored1


# -- the sync face and listing -------------------------------------------------------------------------
def test_sync_face_lists_newest_first_with_filters_before_and_limit(saver: BotWireSaver) -> None:
    ids = []
    parent: dict[str, Any] = _cfg("t1")
    for step in range(5):
        parent = saver.put(
            parent,
            _checkpoint({"step": step}),
            {"step": step, "source": "loop", "user": "ada" if step % 2 else "bob"},
            {"step": 1},
        )
        ids.append(parent["configurable"]["checkpoint_id"])
    saver.put(_cfg("t1", ns="child"), _checkpoint({"x": 1}), {"step": 0}, {"x": 1})
    saver.put(_cfg("t2"), _checkpoint({"x": 2}), {"step": 0}, {"x": 1})

    listed = [c.config["configurable"]["checkpoint_id"] for c in saver.list(_cfg("t1"))]
    assert listed == ids[::-1]  # checkpoint_ns "" only, newest first
    assert [c.metadata["step"] for c in saver.list(_cfg("t1"), filter={"user": "ada"})] == [3, 1]
    assert [c.metadata["step"] for c in saver.list(_cfg("t1"), before=_cfg("t1", ids[3]), limit=2)] == [2, 1]
    assert len(list(saver.list({"configurable": {"thread_id": "t1"}}))) == 6  # every checkpoint_ns
    assert {c.config["configurable"]["thread_id"] for c in saver.list(None)} == {"t1", "t2"}

    latest = saver.get_tuple(_cfg("t1"))
    assert latest is not None and latest.checkpoint["channel_values"] == {"step": 4}
    assert latest.parent_config == _cfg("t1", ids[3])
    saver.delete_thread("t1")
    assert saver.get_tuple(_cfg("t1")) is None and list(saver.list(_cfg("t1"))) == []
    assert saver.get_tuple(_cfg("t2")) is not None


async def test_list_agrees_with_in_memory_saver_across_pages(asaver: BotWireSaver) -> None:
    """300 checkpoints (more than one page of records) in two threads and two namespaces, some
    with writes: every list query gives what LangGraph's InMemorySaver gives for the same puts,
    newest first across threads too (as LangGraph's SQL savers order them; InMemorySaver groups
    them by thread)."""
    reference = InMemorySaver()
    parents: dict[tuple[str, str], Any] = {}
    ids = []
    for i in range(300):
        key = (f"t{i % 2}", "" if i % 3 else "sub")
        config = parents.get(key, _cfg(*key[:1], ns=key[1]))
        cp = _checkpoint({"i": i})
        cp["channel_versions"] = {"i": i + 1}  # InMemorySaver keeps values per channel version
        meta = {"step": i, "source": "loop", "kind": i % 5}
        for saver in (asaver, reference):
            stored = await saver.aput(config, cp, meta, {"i": i + 1})
            if i % 7 == 0:
                await saver.aput_writes(stored, [("i", -i), ("x", f"w{i}")], f"task-{i}")
        parents[key] = stored
        ids.append(stored)

    def view(tuples: list[Any]) -> list[Any]:
        return [
            (t.config, t.checkpoint["channel_values"], t.metadata, sorted(t.pending_writes), t.parent_config)
            for t in tuples
        ]

    queries: list[tuple[Any, dict[str, Any]]] = [
        (None, {}),
        (_cfg("t0"), {}),
        ({"configurable": {"thread_id": "t1"}}, {}),
        (_cfg("t1", ns="sub"), {"limit": 3}),
        (None, {"filter": {"kind": 2}, "limit": 40}),
        (_cfg("t0"), {"filter": {"kind": 0}}),
        (None, {"before": ids[150], "limit": 5}),
        ({"configurable": {"thread_id": "t0"}}, {"before": ids[299], "filter": {"kind": 4}, "limit": 30}),
        (_cfg("t0"), {"limit": 0}),
        (ids[10], {}),
    ]
    for config, kwargs in queries:
        ours = [t async for t in asaver.alist(config, **kwargs)]
        limit = kwargs.pop("limit", None)
        theirs = sorted(reference.list(config, **kwargs), key=lambda t: t.config["configurable"]["checkpoint_id"])
        theirs = theirs[::-1][:limit]
        assert view(ours) == view(theirs), (config, kwargs)


def test_names_of_any_shape_stay_apart(saver: BotWireSaver) -> None:
    # Thread ids and namespaces that look like subject syntax, or are empty, never mix.
    threads = ["a.b", "a", "a.*", ">", "ü 1", ""]
    for t in threads:
        saver.put(_cfg(t, ns="x.y"), _checkpoint({"t": t}), {"step": 0}, {"t": 1})
    for t in threads:
        tup = saver.get_tuple(_cfg(t, ns="x.y"))
        assert tup is not None and tup.checkpoint["channel_values"] == {"t": t}
        assert saver.get_tuple(_cfg(t, ns="x")) is None
    saver.delete_thread("a")
    assert saver.get_tuple(_cfg("a", ns="x.y")) is None
    assert saver.get_tuple(_cfg("a.b", ns="x.y")) is not None


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_input_raises_and_writes_nothing(saver: BotWireSaver, url: str, namespace: str) -> None:
    good = _checkpoint({"a": 1})
    with pytest.raises(InvalidArgument, match="thread"):
        saver.put({"configurable": {}}, good, {}, {})
    with pytest.raises(InvalidArgument):
        saver.get_tuple({"thread_id": "t"})  # type: ignore[typeddict-item]
    with pytest.raises(InvalidArgument, match="id"):
        saver.put(_cfg("t"), {"v": 1}, {}, {})  # type: ignore[typeddict-item]
    with pytest.raises(InvalidValue, match="nothing was written"):
        saver.put(_cfg("t"), _checkpoint({"a": object()}), {"step": 0}, {"a": 1})
    with pytest.raises(InvalidArgument, match="checkpoint_id"):
        saver.put_writes(_cfg("t"), [("a", 1)], "task")
    stored = saver.put(_cfg("t2"), good, {"step": 0}, {"a": 1})
    with pytest.raises(InvalidValue):
        saver.put_writes(stored, [("a", 1), ("b", lambda: 1)], "task")
    with pytest.raises(InvalidArgument, match="512"):  # a name past what a subject may carry
        saver.put(_cfg("t" * 600), good, {"step": 0}, {"a": 1})
    with pytest.raises(InvalidArgument, match="256"):
        saver.put_writes(stored, [("a", 1)], "task" * 100)
    with pytest.raises(InvalidArgument, match="str"):
        saver.get_tuple({"configurable": {"thread_id": 1.5}})
    with pytest.raises(InvalidArgument, match="strategy"):
        saver.prune(["t2"], strategy="keep_oldest")
    with pytest.raises(InvalidNamespace):
        BotWireSaver("bad namespace!", url=url)
    with pytest.raises(InvalidArgument, match="NATS"):
        BotWireSaver(namespace, url="http://127.0.0.1:1")
    with pytest.raises(ValueTooLarge, match="max_payload"):  # one checkpoint is one message (1 MiB here)
        saver.put(_cfg("t"), _checkpoint({"a": "x" * 2_000_000}), {"step": 0}, {"a": 1})
    assert saver.get_tuple(_cfg("t")) is None
    tup = saver.get_tuple(stored)
    assert tup is not None and tup.pending_writes == []  # the bad batch stored none of its writes


def test_store_bad_input_raises_and_writes_nothing(store: BotWireStore, url: str, namespace: str) -> None:
    for ns in [("langgraph", "x"), ("a.b",), ("",), ()]:
        with pytest.raises(InvalidNamespace):
            store.put(ns, "k", {"v": 1})
    with pytest.raises(InvalidValue):
        store.put(("a",), "k", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(InvalidValue):
        store.put(("a",), "k", {"v": object()})  # JSON has no such value
    with pytest.raises(InvalidKey):
        store.put(("a",), "k" * 2000, {"v": 1})
    with pytest.raises(InvalidArgument):
        store.put(("a",), "k", {"v": 1}, ttl=-1)
    with pytest.raises(InvalidNamespace):  # one bad op in a batch: none runs
        store.batch([PutOp(("a",), "k", {"v": 1}), PutOp(("a.b",), "k", {"v": 1})])
    assert Memory(namespace, url=url).list_keys() == []


# -- the store -----------------------------------------------------------------------------------------
def test_store_put_get_delete_and_batch(store: BotWireStore) -> None:
    store.put(("users", "ada"), "prefs", {"theme": "dark"})
    first = store.get(("users", "ada"), "prefs")
    assert first is not None and first.value == {"theme": "dark"} and first.namespace == ("users", "ada")
    store.put(("users", "ada"), "prefs", {"theme": "light"})
    second = store.get(("users", "ada"), "prefs")
    assert second is not None and second.value == {"theme": "light"}
    assert second.created_at == first.created_at and second.updated_at > first.updated_at
    # Labels and keys with the separator, '%' or glob characters stay apart.
    store.put(("users", "a:b"), "c", {"n": 1})
    store.put(("users", "a"), "b:c", {"n": 2})
    store.put(("users", "a%3Ab"), "*", {"n": 3})
    assert store.get(("users", "a:b"), "c").value == {"n": 1}  # type: ignore[union-attr]
    assert store.get(("users", "a"), "b:c").value == {"n": 2}  # type: ignore[union-attr]
    assert store.get(("users", "a%3Ab"), "*").value == {"n": 3}  # type: ignore[union-attr]
    store.delete(("users", "ada"), "prefs")
    assert store.get(("users", "ada"), "prefs") is None
    results = store.batch(
        [PutOp(("b",), "k", {"v": 1}), GetOp(("b",), "k"), PutOp(("b",), "k", None), GetOp(("b",), "k")]
    )
    assert results[0] is None and results[1].value == {"v": 1} and results[2] is None and results[3] is None  # type: ignore[union-attr]


async def test_store_search_filters_query_and_pages(url: str, namespace: str) -> None:
    async with BotWireStore(namespace, url=url) as store:
        await store.aput(("docs", "ada"), "1", {"text": "cats purr softly", "stars": 5, "meta": {"lang": "en"}})
        await store.aput(("docs", "ada"), "2", {"text": "dogs bark loudly", "stars": 3, "meta": {"lang": "en"}})
        await store.aput(("docs", "ada", "old"), "3", {"text": "cats and dogs", "stars": 4, "meta": {"lang": "fr"}})
        await store.aput(("docs", "bob"), "4", {"text": "cats", "stars": 1})
        assert {i.key for i in await store.asearch(("docs", "ada"))} == {"1", "2", "3"}  # descendants too
        assert {i.key for i in await store.asearch(("docs",), filter={"stars": {"$gte": 4}})} == {"1", "3"}
        assert {i.key for i in await store.asearch(("docs",), filter={"meta": {"lang": "en"}})} == {"1", "2"}
        ranked = await store.asearch(("docs", "ada"), query="cats dogs")
        assert [i.key for i in ranked][:1] == ["3"] and ranked[0].score == 1.0
        assert {i.key: i.score for i in ranked[1:]} == {"1": 0.5, "2": 0.5}
        newest_first = await store.asearch(("docs",))
        assert [i.key for i in newest_first] == ["4", "3", "2", "1"]
        assert [i.key for i in await store.asearch(("docs",), limit=2, offset=1)] == ["3", "2"]
        assert await store.asearch(("nothing",)) == []


async def test_store_concurrent_writers(url: str, namespace: str) -> None:
    """64 puts at once from two store objects: 32 distinct items all land; one item written by 32
    ends with one writer's whole value and the first write's created_at."""
    async with BotWireStore(namespace, url=url) as a, BotWireStore(namespace, url=url) as b:
        await a.aput(("c",), "shared", {"writer": -1})
        first = await a.aget(("c",), "shared")
        await asyncio.gather(
            *((a if i % 2 else b).aput(("c", "own"), f"k{i}", {"i": i}) for i in range(32)),
            *((a if i % 2 else b).aput(("c",), "shared", {"writer": i, "pad": "x" * i}) for i in range(32)),
        )
        own = await a.asearch(("c", "own"), limit=100)
        assert sorted(item.value["i"] for item in own) == list(range(32))
        shared = await b.aget(("c",), "shared")
        assert first is not None and shared is not None
        w = shared.value["writer"]
        assert 0 <= w < 32 and shared.value == {"writer": w, "pad": "x" * w}
        assert shared.created_at == first.created_at


def test_store_list_namespaces(store: BotWireStore) -> None:
    for ns in [("a", "b", "c"), ("a", "b", "d"), ("a", "x"), ("z", "b", "c"), ("z", "b", "c", "e")]:
        store.put(ns, "k", {"v": 1})
    assert store.list_namespaces() == [
        ("a", "b", "c"),
        ("a", "b", "d"),
        ("a", "x"),
        ("z", "b", "c"),
        ("z", "b", "c", "e"),
    ]
    assert store.list_namespaces(prefix=("a", "b")) == [("a", "b", "c"), ("a", "b", "d")]
    assert store.list_namespaces(prefix=("*", "b")) == [
        ("a", "b", "c"),
        ("a", "b", "d"),
        ("z", "b", "c"),
        ("z", "b", "c", "e"),
    ]
    assert store.list_namespaces(suffix=("b", "c")) == [("a", "b", "c"), ("z", "b", "c")]
    assert store.list_namespaces(max_depth=2) == [("a", "b"), ("a", "x"), ("z", "b")]
    assert store.list_namespaces(limit=2, offset=1) == [("a", "b", "d"), ("a", "x")]
    assert store.batch([ListNamespacesOp(max_depth=1)]) == [[("a",), ("z",)]]
    assert store.batch([SearchOp(("a", "x"))])[0][0].key == "k"  # type: ignore[index]


@pytest.mark.slow
async def test_store_ttl_expires_and_reads_refresh_it(url: str, namespace: str) -> None:
    """A TTL (minutes) is kept by the server; reads with refresh_on_read restart its clock."""
    async with BotWireStore(namespace, url=url, ttl={"refresh_on_read": True}) as store:
        ttl = 3 / 60  # 3 s
        await store.aput(("s",), "read", {"v": 1}, ttl=ttl)
        await store.aput(("s",), "unread", {"v": 2}, ttl=ttl)
        await store.aput(("s",), "kept", {"v": 3})
        await store.aput(("found",), "searched", {"v": 4}, ttl=ttl)
        loop = asyncio.get_running_loop()
        start = loop.time()
        # Read "read" (and search "searched") twice a second for 5 s (past their first 3 s): they
        # never expire meanwhile.
        while loop.time() - start < 5:
            assert await store.aget(("s",), "read") is not None
            assert [i.key for i in await store.asearch(("found",))] == ["searched"]
            await asyncio.sleep(0.5)
        assert await store.aget(("s",), "unread", refresh_ttl=False) is None  # expired at ~3 s
        # A read that does not refresh leaves the clock alone: it expires within its TTL (+ slack).
        deadline = loop.time() + 10
        while await store.aget(("s",), "read", refresh_ttl=False) is not None:
            assert loop.time() < deadline, "an item with a TTL did not expire"
            await asyncio.sleep(0.2)
        assert (await store.aget(("s",), "kept")) is not None
        while await store.aget(("found",), "searched", refresh_ttl=False) is not None:
            assert loop.time() < deadline, "an item with a TTL did not expire"
            await asyncio.sleep(0.2)
        async with AsyncMemory(namespace, url=url) as memory:
            assert await memory.list_keys() == ["s:kept"]


def test_store_default_ttl_applies(url: str, namespace: str) -> None:
    with BotWireStore(namespace, url=url, ttl={"default_ttl": 10.0}) as store:
        store.put(("s",), "k", {"v": 1})
        assert Memory(namespace, url=url).get("s:k")["ttl"] == 10.0


def test_saver_and_store_work_from_sync_and_async_faces_together(url: str, namespace: str) -> None:
    saver = BotWireSaver(namespace, url=url)
    stored = saver.put(_cfg("t"), _checkpoint({"a": 1}), {"step": 0}, {"a": 1})

    async def read() -> Any:
        async with BotWireSaver(namespace, url=url) as s:
            return await s.aget_tuple(_cfg("t"))

    tup = asyncio.run(read())
    assert tup is not None and tup.config == stored
    saver.close()


def test_store_ttl_config_must_be_a_dict() -> None:
    with pytest.raises(InvalidArgument):
        BotWireStore("x", ttl=timedelta(seconds=1))  # type: ignore[arg-type]


def test_thread_ids_may_be_uuids_and_ints(saver: BotWireSaver) -> None:
    tid = uuid.uuid4()
    saver.put({"configurable": {"thread_id": tid, "checkpoint_ns": ""}}, _checkpoint({"a": 1}), {}, {"a": 1})
    assert saver.get_tuple({"configurable": {"thread_id": str(tid)}}) is not None
    saver.put({"configurable": {"thread_id": 7, "checkpoint_ns": ""}}, _checkpoint({"a": 1}), {}, {"a": 1})
    assert saver.get_tuple({"configurable": {"thread_id": "7"}}) is not None


def test_the_example_runs(url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # examples/langgraph_approval.py's two steps (as separate processes in the example itself;
    # here in this one, the cross-process resume being tested above).
    import importlib.util

    monkeypatch.setenv("BOTWIRE_URL", url)
    spec = importlib.util.spec_from_file_location(
        "langgraph_approval", procs.ROOT / "examples" / "langgraph_approval.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    thread = f"t-{uuid.uuid4().hex[:8]}"
    example.start(thread)
    example.resume(thread, "approved")
    out = capsys.readouterr().out
    assert (
        "stopped for approval: {'question': 'Send this answer?', 'draft': 'Draft: we refund order 42 in full.'}" in out
    )
    assert "waits at ('review',)" in out and "human: Reviewer: approved" in out
    assert out.rstrip().endswith("stored: {'decision': 'Reviewer: approved'}")
