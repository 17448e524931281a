"""The LangChain adapters with real LangChain components, a real nats-server, and real processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import decimal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models.fake_chat_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    HumanMessageChunk,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, Generation
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables.history import RunnableWithMessageHistory

from botwire_stream import ChatHistory, Memory
from botwire_stream.errors import InvalidKey, InvalidMessage, InvalidNamespace, InvalidSessionId, InvalidValue
from botwire_stream.integrations.langchain import (
    BotWireByteStore,
    BotWireCache,
    BotWireChatHistory,
    glob_escape,
)
from tests import langchain_workers

DEPRECATED = pytest.mark.filterwarnings("ignore::langchain_core._api.deprecation.LangChainDeprecationWarning")


@pytest.fixture
def history(url: str, namespace: str) -> Iterator[BotWireChatHistory]:
    h = BotWireChatHistory("s1", namespace=namespace, url=url)
    yield h
    h.close()


def rich_messages() -> list[BaseMessage]:
    """One of each kind, with every field a user relies on getting back."""
    return [
        SystemMessage("You are terse.", id="sys-1"),
        HumanMessage(
            content=[
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
            id="h-1",
            name="ada",
        ),
        AIMessage(
            content="Let me look that up.",
            id="run-42",
            name="assistant",
            tool_calls=[{"name": "search", "args": {"q": "cats", "n": 3}, "id": "call_1", "type": "tool_call"}],
            additional_kwargs={"refusal": None, "custom": {"nested": [1, 2.5, "x"]}},
            response_metadata={"model_name": "fake-1", "finish_reason": "tool_calls"},
            usage_metadata={"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
        ),
        ToolMessage(
            content='{"results": ["a cat"]}',
            tool_call_id="call_1",
            name="search",
            status="success",
            artifact={"raw": [1, 2]},
            id="tool-1",
        ),
        ChatMessage(role="critic", content="Too long.", id="c-1"),
        AIMessage(content=[{"type": "text", "text": "A cat. ünïcode ✓"}], id="run-43"),
    ]


# -- chat history --------------------------------------------------------------------------------
@DEPRECATED
async def test_runnable_with_message_history_sync_and_async_streams_then_another_process_reads(
    url: str, namespace: str
) -> None:
    replies = [f"answer number {i}" for i in range(6)]
    model = GenericFakeChatModel(messages=iter(replies))
    seen: list[list[BaseMessage]] = []

    class Recorder(BaseCallbackHandler):
        def on_chat_model_start(
            self, serialized: dict[str, Any], messages: list[list[BaseMessage]], **kwargs: Any
        ) -> None:
            seen.append(messages[0])

    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are terse."), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    made: list[BotWireChatHistory] = []

    def get_history(session_id: str) -> BotWireChatHistory:
        # The usual factory: a new history object per call (closed at the end of the test).
        made.append(BotWireChatHistory(session_id, namespace=namespace, url=url))
        return made[-1]

    chain = RunnableWithMessageHistory(
        prompt | model, get_history, input_messages_key="question", history_messages_key="history"
    )
    config: Any = {"configurable": {"session_id": "user-7"}, "callbacks": [Recorder()]}
    try:
        for i in range(3):
            streamed = "".join(str(c.content) for c in chain.stream({"question": f"question {i}"}, config=config))
            assert streamed == replies[i]
        for i in range(3, 6):
            parts = [str(c.content) async for c in chain.astream({"question": f"question {i}"}, config=config)]
            assert len(parts) > 1 and "".join(parts) == replies[i]  # really streamed
    finally:
        for h in made:
            h.close()
            await h.aclose()

    # The model saw the whole conversation so far on each turn, sync writes included in async reads.
    assert [len(m) for m in seen] == [2, 4, 6, 8, 10, 12]
    assert [m.content for m in seen[5][1:11]] == [
        x for i in range(5) for x in (f"question {i}", replies[i])
    ]

    stored = langchain_workers.run("read-history", url, namespace, "user-7")
    expected = []
    for i in range(6):
        expected.append(["HumanMessage", "human", f"question {i}"])
        expected.append(["AIMessage", "ai", replies[i]])  # streamed chunks stored as one AIMessage
    assert stored == expected


@DEPRECATED
def test_conversation_buffer_memory_survives_an_app_restart(url: str, namespace: str) -> None:
    first = langchain_workers.run("classic-turn", url, namespace, "ada", "Hi, I am Ada.", "Hello Ada!")
    assert first["response"] == "Hello Ada!"
    assert first["messages"] == [["human", "Hi, I am Ada."], ["ai", "Hello Ada!"]]

    second = langchain_workers.run("classic-turn", url, namespace, "ada", "What is my name?", "You are Ada.")
    # The restarted app's LLM was prompted with the conversation the first process had.
    assert "Human: Hi, I am Ada.\nAI: Hello Ada!" in second["prompt"]
    assert second["prompt"].rstrip().endswith("Human: What is my name?\nAI:")
    assert second["messages"] == [
        ["human", "Hi, I am Ada."],
        ["ai", "Hello Ada!"],
        ["human", "What is my name?"],
        ["ai", "You are Ada."],
    ]
    other = langchain_workers.run("read-history", url, namespace, "bob")
    assert other == []


async def test_messages_round_trip_losslessly_sync_and_async(url: str, namespace: str) -> None:
    originals = rich_messages()
    with BotWireChatHistory("s1", namespace=namespace, url=url) as writer:
        writer.add_messages(originals[:3])
        for m in originals[3:]:
            writer.add_message(m)
    async with BotWireChatHistory("s1", namespace=namespace, url=url) as reader:
        back = await reader.aget_messages()
        assert back == originals
        assert [type(m) for m in back] == [type(m) for m in originals]
        ai = back[2]
        assert isinstance(ai, AIMessage)
        assert ai.tool_calls == [{"name": "search", "args": {"q": "cats", "n": 3}, "id": "call_1", "type": "tool_call"}]
        assert ai.id == "run-42" and ai.additional_kwargs["custom"] == {"nested": [1, 2.5, "x"]}
        assert ai.response_metadata == {"model_name": "fake-1", "finish_reason": "tool_calls"}
        tool = back[3]
        assert isinstance(tool, ToolMessage) and tool.tool_call_id == "call_1" and tool.artifact == {"raw": [1, 2]}
        assert back[1].content == originals[1].content  # multimodal blocks
        reader.clear()  # the sync face of the same object, inside a running loop
        assert await reader.aget_messages() == []


async def test_chunks_are_stored_as_whole_messages(history: BotWireChatHistory) -> None:
    # A streamed reply: content and tool call arguments arrive in pieces.
    pieces = [
        AIMessageChunk(
            content="Checking",
            id="run-9",
            tool_call_chunks=[{"name": "weather", "args": '{"city": ', "id": "call_9", "index": 0, "type": "tool_call_chunk"}],
        ),
        AIMessageChunk(
            content=" now.",
            tool_call_chunks=[{"name": None, "args": '"Oslo"}', "id": None, "index": 0, "type": "tool_call_chunk"}],
            response_metadata={"finish_reason": "tool_calls"},
            usage_metadata={"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
        ),
    ]
    streamed = pieces[0] + pieces[1]
    await history.aadd_messages([HumanMessageChunk(content="weather?"), streamed])
    back = history.messages
    assert [type(m) for m in back] == [HumanMessage, AIMessage]
    ai = back[1]
    assert isinstance(ai, AIMessage) and not isinstance(ai, AIMessageChunk)
    assert ai.content == "Checking now." and ai.id == "run-9"
    assert ai.tool_calls == [{"name": "weather", "args": {"city": "Oslo"}, "id": "call_9", "type": "tool_call"}]
    assert ai.response_metadata == {"finish_reason": "tool_calls"}
    assert ai.usage_metadata == {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}


def test_bad_input_raises_and_writes_nothing(history: BotWireChatHistory) -> None:
    with pytest.raises(InvalidMessage, match="message 1 is a str"):
        history.add_messages([HumanMessage("ok"), "not a message"])  # type: ignore[list-item]
    with pytest.raises(InvalidMessage, match="sequence"):
        history.add_messages(HumanMessage("one"))  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage, match="JSON"):
        history.add_messages([HumanMessage("ok"), AIMessage("x", additional_kwargs={"obj": object()})])

    async def add_async() -> None:
        try:
            await history.aadd_messages([HumanMessage("ok"), {"role": "user"}])  # type: ignore[list-item]
        finally:
            await history.aclose()

    with pytest.raises(InvalidMessage, match="message 1 is a dict"):
        asyncio.run(add_async())
    assert history.messages == []
    history.add_message(HumanMessage("now it works"))
    assert [m.content for m in history.messages] == ["now it works"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"blob": b"\x89PNG"},
        {"at": datetime(2026, 1, 1, tzinfo=UTC)},
        {"id": uuid.UUID(int=1)},
        {"price": decimal.Decimal("9.99")},
        {"pair": (1, 2)},
        {"tags": {"a"}},
        {"by_index": {0: "first"}},
        {"score": float("nan")},
    ],
    ids=["bytes", "datetime", "uuid", "decimal", "tuple", "set", "int-key", "nan"],
)
async def test_additional_kwargs_that_would_not_read_back_are_refused(
    history: BotWireChatHistory, kwargs: dict[str, Any]
) -> None:
    """They would come back converted (base64, strings, lists): InvalidMessage, nothing written,
    also when the bad message is in the second batch of 1000."""
    try:
        with pytest.raises(InvalidMessage, match="read back"):
            await history.aadd_messages([HumanMessage("q"), AIMessage("a", additional_kwargs=kwargs)])
        many: list[BaseMessage] = [HumanMessage(f"m{i}") for i in range(1500)]
        many.append(AIMessage("a", additional_kwargs={"nested": [kwargs]}))
        with pytest.raises(InvalidMessage, match="read back"):
            await history.aadd_messages(many)
        assert await history.aget_messages() == []
    finally:
        await history.aclose()


def test_invalid_names_fail_at_construction(url: str) -> None:
    with pytest.raises(InvalidSessionId):
        BotWireChatHistory("", url=url)
    with pytest.raises(InvalidNamespace):
        BotWireChatHistory("s", namespace="no spaces", url=url)
    with pytest.raises(InvalidNamespace):
        BotWireByteStore("a.b", url=url)
    with pytest.raises(InvalidNamespace):
        BotWireCache("", url=url)


def test_role_dicts_written_with_chat_history_read_as_messages(url: str, namespace: str) -> None:
    with ChatHistory("s2", namespace=namespace, url=url) as plain:
        plain.extend([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}])
        plain.append({"role": "assistant", "content": "hello"})
    with BotWireChatHistory("s2", namespace=namespace, url=url) as h:
        assert h.messages == [SystemMessage("be nice"), HumanMessage("hi"), AIMessage("hello")]
        h.add_user_message("and you?")
        assert isinstance(h.messages[-1], HumanMessage)


def test_many_messages_clear_and_sessions_are_separate(url: str, namespace: str) -> None:
    with (
        BotWireChatHistory("a", namespace=namespace, url=url) as a,
        BotWireChatHistory("b", namespace=namespace, url=url) as b,
    ):
        a.add_messages([HumanMessage(f"m{i}") for i in range(1001)])  # more than one atomic batch
        b.add_message(AIMessage("only b"))
        got = a.messages
        assert len(got) == 1001 and got[0].content == "m0" and got[-1].content == "m1000"
        a.clear()
        assert a.messages == []
        assert b.messages == [AIMessage("only b")]


class _NoThreadsExecutor(concurrent.futures.ThreadPoolExecutor):
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"an async method handed {fn!r} to a thread")


def test_async_methods_run_on_the_callers_loop_without_threads(url: str, namespace: str) -> None:
    history = BotWireChatHistory("s1", namespace=namespace, url=url)
    store = BotWireByteStore(namespace, url=url)
    cache = BotWireCache(namespace, url=url)
    thread = threading.current_thread()

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(_NoThreadsExecutor())
        await history.aadd_messages([HumanMessage("hi"), AIMessage("hello")])
        assert [m.content for m in await history.aget_messages()] == ["hi", "hello"]
        await history.aclear()
        await store.amset([("k", b"v")])
        assert await store.amget(["k"]) == [b"v"]
        assert [k async for k in store.ayield_keys()] == ["k"]
        await store.amdelete(["k"])
        await cache.aupdate("p", "llm", [Generation(text="t")])
        assert await cache.alookup("p", "llm") == [Generation(text="t")]
        await cache.aclear()
        assert threading.current_thread() is thread
        await history.aclose()
        await store.aclose()
        await cache.aclose()

    asyncio.run(main())


def test_one_object_serves_several_event_loops_and_threads(url: str, namespace: str) -> None:
    history = BotWireChatHistory("s1", namespace=namespace, url=url)

    async def turn(i: int) -> int:
        await history.aadd_messages([HumanMessage(f"q{i}")])
        n = len(await history.aget_messages())
        await history.aclose()
        return n

    assert asyncio.run(turn(0)) == 1
    assert asyncio.run(turn(1)) == 2  # a new loop: a new connection, not the dead loop's
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: asyncio.run(turn(i)), range(2, 6)))
        list(pool.map(lambda i: history.add_message(AIMessage(f"a{i}")), range(4)))
    contents = [m.content for m in history.messages]
    history.close()
    assert len(contents) == 10
    assert sorted(contents) == sorted([f"q{i}" for i in range(6)] + [f"a{i}" for i in range(4)])


def test_importing_botwire_stream_does_not_import_langchain() -> None:
    code = "import sys, botwire_stream, botwire_stream.integrations; assert not [m for m in sys.modules if m.startswith('langchain')]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=langchain_workers.ROOT, timeout=60)


# -- byte store ----------------------------------------------------------------------------------
def test_byte_store_keeps_any_bytes_and_matches_prefixes_literally(url: str, namespace: str) -> None:
    every_byte = bytes(range(256))
    keys = ["a*b:1", "a*bc", "axb", "a?b", "[x]1", "x", "doc:1:chunk:0", "doc:1:chunk:1", "doc:10", "ü:ok"]
    with BotWireByteStore(namespace, url=url) as store:
        store.mset([(k, every_byte + k.encode()) for k in keys] + [("empty", b"")])
        assert store.mget(keys + ["empty", "missing"]) == [every_byte + k.encode() for k in keys] + [b"", None]
        assert list(store.yield_keys(prefix="a*b")) == ["a*b:1", "a*bc"]
        assert list(store.yield_keys(prefix="a?")) == ["a?b"]
        assert list(store.yield_keys(prefix="[x]")) == ["[x]1"]
        assert list(store.yield_keys(prefix="doc:1:")) == ["doc:1:chunk:0", "doc:1:chunk:1"]
        assert list(store.yield_keys(prefix="doc:1")) == ["doc:10", "doc:1:chunk:0", "doc:1:chunk:1"]  # sorted
        assert list(store.yield_keys(prefix="")) == sorted(keys + ["empty"])
        store.mset([("bytearray", bytearray(b"\x00\x01"))])  # type: ignore[list-item]
        assert store.mget(["bytearray"]) == [b"\x00\x01"]


async def test_byte_store_many_keys_async(url: str, namespace: str) -> None:
    async with BotWireByteStore(namespace, url=url) as store:
        pairs = [(f"k:{i:03d}", i.to_bytes(2, "big") * 50) for i in range(200)]
        await store.amset(pairs)
        wanted = [f"k:{i:03d}" for i in range(199, -1, -3)] + ["k:nope"]
        assert await store.amget(wanted) == [dict(pairs).get(k) for k in wanted]
        await store.amdelete([k for k, _ in pairs[:100]])
        assert [k async for k in store.ayield_keys(prefix="k:")] == [k for k, _ in pairs[100:]]


def test_byte_store_bad_input_writes_nothing(url: str, namespace: str) -> None:
    with BotWireByteStore(namespace, url=url) as store:
        with pytest.raises(TypeError, match="holds bytes"):
            store.mset([("a", b"1"), ("b", "text")])  # type: ignore[list-item]
        with pytest.raises(InvalidKey):
            store.mset([("a", b"1"), ("", b"2")])
        assert store.mget(["a", "b"]) == [None, None]
        assert list(store.yield_keys()) == []


def test_byte_store_values_expire_with_ttl_setting_and_are_shared(url: str, namespace: str) -> None:
    with BotWireByteStore(namespace, url=url, ttl=3600) as store, Memory(namespace, url=url) as memory:
        store.mset([("k", b"\xffdata")])
        assert memory.revisions("k")[-1].op == "set"
        other = BotWireByteStore(namespace, url=url)
        assert other.mget(["k"]) == [b"\xffdata"]
        other.close()


# -- LLM cache -----------------------------------------------------------------------------------
def test_cache_serves_a_chat_model_and_keeps_chat_generations(url: str, namespace: str) -> None:
    with BotWireCache(namespace, url=url) as cache:
        model = FakeListChatModel(responses=["first", "second"], cache=cache)
        assert model.invoke("hi").content == "first"
        assert model.invoke("hi").content == "first"  # served by the cache, not the model
        assert model.invoke("other").content == "second"

        message = AIMessage(
            "x",
            id="run-1",
            tool_calls=[{"name": "f", "args": {"a": 1}, "id": "c1", "type": "tool_call"}],
            usage_metadata={"input_tokens": 1, "output_tokens": 1, "total_tokens": 2},
        )
        gens = [ChatGeneration(message=message, generation_info={"finish_reason": "stop"}), Generation(text="plain")]
        cache.update("prompt", "llm-a", gens)
        again = BotWireCache(namespace, url=url)
        assert again.lookup("prompt", "llm-a") == gens
        assert again.lookup("prompt", "llm-b") is None  # the llm string is part of the key
        again.close()


async def test_cache_async_model_path_and_clear_keeps_other_keys(url: str, namespace: str) -> None:
    async with BotWireCache(namespace, url=url) as cache:
        model = FakeListChatModel(responses=["one", "two"], cache=cache)
        assert (await model.ainvoke("hi")).content == "one"
        assert (await model.ainvoke("hi")).content == "one"
        with Memory(namespace, url=url) as memory:
            memory.set("user:1", {"keep": True})
            await cache.aclear()
            assert memory.get("user:1") == {"keep": True}
            assert memory.list_keys() == ["user:1"]
        assert (await model.ainvoke("hi")).content == "two"  # cleared: asked the model again


def test_cache_rejects_non_generations(url: str, namespace: str) -> None:
    with BotWireCache(namespace, url=url) as cache:
        with pytest.raises(TypeError, match="Generation"):
            cache.update("p", "l", ["text"])  # type: ignore[list-item]
        assert cache.lookup("p", "l") is None


def test_glob_escape() -> None:
    assert glob_escape("a*b?c[d]") == "a[*]b[?]c[[]d]"


def test_byte_store_and_cache_refuse_wrong_types_with_invalid_value(url: str, namespace: str) -> None:
    # A documented class (also a TypeError, as LangChain's stores raise), nothing written.
    with BotWireByteStore(namespace, url=url) as store:
        with pytest.raises(InvalidValue, match="holds bytes"):
            store.mset([("a", b"1"), ("b", "text")])  # type: ignore[list-item]
        assert store.mget(["a", "b"]) == [None, None]
    with BotWireCache(namespace, url=url) as cache:
        with pytest.raises(InvalidValue, match="Generation"):
            cache.update("prompt", "llm", ["not a generation"])  # type: ignore[list-item]
        assert cache.lookup("prompt", "llm") is None
