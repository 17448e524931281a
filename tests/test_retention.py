"""Retention per namespace, applied by the server's own stream limits: set, reflected, changed,
enforced (what replay and ``at=`` reach follows it), and refused when invalid with nothing changed."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, Retention, areplay, aretention, retention
from botwire_stream.errors import BeforeRetention, InvalidArgument


async def test_retention_is_set_at_creation_reflected_and_changed(url: str, namespace: str) -> None:
    state = await aretention(namespace, key_history=3, log_messages=100, log_age=timedelta(days=30), url=url)
    assert (state.key_history, state.log_messages, state.log_age) == (3, 100, 30 * 86400)
    assert (state.oldest_key_event, state.oldest_log_event) == (None, None)  # created empty
    async with AsyncMemory(namespace, url=url) as m:
        await m.set("k", 1)
    state = await aretention(namespace, log_messages=0, log_age=0, url=url)  # back to "keep all"
    assert isinstance(state, Retention)
    assert (state.key_history, state.log_messages, state.log_age) == (3, None, None)
    assert state.oldest_key_event is not None and state.oldest_key_event <= datetime.now(UTC)
    assert retention(namespace, url=url) == state  # the sync face reads the same


async def test_key_history_limit_is_enforced(url: str, namespace: str) -> None:
    await aretention(namespace, key_history=2, url=url)
    async with AsyncMemory(namespace, url=url) as m:
        for i in range(4):
            await m.set("k", i)
        assert [r.value for r in await m.revisions("k")] == [2, 3]
        assert [e.value async for e in areplay(namespace, url=url)] == [2, 3]


async def test_log_messages_limit_is_enforced(url: str, namespace: str) -> None:
    await aretention(namespace, log_messages=3, url=url)
    async with AsyncChatHistory("c", namespace=namespace, url=url) as c:
        await c.append({"n": 0})
        early = datetime.now(UTC)
        for i in range(1, 5):
            await c.append({"n": i})
        assert await c.messages() == [{"n": 2}, {"n": 3}, {"n": 4}]
        with pytest.raises(BeforeRetention, match="keeps 3 messages per conversation"):
            await c.messages(at=early)
        assert [e.value async for e in areplay(namespace, url=url)] == [{"n": 2}, {"n": 3}, {"n": 4}]


@pytest.mark.slow
async def test_log_age_limit_is_enforced(url: str, namespace: str) -> None:
    await aretention(namespace, log_age=1, url=url)
    async with AsyncChatHistory("c", namespace=namespace, url=url) as c:
        await c.append({"n": 1})
        written = datetime.now(UTC)
        deadline = time.monotonic() + 15
        while await AsyncChatHistory("c", namespace=namespace, url=url).entries() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert [e async for e in areplay(namespace, url=url)] == []
        with pytest.raises(BeforeRetention, match="keeps its logs for 1 s"):
            await c.messages(at=written)


@pytest.mark.parametrize(
    "bad",
    [
        {"key_history": 0},
        {"key_history": 65},
        {"key_history": True},
        {"key_history": "3"},
        {"log_messages": -1},
        {"log_messages": 2.0},
        {"log_age": 0.5},
        {"log_age": -1},
        {"log_age": float("nan")},
        {"log_age": "1d"},
    ],
)
async def test_invalid_retention_is_refused_and_changes_nothing(url: str, namespace: str, bad: dict[str, object]) -> None:
    before = await aretention(namespace, key_history=5, log_messages=7, url=url)
    with pytest.raises(InvalidArgument):
        await aretention(namespace, url=url, **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        retention(namespace, url=url, **bad)  # type: ignore[arg-type]
    assert await aretention(namespace, url=url) == before
