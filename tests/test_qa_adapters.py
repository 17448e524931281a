"""QA of the framework adapters (LangGraph, AutoGen, CrewAI): edge cases that broke them.

Real frameworks, a real nats-server; each test names the defect it pins down.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

# CrewAI's telemetry and tracing would reach out to the network (as in test_crewai.py).
os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")

pytest.importorskip("langgraph")
pytest.importorskip("autogen_core")

from autogen_core.models import AssistantMessage, UserMessage  # noqa: E402

from botwire_stream import Memory  # noqa: E402
from botwire_stream.errors import BotWireError, InvalidArgument, ValueTooLarge  # noqa: E402
from botwire_stream.integrations.autogen import BotWireChatCompletionContext  # noqa: E402
from botwire_stream.integrations.langgraph import BotWireSaver, BotWireStore  # noqa: E402
from tests.servers import NatsServer  # noqa: E402
from tests.test_langgraph import _cfg, _checkpoint  # noqa: E402
from tests.waits import sigstop


@pytest.fixture
async def asaver(url: str, namespace: str) -> AsyncIterator[BotWireSaver]:
    s = BotWireSaver(namespace, url=url)
    yield s
    await s.aclose()


# -- LangGraph store ---------------------------------------------------------------------------
def test_store_put_with_ttl_none_never_expires_despite_default_ttl(url: str, namespace: str) -> None:
    """``put(..., ttl=None)`` means "no expiry" in LangGraph even with a ``default_ttl``; only a
    put that gives no ttl gets the default. (It used to get the default too: it expired.)"""
    with BotWireStore(namespace, url=url, ttl={"default_ttl": 10.0}) as store:
        store.put(("s",), "forever", {"v": 1}, ttl=None)
        store.put(("s",), "default", {"v": 2})
        store.put(("s",), "own", {"v": 3}, ttl=5.0)
    stored = Memory(namespace, url=url)
    assert stored.get("s:forever")["ttl"] is None
    assert stored.get("s:default")["ttl"] == 10.0
    assert stored.get("s:own")["ttl"] == 5.0


async def test_store_search_filter_on_a_missing_or_non_numeric_field_does_not_match(url: str, namespace: str) -> None:
    """A comparison filter (``$gt``...) skips items whose field is missing or not a number, as a
    JSONB comparison with NULL does, instead of crashing the whole search with a TypeError."""
    async with BotWireStore(namespace, url=url) as store:
        await store.aput(("docs",), "scored", {"score": 5})
        await store.aput(("docs",), "unscored", {"title": "x"})
        await store.aput(("docs",), "text", {"score": "high"})
        found = await store.asearch(("docs",), filter={"score": {"$gt": 1}})
        assert [i.key for i in found] == ["scored"]
        assert [i.key for i in await store.asearch(("docs",), filter={"score": {"$lte": 1}})] == []
        with pytest.raises(InvalidArgument, match=r"\$near"):
            await store.asearch(("docs",), filter={"score": {"$near": 1}})


# -- LangGraph checkpointer --------------------------------------------------------------------
async def test_put_writes_with_one_oversized_value_writes_none_of_the_task(asaver: BotWireSaver) -> None:
    """A task's writes are checked whole: one value over the server's max_payload raises
    ``ValueTooLarge`` and none is stored (a half-written task would be taken as done on resume,
    its missing writes lost)."""
    cfg = await asaver.aput(_cfg("t1"), _checkpoint({"a": 1}), {"step": 0}, {})
    big = "x" * (2 * 1024 * 1024)  # the test server's max_payload is 1 MiB
    with pytest.raises(ValueTooLarge, match="nothing was written"):
        await asaver.aput_writes(cfg, [("small", 1), ("big", big), ("after", 2)], "task-1")
    found = await asaver.aget_tuple(cfg)
    assert found is not None and found.pending_writes == []


@pytest.mark.slow
async def test_put_to_a_stopped_server_raises_and_an_acknowledged_checkpoint_survives_a_kill(
    own_server: NatsServer, namespace: str
) -> None:
    """SIGSTOP mid-put: a clear botwire error within a bound, not a hang; a checkpoint
    acknowledged before the server is SIGKILLed and restarted is still there, whole."""
    saver = BotWireSaver(namespace, url=own_server.url, timeout=1.0)
    try:
        acked = await saver.aput(_cfg("t"), _checkpoint({"a": "kept"}), {"step": 1}, {})
        await saver.aput_writes(acked, [("w", "pending")], "task")
        sigstop(own_server.pid)
        try:
            with pytest.raises(BotWireError):
                await asyncio.wait_for(
                    saver.aput(_cfg("t", acked["configurable"]["checkpoint_id"]), _checkpoint({"a": "x"}), {}, {}),
                    timeout=30,
                )
        finally:
            os.kill(own_server.pid, signal.SIGCONT)
        own_server.kill()
        own_server.restart()
        got = await saver.aget_tuple(acked)
        assert got is not None
        assert got.checkpoint["channel_values"] == {"a": "kept"}
        assert got.pending_writes == [("task", "w", "pending")]
    finally:
        await saver.aclose()


# -- AutoGen -----------------------------------------------------------------------------------
async def test_autogen_load_state_that_cannot_be_stored_clears_nothing(url: str, namespace: str) -> None:
    """``load_state`` with a message the log cannot store (a lone surrogate, which JSON-decoded
    LLM output may hold) raises and leaves the conversation as it was (it used to clear it
    first, then fail: the whole conversation lost)."""
    ctx = BotWireChatCompletionContext("s", namespace=namespace, url=url)
    try:
        await ctx.add_message(UserMessage(content="hello", source="user"))
        await ctx.add_message(AssistantMessage(content="hi", source="assistant"))
        before = await ctx.get_messages()
        bad = {
            "messages": [
                UserMessage(content="ok", source="user").model_dump(),
                {"type": "UserMessage", "content": "\ud800", "source": "user"},
            ]
        }
        with pytest.raises(BotWireError):
            await ctx.load_state(bad)
        assert await ctx.get_messages() == before
    finally:
        await ctx.close()


async def test_autogen_save_state_of_a_long_conversation_loads_back(url: str, namespace: str) -> None:
    """``load_state(save_state())`` of a conversation of more messages than one atomic extend
    carries (1,000) gives it back whole, in order (it used to clear the log, then raise)."""
    ctx = BotWireChatCompletionContext("long", namespace=namespace, url=url)
    try:
        state = {"messages": [UserMessage(content=f"m{i}", source="user").model_dump() for i in range(1201)]}
        await ctx.load_state(state)
        got = await ctx.get_messages()
        assert [m.content for m in got] == [f"m{i}" for i in range(1201)]
        assert await ctx.save_state() == state
    finally:
        await ctx.close()


async def test_autogen_image_and_function_messages_round_trip(url: str, namespace: str) -> None:
    """A user message with an image (multimodal content) and a function call/result pair come
    back equal from the log, in a new context object (another process opens it the same way)."""
    from autogen_core import FunctionCall, Image
    from autogen_core.models import FunctionExecutionResult, FunctionExecutionResultMessage

    png = Image.from_base64(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    sent = [
        UserMessage(content=["what is this?", png], source="user"),
        AssistantMessage(content=[FunctionCall(id="c1", name="look", arguments='{"x": 1}')], source="a"),
        FunctionExecutionResultMessage(content=[FunctionExecutionResult(content="a dot", call_id="c1", name="look")]),
    ]
    writer = BotWireChatCompletionContext("img", namespace=namespace, url=url)
    for m in sent:
        await writer.add_message(m)
    await writer.close()
    reader = BotWireChatCompletionContext("img", namespace=namespace, url=url)
    try:
        got = await reader.get_messages()
        assert [m.model_dump(mode="json") for m in got] == [m.model_dump(mode="json") for m in sent]
        assert isinstance(got[0].content[1], Image)  # type: ignore[index]
    finally:
        await reader.close()


def test_crewai_memory_tools_answer_bad_keys_with_an_error_message(url: str, namespace: str) -> None:
    """A key an LLM made up that is no valid key (empty, a lone surrogate from JSON ``\\ud800``,
    over 1024 bytes) or a bad glob: each tool answers with an error message the agent reads and
    can correct, nothing is written, and the tool does not raise into the crew's run."""
    pytest.importorskip("crewai")
    from botwire_stream.integrations.crewai import memory_tools

    remember, recall, listing, forget = memory_tools(namespace, url=url)
    for key in ("", "\ud800", "k" * 2000):
        for answer in (
            remember.run(key=key, value="v"),
            recall.run(key=key),
            forget.run(key=key),
        ):
            assert isinstance(answer, str) and answer.startswith("error:"), answer
    assert listing.run(pattern="").startswith("error:")
    assert Memory(namespace, url=url).list_keys() == []
    assert remember.run(key="user:name", value="Ada") == "stored 'user:name'"
    assert recall.run(key="user:name") == "Ada"


async def test_store_search_and_list_namespaces_skip_keys_that_are_not_store_items(url: str, namespace: str) -> None:
    """The store's namespace is an ordinary ``Memory`` namespace (the README says ``Memory`` reads
    it), so an app may keep other keys there: searching everything and listing namespaces skip
    them instead of failing on a value that is no store item."""
    from botwire_stream import AsyncMemory

    async with AsyncMemory(namespace, url=url) as memory:
        await memory.set("counter", 5)
        await memory.set("cfg:theme", "dark")
        await memory.set("cfg:odd", {"value": "not a record"})
    async with BotWireStore(namespace, url=url) as store:
        await store.aput(("users", "u1"), "prefs", {"lang": "en"})
        assert [(i.namespace, i.key) for i in await store.asearch(())] == [(("users", "u1"), "prefs")]
        assert [i.key for i in await store.asearch(("cfg",))] == []
        # derived from the keys alone: a key without ':' is skipped ("cfg:..." keys would show as ("cfg",))
        assert () not in await store.alist_namespaces()
        assert ("users", "u1") in await store.alist_namespaces()


def test_crewai_embedding_dimensions_mixed_in_a_batch_or_a_scope(url: str, namespace: str) -> None:
    """A save mixing embedding dimensions raises CrewAI's ``EmbeddingDimensionMismatchError``
    and writes none (as CrewAI's LanceDB backend); records of another dimension saved later (a
    new embedder) make a search of their scope raise it too, while other scopes still answer."""
    pytest.importorskip("crewai")
    from crewai.memory.storage.backend import EmbeddingDimensionMismatchError
    from crewai.memory.types import MemoryRecord

    from botwire_stream.integrations.crewai import BotWireStorage

    with BotWireStorage(namespace, url=url) as storage:
        old = MemoryRecord(content="a", scope="/old", embedding=[1.0, 0.0])
        new = MemoryRecord(content="b", scope="/new", embedding=[1.0, 0.0, 0.0])
        with pytest.raises(EmbeddingDimensionMismatchError):
            storage.save([old, new])
        assert storage.count() == 0
        storage.save([old])
        storage.save([new])
        assert [r.id for r, _ in storage.search([1.0, 0.0, 0.0], scope_prefix="/new")] == [new.id]
        with pytest.raises(EmbeddingDimensionMismatchError):
            storage.search([1.0, 0.0, 0.0])


def test_crewai_scopes_with_doubled_and_trailing_slashes_and_odd_characters(url: str, namespace: str) -> None:
    """Scopes are normalised as CrewAI's ``normalize_scope_path`` does (``//`` collapsed, trailing
    ``/`` dropped), so ``/p//q/`` is ``/p/q`` for counts, listings and searches (an empty child
    ``/p/`` used to be listed, which normalises back to its parent); ``#``, ``*`` and ``:`` in a
    scope are kept apart from the record id."""
    pytest.importorskip("crewai")
    from crewai.memory.types import MemoryRecord

    from botwire_stream.integrations.crewai import BotWireStorage

    with BotWireStorage(namespace, url=url) as storage:
        doubled = MemoryRecord(content="a", scope="/p//q/", embedding=[1.0, 0.0])
        odd = MemoryRecord(content="b", scope="/p/#x*:y", embedding=[0.0, 1.0])
        storage.save([doubled, odd])
        assert storage.list_scopes("/p") == ["/p/#x*:y", "/p/q"]
        assert storage.count("/p/q") == 1 and storage.count("/p/#x*:y") == 1
        assert [r.id for r, _ in storage.search([1.0, 0.0], scope_prefix="/p/q/")] == [doubled.id]
        assert storage.get_record(odd.id).content == "b"  # type: ignore[union-attr]
        assert storage.delete(scope_prefix="/p//q") == 1 and storage.count() == 1


async def test_names_at_their_byte_limits_work_end_to_end_and_one_more_byte_is_refused(asaver: BotWireSaver) -> None:
    """A thread id and checkpoint_ns of 512 UTF-8 bytes (4-byte characters and subject
    wildcards), a checkpoint and task id of 256: put, writes, get, list, copy, prune and delete
    all work (their subjects stay under the server's control-line limit); one byte more raises
    ``InvalidArgument`` with nothing written."""
    thread, ns = "😀" * 127 + "*.>a", ">." * 256  # 512 bytes each
    cid, task = "c" * 256, "t" * 256
    base = _checkpoint({"v": 1})
    base["id"] = cid
    cfg = await asaver.aput(_cfg(thread, ns=ns), base, {"step": 1}, {})
    await asaver.aput_writes(cfg, [("ch", "w")], task)
    got = await asaver.aget_tuple(_cfg(thread, ns=ns))
    assert got is not None and got.config == cfg and got.pending_writes == [(task, "ch", "w")]
    assert [t.config for t in [t async for t in asaver.alist(_cfg(thread, ns=ns))]] == [cfg]
    target = "😀" * 128
    await asaver.acopy_thread(thread, target)
    copied = await asaver.aget_tuple(_cfg(target, ns=ns))
    assert copied is not None and copied.pending_writes == [(task, "ch", "w")]
    await asaver.aprune([thread, target])
    assert await asaver.aget_tuple(_cfg(target, ns=ns)) is not None
    with pytest.raises(InvalidArgument):
        await asaver.aput(_cfg(thread + "x", ns=ns), base, {}, {})
    with pytest.raises(InvalidArgument):
        await asaver.aput_writes(_cfg(thread, cid + "x", ns), [("ch", "w")], task)
    await asaver.adelete_thread(thread)
    await asaver.adelete_thread(target)
    assert [t async for t in asaver.alist(None)] == []


async def test_crewai_touch_racing_reset_leaves_no_record_behind(url: str, namespace: str) -> None:
    """``touch_records`` (CrewAI calls it after a recall) racing ``reset`` (another thread or
    process): once both are done the scope is empty; a touch of a record deleted meanwhile
    writes nothing (it used to store a null that count() and list_scopes() still saw)."""
    pytest.importorskip("crewai")
    from crewai.memory.types import MemoryRecord

    from botwire_stream.integrations.crewai import BotWireStorage

    async with BotWireStorage(namespace, url=url) as storage:
        for _ in range(8):  # bounded: each round is a few round trips
            records = [MemoryRecord(content=f"r{i}", scope="/s", embedding=[1.0, float(i)]) for i in range(16)]
            await storage.asave(records)
            await asyncio.gather(storage.atouch_records([r.id for r in records]), storage.areset("/s"))
            assert await storage.acount() == 0
            assert await storage.alist_scopes() == []
