"""Opening options: ``history=`` is checked and applied to existing namespaces; an async object
used from a second event loop says so instead of failing inside nats-py."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, ChatHistory, Memory
from botwire_stream.errors import InvalidArgument, WrongEventLoop


@pytest.mark.parametrize("history", [1.5, True, False, "3", 0, 65, -1, 16.0])
def test_history_must_be_an_int_from_1_to_64(url: str, namespace: str, history: Any) -> None:
    with pytest.raises(InvalidArgument, match="history must be an int from 1 to 64"):
        AsyncMemory(namespace, url=url, history=history)
    with pytest.raises(InvalidArgument, match="history must be an int from 1 to 64"):
        Memory(namespace, url=url, history=history)


def _write(memory: Memory, n: int) -> None:
    for i in range(n):
        memory.set("k", i)


def test_an_explicit_history_is_applied_to_an_existing_namespace(url: str, namespace: str) -> None:
    with Memory(namespace, url=url) as memory:  # created with the default, 16
        _write(memory, 20)
        assert len(memory.revisions("k")) == 16
    with Memory(namespace, url=url, history=64) as memory:
        _write(memory, 30)
        assert len(memory.revisions("k")) == 46
    with Memory(namespace, url=url) as memory:  # no history=: the namespace's setting stays
        _write(memory, 30)
        assert len(memory.revisions("k")) == 64
    with Memory(namespace, url=url, history=4) as memory:  # lowering trims the kept revisions
        memory.set("k", "last")
        trail = memory.revisions("k")
        assert len(trail) == 4 and trail[-1].value == "last"


def test_an_async_memory_used_on_a_second_event_loop_says_so(url: str, namespace: str) -> None:
    memory = AsyncMemory(namespace, url=url)
    asyncio.run(memory.set("k", 1))
    with pytest.raises(WrongEventLoop, match="create one AsyncMemory per event loop"):
        asyncio.run(memory.set("k", 2))
    with pytest.raises(WrongEventLoop):
        asyncio.run(memory.get("k"))
    asyncio.run(memory.close())  # its first loop is gone: closing just forgets the connection
    with Memory(namespace, url=url) as check:
        assert [r.value for r in check.revisions("k")] == [1]


def test_an_async_chat_used_while_its_first_loop_runs_elsewhere_says_so(url: str, namespace: str) -> None:
    chat = AsyncChatHistory("c", namespace=namespace, url=url)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(chat.append({"n": 1}), loop).result(30)
        with pytest.raises(WrongEventLoop, match="or use ChatHistory"):
            asyncio.run(chat.append({"n": 2}))
        with pytest.raises(WrongEventLoop):
            asyncio.run(chat.close())
        asyncio.run_coroutine_threadsafe(chat.close(), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert ChatHistory("c", namespace=namespace, url=url).messages() == [{"n": 1}]
