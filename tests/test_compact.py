"""Compaction's read side: ``compact`` records a summary event (append-only: every message stays for
replay and audit), ``messages(window=N)`` returns the latest summary plus at most N messages after
what it covers, exact under concurrent appends; bad input writes nothing."""

from __future__ import annotations

import asyncio

import pytest

from botwire_stream import AsyncChatHistory, ChatHistory, areplay
from botwire_stream.errors import InvalidArgument

SUMMARY = {"role": "system", "content": "the user said 0, 1 and 2"}


async def test_window_is_the_summary_plus_the_messages_after_it(url: str, namespace: str) -> None:
    async with AsyncChatHistory("c", namespace=namespace, url=url) as c:
        seqs = await c.extend([{"n": i} for i in range(5)])
        assert await c.messages(window=2) == [{"n": 3}, {"n": 4}]  # no summary yet: the newest N
        assert await c.compact("the user said 0, 1 and 2", upto=seqs[2]) > 0
        assert await c.messages(window=10) == [SUMMARY, {"n": 3}, {"n": 4}]
        assert await c.messages(window=1) == [SUMMARY, {"n": 4}]
        assert await c.messages(window=0) == [SUMMARY]
        # plain reads are unchanged, and the full log stays for replay
        assert await c.messages() == [{"n": i} for i in range(5)]
        events = [(e.kind, e.value, e.upto) async for e in areplay(namespace, url=url)]
        assert events == [*(("append", {"n": i}, None) for i in range(5)), ("summary", SUMMARY, seqs[2])]
        # a later summary replaces it; a clear ends it
        await c.append({"n": 5})
        await c.compact({"role": "system", "content": "0-4"}, upto=seqs[4])
        assert await c.messages(window=5) == [{"role": "system", "content": "0-4"}, {"n": 5}]
        await c.clear()
        await c.append({"n": 6})
        assert await c.messages(window=5) == [{"n": 6}]
    with ChatHistory("s", namespace=namespace, url=url) as sync:
        first = sync.append({"n": 0})
        sync.append({"n": 1})
        sync.compact("zero", upto=first)
        assert sync.messages(window=3) == [{"role": "system", "content": "zero"}, {"n": 1}]


@pytest.mark.parametrize("upto", [0, -1, True, None, "1", 10_000])
async def test_a_summary_of_what_is_not_there_is_refused(url: str, namespace: str, upto: object) -> None:
    async with AsyncChatHistory("c", namespace=namespace, url=url) as c:
        await c.append({"n": 0})
        other = await AsyncChatHistory("other", namespace=namespace, url=url).append({"x": 1})
        with pytest.raises(InvalidArgument):
            await c.compact("s", upto=upto)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="not a message of conversation"):
            await c.compact("s", upto=other)  # another conversation's message
        with pytest.raises(InvalidArgument):
            await c.compact("", upto=1)
        with pytest.raises(InvalidArgument):
            await c.messages(window=-1)
        assert [e.kind async for e in areplay(namespace, url=url)] == ["append", "append"]
        assert await c.messages(window=5) == [{"n": 0}]


async def test_window_is_exact_under_concurrent_appends(url: str, namespace: str) -> None:
    async with AsyncChatHistory("c", namespace=namespace, url=url) as c:
        seqs = await c.extend([{"n": -1}, {"n": 0}])
        await c.compact("before", upto=seqs[1])
        written = [{"n": i} for i in range(1, 301)]

        async def writer() -> None:
            async with AsyncChatHistory("c", namespace=namespace, url=url) as w:
                for m in written:
                    await w.append(m)

        task = asyncio.create_task(writer())
        seen = 0
        while not task.done() or seen < 2:
            got = await c.messages(window=5)
            assert got[0] == {"role": "system", "content": "before"}
            tail = got[1:]
            # the newest messages after the summary at one moment: no gap, no repeat, no old one
            k = 0 if not tail else tail[-1]["n"]
            assert tail == written[max(0, k - 5) : k]
            seen += 1
        await task
        assert await c.messages(window=5) == [{"role": "system", "content": "before"}, *written[-5:]]
