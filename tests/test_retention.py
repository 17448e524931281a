"""Retention per namespace, applied by the server's own stream limits: set, reflected, changed,
enforced (what replay and ``at=`` reach follows it), and refused when invalid with nothing changed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
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
    await aretention(namespace, log_messages=64, url=url)
    async with AsyncChatHistory("c", namespace=namespace, url=url) as c:
        await c.append({"n": 0})
        early = datetime.now(UTC)
        await c.extend([{"n": i} for i in range(1, 66)])
        kept = [{"n": i} for i in range(2, 66)]
        assert await c.messages() == kept
        assert await c.messages(last=64) == kept
        with pytest.raises(BeforeRetention, match="keeps 64 messages per conversation"):
            await c.messages(at=early)
        assert [e.value async for e in areplay(namespace, url=url)] == kept


@pytest.mark.slow
async def test_log_age_limit_is_enforced(url: str, namespace: str) -> None:
    await aretention(namespace, log_age=1, url=url)
    async with AsyncChatHistory("c", namespace=namespace, url=url) as c:
        await c.extend([{"n": 0}, {"n": 1}])
        assert await c.messages(last=2) == [{"n": 0}, {"n": 1}]  # this process now remembers them
        written = datetime.now(UTC)
        deadline = time.monotonic() + 15
        while await AsyncChatHistory("c", namespace=namespace, url=url).entries() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert [e async for e in areplay(namespace, url=url)] == []
        assert await c.messages(last=2) == []  # not served from what the process remembered
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
        {"log_messages": 63},
        {"log_messages": 2.0},
        {"log_age": 0.5},
        {"log_age": -1},
        {"log_age": float("nan")},
        {"log_age": "1d"},
    ],
)
async def test_invalid_retention_is_refused_and_changes_nothing(url: str, namespace: str, bad: dict[str, object]) -> None:
    before = await aretention(namespace, key_history=5, log_messages=70, url=url)
    with pytest.raises(InvalidArgument):
        await aretention(namespace, url=url, **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        retention(namespace, url=url, **bad)  # type: ignore[arg-type]
    assert await aretention(namespace, url=url) == before


@pytest.mark.slow
async def test_last_n_is_exact_while_messages_age_out_one_by_one(url: str, namespace: str) -> None:
    # A process remembers the newest messages it read (for last=N in one request); with an age
    # limit the older of them leave while the newest stays, which that memory alone cannot see.
    # The limit is set by another process: this one learns it when it opens the namespace.
    subprocess.run(
        [sys.executable, "-m", "botwire_stream", "retention", namespace, "--log-age", "2s", "--url", url],
        check=True, capture_output=True, timeout=60,
    )
    for attempt in range(3):  # the window where only the first has aged out is about 1 s
        async with AsyncChatHistory(f"c{attempt}", namespace=namespace, url=url) as c:
            await c.append({"n": 0})
            await asyncio.sleep(1.0)  # the age gap between the two messages under test
            await c.append({"n": 1})
            assert await c.messages(last=2) == [{"n": 0}, {"n": 1}]
            deadline = time.monotonic() + 10
            left: list[object] = [None, None]
            while len(left) == 2 and time.monotonic() < deadline:
                left = [e.value async for e in areplay(namespace, url=url, keys=None, conversations=c.session_id)]
                await asyncio.sleep(0.05)
            if left == [{"n": 1}]:
                assert await c.messages(last=2) == [{"n": 1}]
                return
    pytest.fail("the first message never aged out alone")
