"""QA of issue 17's kept messages: what another client can do that the newest-kept check misses."""

from __future__ import annotations

import nats

from botwire_stream import AsyncChatHistory
from botwire_stream.nats.chatlog import stream_name


async def test_purge_keeping_newest_is_seen(url: str, namespace: str) -> None:
    async with AsyncChatHistory("s1", namespace=namespace, url=url) as chat:
        for i in range(5):
            await chat.append({"i": i})
        assert await chat.messages(last=3) == [{"i": 2}, {"i": 3}, {"i": 4}]
        nc = await nats.connect(url)
        try:
            await nc.jetstream().purge_stream(stream_name(namespace), subject=f"botwire.{namespace}.chat.>", keep=1)
        finally:
            await nc.close()
        assert await chat.messages() == [{"i": 4}]
        assert await chat.messages(last=3) == [{"i": 4}]


async def test_purge_keeping_some_kept_is_seen_by_entries(url: str, namespace: str) -> None:
    """A stream-API purge keeping two of the three kept messages: ``entries(last=3)`` serves the two."""
    async with AsyncChatHistory("s1", namespace=namespace, url=url) as chat:
        for i in range(6):
            await chat.append({"i": i})
        before = await chat.entries(last=3)
        assert [e.message for e in before] == [{"i": 3}, {"i": 4}, {"i": 5}]
        nc = await nats.connect(url)
        try:
            await nc.jetstream().purge_stream(stream_name(namespace), subject=f"botwire.{namespace}.chat.>", keep=2)
        finally:
            await nc.close()
        assert await chat.messages(last=3) == [{"i": 4}, {"i": 5}]  # the kept tail's pipelined check
        assert await chat.entries(last=3) == before[1:]
        await chat.append({"i": 6})
        assert [e.message for e in await chat.entries(last=3)] == [{"i": 4}, {"i": 5}, {"i": 6}]
