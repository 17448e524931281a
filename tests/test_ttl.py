"""Per-key TTL against a real nats-server: expired keys read as missing everywhere.

The server counts whole seconds, so a 1 s TTL is gone within about two seconds; tests poll with
a bounded deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import nats
import pytest

from botwire_stream import AsyncMemory, Memory
from botwire_stream.times import ttl_seconds
from tests.workers import take

DEADLINE = 15.0  # far above the ~2 s a 1 s TTL takes; only reached when expiry is broken


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def memory(url: str, namespace: str) -> Iterator[Memory]:
    with Memory(namespace, url=url) as m:
        yield m


def test_ttl_seconds_rounds_up_to_whole_seconds() -> None:
    assert ttl_seconds(None) is None
    assert ttl_seconds(1) == 1
    assert ttl_seconds(0.001) == 1
    assert ttl_seconds(1.0) == 1
    assert ttl_seconds(1.2) == 2
    assert ttl_seconds(timedelta(milliseconds=1500)) == 2
    assert ttl_seconds(timedelta(days=1)) == 86400


def test_every_form_of_ttl_expires_and_reads_as_missing(memory: Memory) -> None:
    big = "z" * (3 * 1024 * 1024 // 2)  # chunked on the 1 MiB session server
    memory.set("forever", "stays")
    memory.set("int", 1, ttl=1)
    memory.set("fraction", 2, ttl=0.3)  # rounded up to 1 s, not refused and not immediate
    memory.set("delta", 3, ttl=timedelta(seconds=1))
    memory.set("delta-fraction", 4, ttl=timedelta(milliseconds=200))
    memory.set("big", big, ttl=1)
    assert memory.update("counter", lambda v: v + 1, default=0, ttl=1) == 1
    expiring = ["int", "fraction", "delta", "delta-fraction", "big", "counter"]
    assert memory.get("big") == big
    assert memory.get("fraction") == 2 and "delta-fraction" in memory

    wait_until(lambda: memory.list_keys() == ["forever"], "all TTL keys gone from list_keys")
    for k in expiring:
        assert memory.get(k) is None, k
        assert memory.get(k, "default") == "default", k
        assert k not in memory, k
        assert memory.list_keys(k) == [], k
    assert memory.get("forever") == "stays"


def test_an_expired_key_can_be_set_again_and_then_stays(memory: Memory) -> None:
    memory.set("k", "first", ttl=1)
    wait_until(lambda: "k" not in memory, "k expired")
    memory.set("k", "second")  # no TTL this time
    assert memory.update("k2", lambda v: v + 1, default=10) == 11
    memory.set("probe", 0, ttl=1)  # set after k: when it has expired, a leftover TTL on k would have too
    wait_until(lambda: "probe" not in memory, "probe expired")
    time.sleep(0.1)
    assert memory.get("k") == "second"
    assert memory.list_keys() == ["k", "k2"]
    assert memory.update("k", lambda v: v + "!") == "second!"


def test_update_after_expiry_starts_from_default(memory: Memory) -> None:
    memory.set("n", 41, ttl=1)
    wait_until(lambda: memory.get("n") is None, "n expired")
    assert memory.update("n", lambda v: v + 1, default=0) == 1
    assert memory.get("n") == 1


def test_ttl_write_over_an_older_value_does_not_fall_back_to_it(memory: Memory) -> None:
    memory.set("k", "old")
    memory.set("k", "older-still")
    memory.set("k", "new", ttl=1)
    assert memory.get("k") == "new"
    wait_until(lambda: memory.get("k", "missing") == "missing", "k expired")
    assert "k" not in memory
    assert memory.list_keys() == []
    time.sleep(0.2)
    assert memory.get("k", "missing") == "missing"  # still not the old value


def test_ttl_write_over_a_big_value_does_not_fall_back_to_it(memory: Memory) -> None:
    memory.set("k", "o" * (2 * 1024 * 1024))
    memory.set("k", "new", ttl=1)
    wait_until(lambda: "k" not in memory, "k expired")
    assert memory.get("k") is None


def test_sync_watch_sees_expiry(memory: Memory) -> None:
    with memory.watch("s:*") as watch:
        memory.set("s:1", "v", ttl=1)
        memory.set("other", "v", ttl=1)
        changes = take(watch, 2, timeout=DEADLINE)
    assert [(c.key, c.op) for c in changes] == [("s:1", "set"), ("s:1", "expire")]
    assert changes[1].value is None
    assert changes[1].revision > changes[0].revision


async def test_async_watch_sees_expiry(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as memory:
        async with memory.watch() as watch:
            await memory.set("a", 1, ttl=timedelta(seconds=1))
            got = []
            async with asyncio.timeout(DEADLINE):
                async for change in watch:
                    got.append((change.key, change.op, change.value))
                    if len(got) == 2:
                        break
        assert got == [("a", "set", 1), ("a", "expire", None)]
        assert await memory.contains("a") is False


async def test_the_server_is_given_the_rounded_up_ttl(url: str, namespace: str) -> None:
    """What the server stores: whole seconds, never less than asked."""
    async with AsyncMemory(namespace, url=url) as memory:
        await memory.set("a", 1, ttl=1.2)
        await memory.set("b", 1, ttl=timedelta(milliseconds=10))
        await memory.set("c", 1)
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        a = await js.get_last_msg(f"KV_botwire_{namespace}", f"$KV.botwire_{namespace}.a")
        b = await js.get_last_msg(f"KV_botwire_{namespace}", f"$KV.botwire_{namespace}.b")
        c = await js.get_last_msg(f"KV_botwire_{namespace}", f"$KV.botwire_{namespace}.c")
    finally:
        await nc.close()
    assert a.headers is not None and a.headers["Nats-TTL"] == "2"
    assert b.headers is not None and b.headers["Nats-TTL"] == "1"
    assert "Nats-TTL" not in (c.headers or {})
