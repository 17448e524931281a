"""QA of the conversation-log fixes of issue 18, against a real nats-server: deep messages read
from deep code, event loops closed without ``shutdown_asyncgens``, reads racing other processes,
and ``sessions()`` cursors."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest

from botwire_stream import AsyncChatHistory, ChatHistory, SessionInfo
from botwire_stream.errors import InvalidArgument, InvalidMessage


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
