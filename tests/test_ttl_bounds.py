"""The longest TTL: 100 years (``MAX_TTL_SECONDS``). Longer ones raise ``InvalidTTL`` before
anything is written, for keys and for conversations; the longest is kept by the server.

nats-server keeps an expiry as int64 nanoseconds since 1970: a TTL above about 7.44e9 s wraps
around and the server deletes at once. Each "kept" test waits until a control that the server
must remove has been removed, then looks at the long-lived one: no fixed sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import nats
import pytest

from botwire_stream import AsyncChatHistory, ChatHistory, Memory
from botwire_stream.errors import InvalidTTL
from botwire_stream.keys import encode_key
from botwire_stream.times import MAX_TTL_SECONDS, ttl_seconds
from tests.waits import until

TOO_LONG: list[Any] = [
    MAX_TTL_SECONDS + 1,
    MAX_TTL_SECONDS + 0.5,  # rounds up to MAX + 1
    7.5e9,
    1e11,
    2**63,
    10**400,
    timedelta(days=365 * 300),
    timedelta(seconds=MAX_TTL_SECONDS + 1),
]


@pytest.fixture
def memory(url: str, namespace: str) -> Iterator[Memory]:
    with Memory(namespace, url=url) as m:
        yield m


def test_the_longest_ttl_is_100_years() -> None:
    assert MAX_TTL_SECONDS == 100 * 365.25 * 86400
    assert ttl_seconds(MAX_TTL_SECONDS) == MAX_TTL_SECONDS
    assert ttl_seconds(timedelta(days=36525)) == MAX_TTL_SECONDS
    for ttl in TOO_LONG:
        with pytest.raises(InvalidTTL, match="at most 3155760000 seconds"):
            ttl_seconds(ttl)


@pytest.mark.parametrize("ttl", TOO_LONG, ids=repr)
def test_a_too_long_ttl_raises_and_writes_nothing(memory: Memory, ttl: Any) -> None:
    memory.set("kept", "old")
    with pytest.raises(InvalidTTL):
        memory.set("k", 1, ttl=ttl)
    with pytest.raises(InvalidTTL):
        memory.update("kept", lambda v: v + "!", ttl=ttl)
    assert memory.revisions("k") == []
    assert [r.value for r in memory.revisions("kept")] == ["old"]


async def test_the_longest_ttl_is_kept_by_the_server(url: str, namespace: str) -> None:
    with Memory(namespace, url=url) as memory:
        rev = memory.set("kept", "v", ttl=MAX_TTL_SECONDS)
        # The control: what a too-long TTL did before it was refused (written by hand here).
        nc = await nats.connect(url)
        try:
            await nc.jetstream().publish(
                f"$KV.botwire_{namespace}.{encode_key('wrapped')}", b'"w"', headers={"Nats-TTL": "7500000000"}
            )
        finally:
            await nc.close()

        async def control_gone() -> bool:
            return await asyncio.to_thread(memory.get, "wrapped") is None

        await until(control_gone, "the server removes a key whose TTL wrapped around", bound=15, every=0.1)
        assert memory.get("kept") == "v"
        assert memory.revisions("kept")[-1].revision == rev


def test_a_conversation_with_a_too_long_ttl_is_refused(url: str, namespace: str) -> None:
    for ttl in [*TOO_LONG, 8e9, 10**12]:
        with pytest.raises(InvalidTTL):
            ChatHistory("c", namespace=namespace, url=url, ttl=ttl)
    assert ChatHistory.sessions(namespace=namespace, url=url) == []


async def test_a_conversation_with_the_longest_ttl_is_kept(url: str, namespace: str) -> None:
    kept = AsyncChatHistory("kept", namespace=namespace, url=url, ttl=MAX_TTL_SECONDS)
    control = AsyncChatHistory("control", namespace=namespace, url=url, ttl=1)
    try:
        await kept.append({"role": "user", "content": "hi"})
        await control.append({"role": "user", "content": "bye"})

        async def control_gone() -> bool:
            return await control.messages() == []

        await until(control_gone, "the 1 s conversation expires", bound=15, every=0.1)
        assert await kept.messages() == [{"role": "user", "content": "hi"}]
    finally:
        await kept.close()
        await control.close()
