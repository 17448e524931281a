"""An AutoGen AssistantAgent whose conversation lives in botwire-stream: run it twice, the second
run's model is sent the first run's messages too.

    pip install 'botwire-stream[autogen]' autogen-ext
    python examples/autogen_agent.py

Uses the embedded server (or BOTWIRE_URL). The model is AutoGen's ReplayChatCompletionClient, so
no key is needed; put your real model client in its place.
"""

from __future__ import annotations

import asyncio

from autogen_agentchat.agents import AssistantAgent
from autogen_core.memory import MemoryContent, MemoryMimeType
from autogen_ext.models.replay import ReplayChatCompletionClient

from botwire_stream.integrations.autogen import BotWireChatCompletionContext, BotWireMemory


async def main() -> None:
    context = BotWireChatCompletionContext("autogen-example")
    facts = BotWireMemory("autogen-example-facts")
    if not (await facts.query()).results:
        await facts.add(MemoryContent(content="The user prefers short answers.", mime_type=MemoryMimeType.TEXT))
    agent = AssistantAgent(
        "assistant",
        model_client=ReplayChatCompletionClient(["Noted."]),
        model_context=context,
        memory=[facts],
    )
    result = await agent.run(task="Remember that I am flying to Lisbon on Friday.")
    print("answer:", result.messages[-1].content)
    print("messages kept for the next run:", len(await context.get_messages()))
    print("config:", agent.dump_component().config["model_context"])
    await context.close()
    await facts.close()


if __name__ == "__main__":
    asyncio.run(main())
