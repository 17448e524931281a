"""``Memory(..., cache=True)``: repeated reads served in process, never stale beyond the feed.

What a user relies on: a read after this process's own write sees it; a write by another OS
process is seen within a bound (the feed's delivery; asserted here as a generous 2 s upper bound,
the measured p99 is in the README); a reader never sees a key go back to an older value; a server
restart empties the cache instead of serving what may have changed meanwhile; memory stays within
the entry and byte bounds whatever is read.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from botwire_stream import AsyncMemory, Memory
from botwire_stream.cache import Miss
from botwire_stream.errors import InvalidArgument
from tests import workers
from tests.procs import ROOT
from tests.servers import NatsServer

SEEN_WITHIN = 2.0  # seconds: "does not stay stale", far above the measured delivery (about 1 ms)


@pytest.fixture
def cached(url: str, namespace: str) -> Iterator[Memory]:
    with Memory(namespace, url=url, cache=True) as m:
        yield m


def _cached_keys(m: Memory) -> int:
    cache = m._core._cache
    assert cache is not None
    return len(cache)


def _seen(m: Memory, key: str, value: object) -> float:
    """Seconds until ``m.get(key)`` gives ``value`` (polled; fails past ``SEEN_WITHIN``)."""
    t0 = time.monotonic()
    while m.get(key) != value:
        elapsed = time.monotonic() - t0
        assert elapsed < SEEN_WITHIN, f"{key} still read {m.get(key)!r}, not {value!r}, after {elapsed:.1f} s"
        time.sleep(0.001)
    return time.monotonic() - t0


def test_a_read_after_this_process_writes_sees_the_write(cached: Memory) -> None:
    cached.set("k", 1)
    assert cached.get("k") == 1
    assert _cached_keys(cached) == 1  # served from the cache from now on
    for i in range(2, 50):
        cached.set("k", i)
        assert cached.get("k") == i  # no polling: at once
    assert cached.update("k", lambda v: v + 1) == 50
    assert cached.get("k") == 50
    assert cached.delete("k")
    assert cached.get("k", "gone") == "gone"
    assert "k" not in cached
    cached.set("k", {"nested": [1, 2]})
    value = cached.get("k")
    value["nested"].append(3)  # the caller's copy: the cached value is unchanged
    assert cached.get("k") == {"nested": [1, 2]}


def test_another_process_write_is_seen(cached: Memory, url: str, namespace: str) -> None:
    assert cached.get("shared", "none") == "none"  # cached as missing
    workers.run("set", url, namespace, "shared", '"first"')
    _seen(cached, "shared", "first")
    assert cached.get("shared") == "first"
    workers.run("ops", url, namespace, json.dumps([["set", "shared", "second"], ["delete", "other"]]))
    _seen(cached, "shared", "second")
    workers.run("ops", url, namespace, json.dumps([["delete", "shared"]]))
    _seen(cached, "shared", None)


@pytest.mark.slow
def test_a_reader_never_goes_back_to_an_older_value(cached: Memory, url: str, namespace: str) -> None:
    """Another process counts 0..299 with sets; the cached reader's reads never decrease and end
    at 299 within the bound."""
    cached.set("n", -1)
    ops = [["set", "n", i] for i in range(300)]
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.workers", "ops", url, namespace, json.dumps(ops)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        last, reads = -1, 0
        deadline = time.monotonic() + 60
        while writer.poll() is None and time.monotonic() < deadline:
            v = cached.get("n")
            assert v >= last, f"read {v} after {last}"
            last, reads = v, reads + 1
        _, err = writer.communicate(timeout=30)
        assert writer.returncode == 0, err[-2000:]
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    _seen(cached, "n", 299)
    assert reads > 0


@pytest.mark.slow
def test_a_server_restart_empties_the_cache(own_server: NatsServer, namespace: str) -> None:
    """A value cached before a restart is not served after it: another client's write made right
    after the restart is what the first read gives, with no waiting for the feed to resume."""
    with Memory(namespace, url=own_server.url, cache=True) as m, Memory(namespace, url=own_server.url) as other:
        m.set("k", "before")
        assert m.get("k") == "before"
        assert _cached_keys(m) == 1
        own_server.kill()
        own_server.start()  # same port and store
        other.set("k", "after the restart")  # other reconnects first (or this waits for it)
        assert m.get("k") == "after the restart"  # at once: never the cached "before"
        _seen(m, "k", "after the restart")
        deadline = time.monotonic() + 20  # once the feed resumed, reads are cached again
        while _cached_keys(m) == 0:
            assert time.monotonic() < deadline, "the cache stayed empty after the feed came back"
            m.get("k")
            time.sleep(0.05)
        other.set("k", "later")
        _seen(m, "k", "later")


def test_the_cache_stays_within_its_bounds(url: str, namespace: str) -> None:
    with Memory(namespace, url=url, cache=True, cache_entries=100, cache_bytes=64_000) as m:
        for i in range(3000):
            m.set(f"small:{i}", i)
        for i in range(3000):
            assert m.get(f"small:{i}") == i
            assert _cached_keys(m) <= 100
        cache = m._core._cache
        assert cache is not None
        assert len(cache) == 100 and cache.size <= 64_000
        big = "x" * 5_000  # 5 kB values: the byte bound applies before the entry bound
        for i in range(200):
            m.set(f"big:{i}", big)
            assert m.get(f"big:{i}") == big
            assert cache.size <= 64_000
        assert len(cache) < 20
        m.set("huge", "y" * 10_000)  # over an eighth of the bytes: never kept
        assert m.get("huge") == "y" * 10_000
        assert isinstance(cache.lookup("huge"), Miss) and cache.size <= 64_000


async def test_async_memory_cache(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url, cache=True) as m, AsyncMemory(namespace, url=url) as other:
        await m.set("a", 1)
        assert await m.get("a") == 1
        await other.set("a", 2)
        t0 = time.monotonic()
        while await m.get("a") != 2:
            assert time.monotonic() - t0 < SEEN_WITHIN
            await asyncio.sleep(0.001)
        assert await m.contains("a")


@pytest.mark.parametrize(
    "kwargs", [{"cache": "yes"}, {"cache": 1}, {"cache": True, "cache_entries": 0}, {"cache": True, "cache_bytes": 1.5}]
)
def test_bad_cache_options_are_refused(url: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        Memory("ns", url=url, **kwargs)  # type: ignore[arg-type]


def test_a_chunked_value_written_elsewhere_is_read_whole(cached: Memory, url: str, namespace: str) -> None:
    """The feed does not carry values over one message: the key is dropped and read again."""
    cached.set("doc", "small")
    assert cached.get("doc") == "small"
    big = "z" * 3_000_000  # chunked on a 1 MiB server
    with Memory(namespace, url=url) as other:
        other.set("doc", big)
        _seen(cached, "doc", big)
        other.set("doc", "small again")
    _seen(cached, "doc", "small again")


def test_a_blocked_event_loop_serves_nothing_stale(cached: Memory, url: str, namespace: str) -> None:
    """The sync face looks values up in the caller's thread. While the loop thread that applies
    changes is blocked, another process's write waits unread: the cache must not answer then."""
    cached.set("k", "old")
    assert cached.get("k") == "old"
    loop = cached._core._loop
    assert loop is not None
    blocked = time.monotonic()
    loop.call_soon_threadsafe(time.sleep, 2.5)  # the loop thread is stuck for 2.5 s
    workers.run("set", url, namespace, "k", '"new"')  # acknowledged by the server
    # The documented bound: a loop that has not marked itself alive for 0.2 s serves nothing.
    time.sleep(max(0.0, blocked + 0.4 - time.monotonic()))
    assert cached.get("k") == "new"  # no polling: read from the server once the loop is back


@pytest.mark.slow
async def test_many_distinct_keys_read_stay_within_the_bounds(url: str, namespace: str) -> None:
    """60,000 distinct keys read (most missing, which is cached too), 64 at a time."""
    async with AsyncMemory(namespace, url=url, cache=True, cache_entries=1000, cache_bytes=100_000) as m:
        cache = m._cache
        assert cache is not None
        for i in range(0, 500):
            await m.set(f"v:{i}", "v" * 200)
        peak_entries = peak_bytes = 0
        names = [f"v:{i % 500}" if i % 120 == 0 else f"x:{i}" for i in range(60_000)]
        for start in range(0, len(names), 64):
            got = await asyncio.gather(*(m.get(name) for name in names[start : start + 64]))
            assert all(v in (None, "v" * 200) for v in got)
            peak_entries, peak_bytes = max(peak_entries, len(cache)), max(peak_bytes, cache.size)
        assert peak_entries <= 1000 and peak_bytes <= 100_000
        assert len(cache) > 0
