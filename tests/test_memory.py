"""Memory and AsyncMemory against a real nats-server: values, listing, isolation, revisions,
update, watch, and the sync face from async code and from threads."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botwire_stream import AsyncMemory, Change, Memory
from tests.servers import NatsServer
from tests.workers import take

MiB = 1024 * 1024

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8")),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=10), children, max_size=5),
    max_leaves=25,
)


class Profile(msgspec.Struct):
    name: str
    tags: list[str]
    score: float = 0.5


@dataclasses.dataclass
class Turn:
    role: str
    content: str
    meta: dict[str, int] = dataclasses.field(default_factory=dict)


@pytest.fixture(scope="module")
def shared(nats_server: NatsServer) -> Iterator[Memory]:
    """One namespace for the module's property tests."""
    with Memory("t" + uuid.uuid4().hex[:16], url=nats_server.url) as m:
        yield m


@pytest.fixture
def memory(url: str, namespace: str) -> Iterator[Memory]:
    with Memory(namespace, url=url) as m:
        yield m


# -- values ----------------------------------------------------------------------------------------
@given(JSON)
@settings(max_examples=50, deadline=None)
def test_json_values_round_trip(shared: Memory, value: Any) -> None:
    shared.set("v", value)
    assert shared.get("v") == value
    assert shared.revisions("v")[-1].value == value


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -1, 2**63, 3.25, -0.0, "", "ü 日本 🙂", [], {}, [1, "a", None, [2, {"b": [3]}]],
     {"a": {"b": {"c": {"d": [1.5, None, "x"]}}}}, {"": 1, "k:": 2}],
)
def test_plain_values_round_trip(memory: Memory, value: Any) -> None:
    memory.set("k", value)
    assert memory.get("k", "missing") == value
    assert "k" in memory


def test_none_is_a_value_not_a_missing_key(memory: Memory) -> None:
    memory.set("k", None)
    assert memory.get("k", "default") is None
    assert "k" in memory
    assert memory.list_keys() == ["k"]


def test_structs_and_dataclasses_come_back_as_dicts(memory: Memory) -> None:
    memory.set("profile", Profile("ada", ["x", "y"]))
    memory.set("turn", Turn("user", "hi", {"tokens": 3}))
    memory.set("nested", {"turns": [Turn("ai", "ok")], "p": Profile("b", [], 1.0), "t": (1, 2)})
    assert memory.get("profile") == {"name": "ada", "tags": ["x", "y"], "score": 0.5}
    assert memory.get("turn") == {"role": "user", "content": "hi", "meta": {"tokens": 3}}
    assert memory.get("nested") == {
        "turns": [{"role": "ai", "content": "ok", "meta": {}}],
        "p": {"name": "b", "tags": [], "score": 1.0},
        "t": [1, 2],
    }


def test_missing_key_reads_as_default(memory: Memory) -> None:
    assert memory.get("nope") is None
    assert memory.get("nope", 7) == 7
    assert "nope" not in memory
    assert memory.delete("nope") is False
    assert memory.revisions("nope") == []


def test_set_returns_increasing_revisions_and_delete_reports_existence(memory: Memory) -> None:
    r1 = memory.set("k", 1)
    r2 = memory.set("k", 2)
    assert r2 > r1
    assert memory.delete("k") is True
    assert memory.delete("k") is False
    assert memory.get("k") is None
    r3 = memory.set("k", 3)  # set again after a delete
    assert r3 > r2 and memory.get("k") == 3


# -- big values (the session server has a 1 MiB max_payload, so these are chunked) ----------------
@pytest.mark.parametrize(
    "size",
    [MiB - 16 * 1024 - 1, MiB - 16 * 1024, MiB - 16 * 1024 + 1, MiB, MiB + 1, 3 * MiB + 7, 5 * MiB],
)
def test_big_values_round_trip(memory: Memory, size: int) -> None:
    value = "x" * (size - 2)  # JSON-encoded: exactly ``size`` bytes
    assert len(msgspec.json.encode(value)) == size
    rev = memory.set("big", value)
    assert memory.get("big") == value
    assert memory.revisions("big")[-1].revision == rev


def test_big_structured_value_round_trips_and_is_seen_by_watch(memory: Memory) -> None:
    value = [{"i": i, "text": f"message {i} " + "é" * 200} for i in range(6000)]  # ~2.5 MiB
    with memory.watch("big") as watch:
        memory.set("big", value)
        (change,) = take(watch, 1)
    assert memory.get("big") == value
    assert change.value == value


def test_big_values_overwrite_shrink_and_delete(memory: Memory) -> None:
    a, b = "a" * (3 * MiB), "b" * (2 * MiB)
    memory.set("big", a)
    memory.set("big", b)
    assert memory.get("big") == b
    memory.set("big", "small")
    assert memory.get("big") == "small"
    memory.set("big", a)
    assert memory.get("big") == a
    assert memory.list_keys() == ["big"]
    assert memory.delete("big") is True
    assert memory.get("big") is None
    assert memory.list_keys() == []


def test_readers_see_the_old_or_the_new_big_value_never_an_error(url: str, namespace: str) -> None:
    """A chunked value is replaced atomically: a reader racing the writer gets one whole value.

    The reader runs on its own event loop and connection, as another process would.
    """
    values = ["a" * (MiB + MiB // 2), "b" * (MiB + MiB // 2)]
    stop = threading.Event()
    outcomes: list[str] = []

    async def read_until_stopped() -> None:
        async with AsyncMemory(namespace, url=url) as reader:
            while not stop.is_set():
                try:
                    got = await reader.get("big")
                    outcomes.append("ok" if got in values else f"unknown value of {len(got)} chars")
                except Exception as exc:  # noqa: BLE001 - collected for the assertion
                    outcomes.append(repr(exc))

    with Memory(namespace, url=url) as writer:
        writer.set("big", values[0])
        thread = threading.Thread(target=asyncio.run, args=(read_until_stopped(),), daemon=True)
        thread.start()
        try:
            for i in range(80):
                writer.set("big", values[i % 2])
                if any(o != "ok" for o in outcomes):
                    break
        finally:
            stop.set()
            thread.join(30)
    assert outcomes, "the reader never read"
    assert [o for o in outcomes if o != "ok"] == []


# -- listing -----------------------------------------------------------------------------------------
def test_list_keys_by_prefix(memory: Memory) -> None:
    for k in ["user:42:history", "user:42:profile", "user:42:a:b", "user:421:x", "user:4:x", "user:42", "other:42:x"]:
        memory.set(k, k)
    assert memory.list_keys("user:42:*") == ["user:42:a:b", "user:42:history", "user:42:profile"]
    assert memory.list_keys("user:*") == sorted(
        ["user:42:history", "user:42:profile", "user:42:a:b", "user:421:x", "user:4:x", "user:42"]
    )
    memory.delete("user:42:profile")
    assert memory.list_keys("user:42:*") == ["user:42:a:b", "user:42:history"]
    assert memory.list_keys() == sorted(
        ["user:42:history", "user:42:a:b", "user:421:x", "user:4:x", "user:42", "other:42:x"]
    )


def test_list_keys_of_an_empty_namespace(memory: Memory) -> None:
    assert memory.list_keys() == []
    assert memory.list_keys("a:*") == []
    assert memory.list_keys("a") == []


def test_list_keys_of_many_keys(memory: Memory) -> None:
    stored = [f"s:{i:04d}" for i in range(1500)]
    for k in stored:
        memory.set(k, 0)
    assert memory.list_keys() == stored
    assert memory.list_keys("s:00*") == stored[:100]


# -- namespaces ---------------------------------------------------------------------------------------
@given(st.text(st.characters(codec="utf-8"), min_size=1, max_size=30))
@settings(max_examples=50, deadline=None)
def test_namespaces_never_see_each_other(nats_server: NatsServer, key: str) -> None:
    a_ns = "t" + uuid.uuid4().hex[:16]
    with Memory(a_ns, url=nats_server.url) as a, Memory(a_ns + "_b", url=nats_server.url) as b:
        a.set(key, "in a")
        assert b.get(key, "absent") == "absent"
        assert key not in b
        assert b.list_keys() == []
        assert b.revisions(key) == []
        assert b.delete(key) is False
        assert a.get(key) == "in a"


def test_namespace_isolation_holds_for_lookalike_keys_and_watch(url: str, namespace: str) -> None:
    """Keys that look like other namespaces' subjects stay in their own namespace."""
    other = namespace + "x"
    lookalikes = [f"$KV.botwire_{other}.k", f"botwire_{other}:k", ">", "*", "k", f"..{other}.."]
    with Memory(namespace, url=url) as a, Memory(other, url=url) as b:
        with b.watch() as watch_b:
            for k in lookalikes:
                a.set(k, "a")
            b.set("done", "b")
            (change,) = take(watch_b, 1)
        assert (change.key, change.value) == ("done", "b")
        assert b.list_keys() == ["done"]
        assert all(b.get(k) is None for k in lookalikes)
        assert a.list_keys() == sorted(lookalikes)
        assert a.get("done") is None


# -- revisions -----------------------------------------------------------------------------------------
def test_revisions_are_the_audit_trail(memory: Memory) -> None:
    r1 = memory.set("k", {"v": 1})
    r2 = memory.set("k", {"v": 2})
    memory.set("other", 0)
    assert memory.delete("k")
    revs = memory.revisions("k")
    assert [r.op for r in revs] == ["set", "set", "delete"]
    assert [r.value for r in revs] == [{"v": 1}, {"v": 2}, None]
    assert [r.revision for r in revs][:2] == [r1, r2]
    assert revs[0].revision < revs[1].revision < revs[2].revision
    assert all(isinstance(r.time, datetime) and r.time.tzinfo is not None for r in revs)
    assert revs[0].time <= revs[1].time <= revs[2].time


def test_revisions_keep_the_last_sixteen_and_writes_go_on(memory: Memory) -> None:
    for i in range(20):
        memory.set("k", i)
    revs = memory.revisions("k")
    assert [r.value for r in revs] == list(range(4, 20))
    assert memory.get("k") == 19


# -- update -------------------------------------------------------------------------------------------
def test_update_returns_the_new_value(memory: Memory) -> None:
    assert memory.update("n", lambda v: v + 1, default=0) == 1
    assert memory.update("n", lambda v: v + 1, default=0) == 2
    assert memory.get("n") == 2
    assert memory.update("l", lambda v: [*v, "x"], default=[]) == ["x"]
    memory.delete("n")
    assert memory.update("n", lambda v: v * 10, default=5) == 50  # a deleted key starts from default


def test_update_sees_the_current_value(memory: Memory) -> None:
    memory.set("d", {"a": 1})
    seen: list[Any] = []

    def fn(v: Any) -> Any:
        seen.append(v)
        return {**v, "b": 2}

    assert memory.update("d", fn) == {"a": 1, "b": 2}
    assert seen == [{"a": 1}]
    assert memory.get("d") == {"a": 1, "b": 2}


async def test_async_update_under_concurrent_tasks(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as a, AsyncMemory(namespace, url=url) as b:

        async def bump(m: AsyncMemory) -> None:
            for _ in range(25):
                await m.update("n", lambda v: v + 1, default=0)

        await asyncio.gather(*(bump(m) for m in (a, b, a, b)))
        assert await a.get("n") == 100


# -- watch ----------------------------------------------------------------------------------------------
def test_sync_watch_sees_sets_and_deletes_of_matching_keys(memory: Memory) -> None:
    with memory.watch("user:*") as watch:
        r1 = memory.set("other", 1)
        r2 = memory.set("user:1", {"a": 1})
        memory.set("users", 1)
        assert memory.delete("user:1")
        memory.set("user:2:x", [2])
        changes = take(watch, 3)
    assert [(c.key, c.op, c.value) for c in changes] == [
        ("user:1", "set", {"a": 1}),
        ("user:1", "delete", None),
        ("user:2:x", "set", [2]),
    ]
    assert changes[0].revision == r2 > r1
    assert changes[0].revision < changes[1].revision < changes[2].revision
    assert all(isinstance(c, Change) and c.time.tzinfo is not None for c in changes)


def test_watch_of_one_exact_key(memory: Memory) -> None:
    with memory.watch("a") as watch:
        memory.set("ab", 0)
        memory.set("a:b", 0)
        memory.set("a", 1)
        (change,) = take(watch, 1)
    assert (change.key, change.value) == ("a", 1)


def test_watch_starts_from_now(memory: Memory) -> None:
    memory.set("old", 1)
    with memory.watch() as watch:
        memory.set("new", 2)
        (change,) = take(watch, 1)
    assert change.key == "new"


async def test_async_watch(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as memory:
        async with memory.watch("chat:*") as watch:
            await memory.set("x", 0)
            await memory.set("chat:1", "hi")
            await memory.delete("chat:1")
            got = []
            async with asyncio.timeout(20):
                async for change in watch:
                    got.append((change.key, change.op, change.value))
                    if len(got) == 2:
                        break
    assert got == [("chat:1", "set", "hi"), ("chat:1", "delete", None)]


# -- the sync face from async code and from threads ---------------------------------------------------
def test_sync_face_inside_asyncio_run(url: str, namespace: str) -> None:
    async def main() -> Any:
        with Memory(namespace, url=url) as m:
            m.set("k", [1])
            m.update("k", lambda v: [*v, 2])
            with m.watch("k") as watch:
                m.set("k", [3])
                (change,) = take(watch, 1)
            return m.get("k"), m.list_keys(), "k" in m, change.value

    assert asyncio.run(main()) == ([3], ["k"], True, [3])


async def test_sync_face_inside_a_running_test_loop(url: str, namespace: str) -> None:
    with Memory(namespace, url=url) as m:
        m.set("k", 1)
        await asyncio.sleep(0)
        assert m.get("k") == 1
    async with AsyncMemory(namespace, url=url) as am:  # and both faces share the data
        assert await am.get("k") == 1


def test_sync_face_from_many_threads(url: str, namespace: str) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with Memory(namespace, url=url) as m:
                for j in range(25):
                    m.set(f"t:{i}:{j}", [i, j])
                    assert m.get(f"t:{i}:{j}") == [i, j]
                    m.update("counter", lambda v: v + 1, default=0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    with Memory(namespace, url=url) as m:
        assert m.get("counter") == 200
        assert len(m.list_keys("t:*")) == 200


def test_closed_memory_refuses_work(url: str, namespace: str) -> None:
    from botwire_stream.errors import BotWireError

    m = Memory(namespace, url=url)
    m.set("k", 1)
    m.close()
    with pytest.raises(BotWireError, match="closed"):
        m.get("k")
    with Memory(namespace, url=url) as again:  # the data is still there for others
        assert again.get("k") == 1


def test_a_sync_call_inside_update_fails_fast_instead_of_deadlocking(url: str, namespace: str) -> None:
    # update() runs fn on the library's event loop thread; a sync call from there would wait for
    # itself forever, so it raises at once and nothing is written.
    with Memory(namespace, url=url) as memory:
        memory.set("counter", 1)
        with pytest.raises(RuntimeError, match="event loop thread"):
            memory.update("counter", lambda n: n + memory.get("counter"))
        assert memory.get("counter") == 1
