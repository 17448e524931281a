"""AutoGen adapters with the real autogen-core/autogen-agentchat: a model context kept in a
conversation log (an AssistantAgent remembers across processes) and a memory in a namespace."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
from autogen_core import ComponentModel, FunctionCall  # noqa: E402
from autogen_core.memory import MemoryContent, MemoryMimeType  # noqa: E402
from autogen_core.model_context import ChatCompletionContext, UnboundedChatCompletionContext  # noqa: E402
from autogen_core.models import (  # noqa: E402
    AssistantMessage,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    SystemMessage,
    UserMessage,
)

from botwire_stream import ChatHistory  # noqa: E402
from botwire_stream.errors import InvalidArgument, InvalidMessage, InvalidNamespace, InvalidValue  # noqa: E402
from botwire_stream.integrations.autogen import BotWireChatCompletionContext, BotWireMemory  # noqa: E402

# One agent turn in a fresh process: the model (a replaying fake that records what it was sent)
# answers with the next scripted reply; prints what the model saw.
_AGENT = r"""
import asyncio, json, sys
from autogen_agentchat.agents import AssistantAgent
from autogen_ext.models.replay import ReplayChatCompletionClient
from botwire_stream.integrations.autogen import BotWireChatCompletionContext

class Recording(ReplayChatCompletionClient):
    seen = []
    async def create(self, messages, **kwargs):
        self.seen.append([str(m.content) for m in messages])
        return await super().create(messages, **kwargs)

async def main(url, session, user, reply):
    client = Recording([reply])
    ctx = BotWireChatCompletionContext(session, url=url)
    agent = AssistantAgent("assistant", model_client=client, model_context=ctx)
    result = await agent.run(task=user)
    print(json.dumps({"answer": result.messages[-1].content, "model_saw": client.seen[-1]}))

asyncio.run(main(*sys.argv[1:]))
"""


def _turn(url: str, session: str, user: str, reply: str, *, here: bool = False) -> dict[str, object]:
    if here:  # in this process (autogen is imported once per process: seconds of CPU)
        scope: dict[str, object] = {"__name__": "turn"}
        exec(compile(_AGENT.replace("asyncio.run(main(*sys.argv[1:]))", ""), "agent", "exec"), scope)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            asyncio.run(scope["main"](url, session, user, reply))  # type: ignore[operator]
        here_out: dict[str, object] = json.loads(buf.getvalue())
        return here_out
    done = subprocess.run(
        [sys.executable, "-c", _AGENT, url, session, user, reply],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.slow
def test_an_assistant_agent_remembers_the_conversation_across_processes(url: str, namespace: str) -> None:
    session = f"{namespace}-s"
    first = _turn(url, session, "My name is Ada.", "Nice to meet you, Ada.", here=True)
    assert first["answer"] == "Nice to meet you, Ada."
    second = _turn(url, session, "What is my name?", "Your name is Ada.")
    # the model of the second process was sent the first process's turn, then the new question
    saw = second["model_saw"]
    assert isinstance(saw, list)
    assert saw[-3:] == ["My name is Ada.", "Nice to meet you, Ada.", "What is my name?"]
    # and the log is a plain conversation any botwire client reads
    stored = ChatHistory(session, namespace="autogen", url=url).messages()
    assert [m["content"] for m in stored] == [
        "My name is Ada.",
        "Nice to meet you, Ada.",
        "What is my name?",
        "Your name is Ada.",
    ]


async def test_messages_round_trip_and_state_replaces_the_log(url: str, namespace: str) -> None:
    ctx = BotWireChatCompletionContext("s1", namespace=namespace, url=url)
    assert isinstance(ctx, ChatCompletionContext)
    sent = [
        SystemMessage(content="be brief"),
        UserMessage(content="hi", source="user"),
        AssistantMessage(content="hello", source="assistant", thought="greet"),
        AssistantMessage(content=[FunctionCall(id="c1", name="f", arguments='{"x": 1}')], source="assistant"),
        FunctionExecutionResultMessage(
            content=[FunctionExecutionResult(content="42", name="f", call_id="c1", is_error=False)]
        ),
    ]
    for m in sent:
        await ctx.add_message(m)
    again = BotWireChatCompletionContext("s1", namespace=namespace, url=url)  # another object: same log
    assert await again.get_messages() == sent
    state = await again.save_state()
    # AutoGen's own context accepts our state, and ours accepts its state
    plain = UnboundedChatCompletionContext()
    await plain.load_state(state)
    assert await plain.get_messages() == sent
    other = UnboundedChatCompletionContext()
    await other.add_message(UserMessage(content="only this", source="user"))
    await ctx.load_state(await other.save_state())
    assert await again.get_messages() == [UserMessage(content="only this", source="user")]
    await ctx.clear()
    assert await again.get_messages() == []
    await ctx.close()
    await again.close()


async def test_buffer_size_gives_the_last_messages_and_keeps_all(url: str, namespace: str) -> None:
    ctx = BotWireChatCompletionContext("s", namespace=namespace, url=url, buffer_size=2)
    result = FunctionExecutionResultMessage(
        content=[FunctionExecutionResult(content="1", name="f", call_id="c", is_error=False)]
    )
    for m in [UserMessage(content="a", source="u"), result, UserMessage(content="b", source="u")]:
        await ctx.add_message(m)
    # a leading function result without its call is dropped, as BufferedChatCompletionContext does
    assert await ctx.get_messages() == [UserMessage(content="b", source="u")]
    assert len((await ctx.save_state())["messages"]) == 3
    await ctx.close()


async def test_component_configs_round_trip(url: str, namespace: str) -> None:
    ctx = BotWireChatCompletionContext("s", namespace=namespace, url=url, buffer_size=5)
    await ctx.add_message(UserMessage(content="kept", source="u"))
    model = ctx.dump_component()
    assert model.provider == "botwire_stream.integrations.autogen.BotWireChatCompletionContext"
    assert model.config == {"session_id": "s", "namespace": namespace, "url": url, "buffer_size": 5}
    loaded = ChatCompletionContext.load_component(ComponentModel.model_validate_json(model.model_dump_json()))
    assert isinstance(loaded, BotWireChatCompletionContext)
    assert await loaded.get_messages() == [UserMessage(content="kept", source="u")]

    mem = BotWireMemory(namespace, url=url)
    await mem.add(MemoryContent(content="likes tea", mime_type=MemoryMimeType.TEXT))
    from autogen_core.memory import Memory

    mem2 = Memory.load_component(mem.dump_component())
    assert isinstance(mem2, BotWireMemory)
    assert [m.content for m in (await mem2.query()).results] == ["likes tea"]
    for c in (ctx, loaded):
        await c.close()
    await mem.close()
    await mem2.close()


async def test_memory_keeps_order_and_updates_a_context(url: str, namespace: str) -> None:
    mem = BotWireMemory(namespace, url=url)
    assert (await mem.update_context(UnboundedChatCompletionContext())).memories.results == []
    facts = [
        MemoryContent(content="first", mime_type=MemoryMimeType.TEXT),
        MemoryContent(content={"units": "metric"}, mime_type=MemoryMimeType.JSON, metadata={"src": "profile"}),
        MemoryContent(content="third", mime_type=MemoryMimeType.MARKDOWN),
    ]
    for f in facts:
        await mem.add(f)
    other = BotWireMemory(namespace, url=url)  # another process would see the same
    assert (await other.query("anything")).results == facts
    ctx = UnboundedChatCompletionContext()
    result = await other.update_context(ctx)
    assert result.memories.results == facts
    [system] = await ctx.get_messages()
    assert isinstance(system, SystemMessage) and "1. first" in system.content and "3. third" in system.content
    await mem.clear()
    assert (await other.query()).results == []
    await mem.close()
    await other.close()


async def test_bad_input_raises_and_writes_nothing(url: str, namespace: str) -> None:
    with pytest.raises(InvalidNamespace):
        BotWireMemory("bad ns", url=url)
    with pytest.raises(InvalidArgument):
        BotWireChatCompletionContext("s", namespace=namespace, url=url, buffer_size=0)
    ctx = BotWireChatCompletionContext("s", namespace=namespace, url=url)
    with pytest.raises(InvalidMessage):
        await ctx.add_message({"role": "user", "content": "not an LLMMessage"})  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage):
        await ctx.load_state({"messages": [{"type": "Nope"}]})
    assert await ctx.get_messages() == []
    mem = BotWireMemory(namespace, url=url)
    with pytest.raises(InvalidValue):
        await mem.add(MemoryContent(content=b"\x00\xff", mime_type=MemoryMimeType.BINARY))
    with pytest.raises(InvalidValue):
        await mem.add("a plain str")  # type: ignore[arg-type]
    assert (await mem.query()).results == []
    await ctx.close()
    await mem.close()
