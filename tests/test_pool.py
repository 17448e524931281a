"""The per-event-loop connection pool: a connection never outlives the event loop it belongs to."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings

from langchain_core.messages import HumanMessage

from botwire_stream import AsyncChatHistory, AsyncMemory
from botwire_stream.integrations.langchain import BotWireChatHistory
from tests.resources import live_event_loops, open_sockets


def test_event_loops_that_end_with_objects_left_open_leave_no_sockets(url: str, namespace: str) -> None:
    """The LangChain factory pattern with ``asyncio.run`` per request, nothing closed: 30 requests
    used to leave 30 sockets open, which ``gc.collect()`` did not free. The finished loops are
    freed too, also those a long-lived adapter object was used on."""
    shared = BotWireChatHistory("long-lived", namespace=namespace, url=url)

    async def request(i: int) -> None:
        chat = AsyncChatHistory(f"plain-{i}", namespace=namespace, url=url)
        await chat.append({"i": i})
        history = BotWireChatHistory(f"lc-{i}", namespace=namespace, url=url)
        assert await history.aget_messages() == []
        memory = AsyncMemory(namespace, url=url)
        await memory.set("k", i)
        await shared.aadd_messages([HumanMessage(f"turn {i}")])

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # no socket left for the garbage collector
        asyncio.run(request(0))
        gc.collect()
        before, loops_before = open_sockets(), live_event_loops()
        started = time.monotonic()
        for i in range(1, 31):
            asyncio.run(request(i))
        gc.collect()
        assert open_sockets() - before <= 2
        assert live_event_loops() - loops_before <= 2
    assert time.monotonic() - started < 60  # closing at loop shutdown does not hang
    assert len(shared.messages) == 31


def test_a_connection_closed_with_its_loop_is_reopened_by_a_new_loop(url: str, namespace: str) -> None:
    chat = AsyncChatHistory("again", namespace=namespace, url=url)

    async def first() -> int:
        return await chat.append({"n": 1})

    asyncio.run(first())

    async def second() -> list[dict[str, int]]:
        async with AsyncChatHistory("again", namespace=namespace, url=url) as other:
            return await other.messages()

    assert asyncio.run(second()) == [{"n": 1}]
