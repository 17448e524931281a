"""QA of the conversation-log fixes of issue 18, against a real nats-server: deep messages read
from deep code, event loops closed without ``shutdown_asyncgens``, reads racing other processes,
and ``sessions()`` cursors."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from datetime import datetime
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from botwire_stream import AsyncChatHistory, AsyncMemory, ChatHistory, Memory, SessionInfo
from botwire_stream.errors import InvalidArgument, InvalidMessage
from botwire_stream.integrations.langchain import BotWireChatHistory


def _nested(depth: int) -> dict[str, Any]:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return {"deep": value}


def test_the_deepest_message_append_accepts_reads_back_from_deeper_code(url: str, namespace: str) -> None:
    """How deep a message may nest is Python's recursion limit counted from the caller's stack: a
    message ``append`` accepted must read back through ``messages``, ``entries`` and ``watch`` when
    they are called 60 calls deeper (a web framework's handler), not raise ``RecursionError``."""

    async def main() -> tuple[int, list[Any]]:
        async with AsyncChatHistory("deep", namespace=namespace, url=url) as chat:
            depth = 1000
            while True:  # the deepest message append accepts here; deeper: InvalidMessage, unwritten
                try:
                    await chat.append(_nested(depth))
                    break
                except InvalidMessage:
                    depth -= 1
            assert depth > 900

            async def from_deeper(calls: int) -> list[Any]:
                if calls:
                    return await from_deeper(calls - 1)
                watch = chat.watch(after=0)
                try:
                    watched = await asyncio.wait_for(anext(aiter(watch)), 10)
                finally:
                    await watch.aclose()
                return [await chat.messages(), [e.message for e in await chat.entries()], [watched.message]]

            return depth, await from_deeper(60)

    depth, reads = asyncio.run(main())
    for read in reads:
        assert read == [_nested(depth)]


@pytest.mark.parametrize(
    "before",
    [
        SessionInfo("c1", 1, datetime.now()),  # a naive time
        SessionInfo("c1", 1, "2030-01-01T00:00:00Z"),  # type: ignore[arg-type]
        SessionInfo(1, 1, datetime.now().astimezone()),  # type: ignore[arg-type]
    ],
)
def test_a_hand_made_session_info_cursor_with_a_naive_time_is_an_invalid_argument(
    url: str, namespace: str, before: SessionInfo
) -> None:
    """A cursor rebuilt by hand (from a page token, say) is checked as a tuple cursor is: a naive
    or missing time is ``InvalidArgument``, not the ``TypeError`` of comparing datetimes."""
    with ChatHistory("c0", namespace=namespace, url=url) as chat:
        chat.append({"n": 0})
    with pytest.raises(InvalidArgument, match="aware datetime"):
        ChatHistory.sessions(namespace, url=url, before=before)


def _open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # closed while listing
    return count


def _live_event_loops() -> int:
    return sum(isinstance(o, asyncio.AbstractEventLoop) for o in gc.get_objects())


# The garbage collector frees the shut sockets with asyncio's "unclosed transport" warning: the
# loop that could have closed them cleanly was closed under them.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_loops_closed_without_shutdown_asyncgens_leave_no_sockets(
    url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``new_event_loop()``, ``run_until_complete()``, ``close()`` per request (no
    ``shutdown_asyncgens``, as much older code does), objects left open: each loop used to keep its
    socket for good (20 loops, 20 sockets). Now the next loop closes them, quietly (no "Task was
    destroyed but it is pending!"), the loops are freed, and the sync face still works."""

    async def request(i: int) -> None:
        chat = AsyncChatHistory(f"plain-{i}", namespace=namespace, url=url)
        await chat.append({"i": i})
        history = BotWireChatHistory(f"lc-{i}", namespace=namespace, url=url)
        await history.aadd_messages([HumanMessage(f"turn {i}")])
        memory = AsyncMemory(namespace, url=url)
        await memory.set("k", i)

    def run(i: int) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(request(i))
        finally:
            loop.close()

    run(0)
    gc.collect()
    before, loops_before = _open_sockets(), _live_event_loops()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for i in range(1, 21):
            run(i)
        gc.collect()
    assert _open_sockets() - before <= 2
    assert _live_event_loops() - loops_before <= 2
    assert not [r for r in caplog.records if r.name == "asyncio"]
    assert ChatHistory("plain-20", namespace=namespace, url=url).messages() == [{"i": 20}]
    assert Memory(namespace, url=url).get("k") == 20
