"""QA of issue 10's replay: bounds at the ends of datetime's range, sequences beyond the server's
uint64, relative times before year 1 (library and HTTP), and a replay across a nats-server
SIGKILL and restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, areplay
from botwire_stream.audit import parse_when
from botwire_stream.errors import InvalidArgument

from .servers import NatsServer


async def test_replay_from_the_earliest_datetime_yields_every_event(url: str, namespace: str) -> None:
    """start at year 1 (UTC, or +05:00 which is before year 1 in UTC) means "from the beginning",
    a start in year 9999 -05:00 (year 10000 in UTC) "nothing yet". Before: OverflowError."""
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("c", namespace=namespace, url=url) as c:
        await m.set("a", 1)
        await c.append({"role": "user", "content": "x"})
        everything = [(e.kind, e.key) async for e in areplay(namespace, url=url)]
        assert len(everything) == 2
        for start in (datetime.min.replace(tzinfo=UTC), datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))):
            assert [(e.kind, e.key) async for e in areplay(namespace, url=url, start=start)] == everything
        late = datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-5)))
        assert [e async for e in areplay(namespace, url=url, start=late)] == []


async def test_a_sequence_beyond_uint64_is_invalid_argument(url: str, namespace: str) -> None:
    """Before: the server's 'invalid JSON' as a plain BotWireError."""
    async with AsyncMemory(namespace, url=url) as m:
        await m.set("a", 1)
    with pytest.raises(InvalidArgument):
        [e async for e in areplay(namespace, url=url, start=2**64, conversations=None)]
    assert [e.key async for e in areplay(namespace, url=url, start=2**64 - 1, conversations=None)] == []


def test_a_relative_time_before_year_1_is_invalid_argument() -> None:
    """Before: OverflowError from parse_when (botwire replay --since, HTTP start=)."""
    for text in ("-9999999d", "-99999999999w"):
        with pytest.raises(InvalidArgument):
            parse_when(text)


async def test_http_replay_with_a_time_before_year_1_is_400(http_server: str, namespace: str) -> None:
    """Before: 500 (an OverflowError in the server)."""
    async with httpx.AsyncClient(base_url=http_server, timeout=10) as client:
        r = await client.get(f"/v1/ns/{namespace}/replay", params={"start": "-9999999d"})
        assert r.status_code == 400, r.text
        r = await client.get(f"/v1/ns/{namespace}/replay", params={"start": "0001-01-01T00:00:00+05:00"})
        assert r.status_code == 200, r.text


@pytest.mark.slow
async def test_a_replay_continues_across_a_server_kill_and_restart(
    own_server: NatsServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-server SIGKILLed and started again in the middle of a replay: the replay goes on with
    every event once, in order (its in-memory consumer is made again from the next sequence).
    Before: a bare TimeoutError after the timeout."""
    from botwire_stream.nats import replay as nats_replay

    monkeypatch.setattr(nats_replay, "_BATCH", 20)
    async with AsyncMemory(namespace, url=own_server.url) as m:
        for i in range(300):
            await m.set(f"k{i}", i)
    seen: list[tuple[int, str]] = []
    async for e in areplay(namespace, url=own_server.url, timeout=5.0, conversations=None):
        seen.append((e.seq, e.key))
        if len(seen) == 30:
            own_server.kill()
            own_server.start()
    assert seen == [(i + 1, f"k{i}") for i in range(300)]


async def test_two_instances_of_one_consumer_racing_for_its_lock_one_wins(url: str, namespace: str) -> None:
    """Two instances of one consumer name started at the same moment (held: the lock entry's
    create is atomic on the server): exactly one holds it, the other gets Conflict; once released,
    the next one takes it."""
    import asyncio

    from botwire_stream import settings
    from botwire_stream.errors import Conflict
    from botwire_stream.nats.pool import acquire, release
    from consumers.lock import hold

    conn = await acquire(settings.resolve(url))
    try:
        for round_ in range(5):
            name, streams = f"{namespace}-{round_}", [f"KV_botwire_{namespace}", f"BOTWIRE_CHAT_{namespace}"]
            inside = asyncio.Event()
            release_it = asyncio.Event()

            async def instance() -> str:
                try:
                    async with hold(conn, name, streams, asyncio.Event()):
                        inside.set()
                        await release_it.wait()
                        return "held"
                except Conflict:
                    return "refused"

            first, second = asyncio.create_task(instance()), asyncio.create_task(instance())
            await asyncio.wait_for(inside.wait(), 10)
            done, _ = await asyncio.wait({first, second}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            assert [t.result() for t in done] == ["refused"]
            release_it.set()
            assert sorted(await asyncio.gather(first, second)) == ["held", "refused"]
            async with hold(conn, name, streams, asyncio.Event()):  # released: taken again
                pass
    finally:
        await release(conn)


async def test_a_moment_before_year_1_in_utc_is_before_retention_not_an_overflow(url: str, namespace: str) -> None:
    """get(at=) / messages(at=) at year 1 +05:00 (before year 1 in UTC) of a key whose oldest
    revisions are gone: BeforeRetention naming the moment. Before: OverflowError formatting it."""
    from botwire_stream import aretention
    from botwire_stream.errors import BeforeRetention

    at = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("c", namespace=namespace, url=url) as c:
        await aretention(namespace, key_history=2, url=url)
        for i in range(3):
            await m.set("a", i)
        with pytest.raises(BeforeRetention):
            await m.get("a", at=at)
        await c.append({"role": "user", "content": "x"})
        await c.clear()
        with pytest.raises(BeforeRetention):
            await c.messages(at=at)
