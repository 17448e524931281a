"""QA of the replay's "404 No Messages" handling (botwire_stream/nats/replay.py ``_scan``): a pull
that meets an empty log, or a log whose messages were purged or aged out after the scan counted
them. The replay ends at once, without an error, with the events it had (a prefix, in order).

The fix this guards (c63e967) is for a 404 answered while messages are still pending (measured
under load on a 1M-event replay); the server answers so when its delivery loop meets a message it
cannot load mid-batch (nats-server consumer.go, processWaiting(eos) for a no_wait request that has
delivered some), which no test here can cause on demand. These are the neighbouring conditions,
where the consumer's own count is 0 and the scan must end, not wait."""

from __future__ import annotations

import asyncio
import time

import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, areplay, aretention
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve

pytestmark = pytest.mark.nats_only


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pulls of 20 events: a 100-event log is read in five pulls, so it can change between them."""
    from botwire_stream.nats import replay as nats_replay

    monkeypatch.setattr(nats_replay, "_BATCH", 20)


async def test_a_log_purged_mid_replay_ends_it_with_what_was_read(
    url: str, namespace: str, small_batches: None
) -> None:
    async with AsyncMemory(namespace, url=url) as m:
        revisions = [await m.set(f"k{i:03d}", i) for i in range(100)]
    conn = await acquire(resolve(url))
    try:
        timeout = 5.0
        seen: list[int] = []
        began = time.monotonic()
        async for e in areplay(namespace, url=url, conversations=None, timeout=timeout):
            seen.append(e.seq)
            if len(seen) == 1:
                await conn.js.purge_stream(f"KV_botwire_{namespace}")  # every later pull finds nothing
        assert time.monotonic() - began < 3 * timeout  # ended, did not wait for the counted 100
        assert 1 <= len(seen) <= 20 and seen == revisions[: len(seen)]  # the first pull's events
        assert [e async for e in areplay(namespace, url=url, conversations=None)] == []  # empty log
    finally:
        await release(conn)


@pytest.mark.slow
async def test_a_log_aged_out_mid_replay_ends_it_with_what_was_read(
    url: str, namespace: str, small_batches: None
) -> None:
    """The conversations' log_age (1 s) removes every message while a replay is paused after its
    first event: the replay then ends, no error, with the first pull's events."""
    async with AsyncChatHistory("c", namespace=namespace, url=url) as c:
        seqs = await c.extend([{"role": "user", "content": f"m{i}"} for i in range(100)])
    conn = await acquire(resolve(url))
    try:
        seen: list[int] = []
        async for e in areplay(namespace, url=url, keys=None, timeout=5.0):
            seen.append(e.seq)
            if len(seen) == 1:
                await aretention(namespace, log_age=1, url=url)

                async def aged_out() -> bool:
                    info = await conn.js.stream_info(f"BOTWIRE_CHAT_{namespace}")
                    return info.state.messages == 0

                deadline = time.monotonic() + 15
                while not await aged_out():
                    assert time.monotonic() < deadline, "the log did not age out"
                    await asyncio.sleep(0.05)
        assert 1 <= len(seen) <= 20 and seen == seqs[: len(seen)]
    finally:
        await release(conn)
