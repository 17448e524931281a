"""QA of issue 17's kept messages: what another client can do that the newest-kept check misses."""

from __future__ import annotations

import nats
import pytest

from botwire_stream import AsyncChatHistory
from botwire_stream.nats.chatlog import stream_name


@pytest.mark.xfail(strict=True, reason="kept tail checked by its newest message only: a stream-API purge keeping the newest is not seen")
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
