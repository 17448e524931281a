"""Replay and time travel against a real nats-server: every event of a namespace in order with its
time and origin (also from another process), ``get(at=)`` and ``messages(at=)`` as of a past
moment, ``BeforeRetention`` where the server no longer keeps it, and point-in-time restore."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest

from botwire_stream import (
    AsyncChatHistory,
    AsyncMemory,
    ChatHistory,
    Event,
    Memory,
    areplay,
    arestore,
    replay,
    restore,
)
from botwire_stream.errors import BeforeRetention, Conflict, InvalidArgument

ME = f"{socket.gethostname()}/{__import__('os').getpid()}"

CHILD = """
import json, os, sys
from botwire_stream import ChatHistory, Memory
url, ns = sys.argv[1], sys.argv[2]
with Memory(ns, url=url) as m, ChatHistory("c1", namespace=ns, url=url) as c:
    m.set("user:2", {"from": "child"})
    c.append({"role": "assistant", "content": "from child"})
print(json.dumps(os.getpid()))
"""


async def _all(namespace: str, url: str, **kw: Any) -> list[Event]:
    return [e async for e in areplay(namespace, url=url, **kw)]


def _brief(e: Event) -> tuple[Any, ...]:
    return (e.source, e.kind, e.key, e.value, e.origin)


async def test_replay_yields_every_event_in_order_with_time_and_origin(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("c1", namespace=namespace, url=url) as c:
        await m.set("user:1", {"n": 1})
        await c.append({"role": "user", "content": "hi"})
        await m.set("user:1", {"n": 2})
        out = subprocess.run(
            [sys.executable, "-c", CHILD, url, namespace], capture_output=True, text=True, timeout=60, check=True
        )
        child = f"{socket.gethostname()}/{json.loads(out.stdout)}"
        assert await m.delete("user:1")
        await c.extend([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
        events = await _all(namespace, url)
    assert [_brief(e) for e in events] == [
        ("memory", "set", "user:1", {"n": 1}, ME),
        ("chat", "append", "c1", {"role": "user", "content": "hi"}, ME),
        ("memory", "set", "user:1", {"n": 2}, ME),
        ("memory", "set", "user:2", {"from": "child"}, child),
        ("chat", "append", "c1", {"role": "assistant", "content": "from child"}, child),
        ("memory", "delete", "user:1", None, ME),
        ("chat", "append", "c1", {"role": "user", "content": "a"}, ME),
        ("chat", "append", "c1", {"role": "user", "content": "b"}, ME),
    ]
    times = [e.time for e in events]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    # each log's own order is its sequence order: a key's seq is its revision
    assert [e.seq for e in events if e.source == "memory"] == [1, 2, 3, 4]
    assert [e.seq for e in events if e.source == "chat" and e.kind == "append"] == [1, 2, 3, 4]


async def test_replay_filters_by_glob_sequence_and_time(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("s:1", namespace=namespace, url=url) as c:
        await m.set("a:1", 1)
        await m.set("b:1", 2)
        middle = datetime.now(UTC)
        await m.set("a:2", 3)
        await c.append({"x": 1})
        await AsyncChatHistory("t:1", namespace=namespace, url=url).append({"y": 1})
        assert [e.key for e in await _all(namespace, url, keys="a:*", conversations=None)] == ["a:1", "a:2"]
        assert [e.key for e in await _all(namespace, url, keys=None, conversations="s:*")] == ["s:1"]
        assert [e.value for e in await _all(namespace, url, start=middle)] == [3, {"x": 1}, {"y": 1}]
        assert [e.value for e in await _all(namespace, url, end=middle)] == [1, 2]
        assert [e.value for e in await _all(namespace, url, start=2, end=2, conversations=None)] == [2]
        assert [e.value async for e in m.replay("a:*", start=2)] == [3]
        assert [e.value async for e in areplay(namespace + "x", url=url)] == []  # never written


async def test_replay_from_an_events_own_time_starts_with_that_event(url: str, namespace: str) -> None:
    """``start=e.time`` (a time a replay handed out, rounded to the microsecond from the stored
    nanoseconds) yields ``e`` and everything after it, nothing before: the server is asked from
    1 µs earlier and what precedes ``start`` is skipped. Some 16 events: about half are stored
    in the upper half of their microsecond, whose rounded time is above the stored one."""
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("c", namespace=namespace, url=url) as c:
        for i in range(12):
            await m.set(f"k{i % 3}", i)
            if i % 3 == 0:
                await c.append({"i": i})
        events = await _all(namespace, url)
        assert len(events) == 16
        for e in events:
            got = await _all(namespace, url, start=e.time)
            assert sorted((x.source, x.seq) for x in got) == sorted(
                (x.source, x.seq) for x in events if x.time >= e.time
            ), e


async def test_a_replay_read_slowly_still_yields_every_event(
    url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that stops longer than the server keeps an idle replay consumer (10 s; 1 s here)
    in the middle of a replay of both logs still gets every event, once, in order: the consumer
    the server deleted is made again from the next sequence. (Before: the replay ended silently;
    a 1M-event replay of keys then conversations yielded the keys and the first 10k messages.)"""
    from botwire_stream.nats import replay as nats_replay

    monkeypatch.setattr(nats_replay, "_INACTIVE", 1.0, raising=False)
    monkeypatch.setattr(nats_replay, "_BATCH", 50)
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("c", namespace=namespace, url=url) as c:
        for i in range(0, 120, 20):
            await asyncio.gather(*(m.set(f"k{j}", j) for j in range(i, i + 20)))
        await c.extend([{"i": i} for i in range(120)])
        expected = [(e.source, e.seq) for e in await _all(namespace, url)]
        assert len(expected) == 240
        nc = await nats.connect(url)
        got: list[tuple[str, int]] = []
        try:
            async for e in areplay(namespace, url=url):
                got.append((e.source, e.seq))
                if len(got) in (1, 130):  # both consumers made and read from; then gone
                    async with asyncio.timeout(30):
                        for stream in (f"KV_botwire_{namespace}", f"BOTWIRE_CHAT_{namespace}"):
                            while (await nc.jetstream().stream_info(stream)).state.consumer_count:
                                await asyncio.sleep(0.1)
        finally:
            await nc.close()
        assert got == expected


def test_sync_faces_replay(url: str, namespace: str) -> None:
    with Memory(namespace, url=url) as m, ChatHistory("c", namespace=namespace, url=url) as c:
        m.set("k", "v1")
        c.append({"m": 1})
        with replay(namespace, url=url) as events:
            assert [(e.kind, e.value) for e in events] == [("set", "v1"), ("append", {"m": 1})]
        with m.replay() as events:
            assert [e.value for e in events] == ["v1"]


async def test_get_at_answers_past_values_around_overwrites_and_deletes(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as m:
        before = datetime.now(UTC)
        await m.set("k", "v1")
        t1 = datetime.now(UTC)
        await m.set("k", "v2")
        t2 = datetime.now(UTC)
        await m.delete("k")
        t3 = datetime.now(UTC)
        await m.set("k", "v3")
        assert await m.get("k", "none", at=before) == "none"  # not written yet
        assert await m.get("k", at=t1) == "v1"
        assert await m.get("k", at=t2) == "v2"
        assert await m.get("k", "gone", at=t3) == "gone"
        assert await m.get("k", at=datetime.now(UTC)) == "v3"
        assert await m.get("other", "none", at=t2) == "none"


async def test_get_at_beyond_what_the_server_keeps_raises(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url, history=2) as m:
        await m.set("k", "v1")
        t1 = datetime.now(UTC)
        await m.set("k", "v2")
        t2 = datetime.now(UTC)
        await m.set("k", "v3")
        with pytest.raises(BeforeRetention, match="keeps 2 revisions per key"):
            await m.get("k", at=t1)  # v1 is no longer kept: not "missing"
        assert await m.get("k", at=t2) == "v2"
        # a write with a TTL rolls up the key's older revisions
        await m.set("t", "old")
        t4 = datetime.now(UTC)
        await m.set("t", "new", ttl=3600)
        with pytest.raises(BeforeRetention, match="TTL"):
            await m.get("t", at=t4)
        assert await m.get("t", at=datetime.now(UTC)) == "new"


async def test_get_at_after_a_ttl_expiry(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as m:
        await m.set("s", "live", ttl=1)
        live = datetime.now(UTC)
        assert await m.get("s", at=live) == "live"
        async with m.watch("s") as w:
            change = await anext(w)
        assert change.op == "expire"
        assert await m.get("s", "expired", at=change.time + timedelta(microseconds=1)) == "expired"


async def test_messages_at_around_appends_and_clear(url: str, namespace: str) -> None:
    async with AsyncChatHistory("c", namespace=namespace, url=url) as c:
        before = datetime.now(UTC)
        await c.append({"n": 1})
        t1 = datetime.now(UTC)
        await c.extend([{"n": 2}, {"n": 3}])
        t2 = datetime.now(UTC)
        assert await c.messages(at=before) == []
        assert await c.messages(at=t1) == [{"n": 1}]
        assert await c.messages(at=t2) == [{"n": 1}, {"n": 2}, {"n": 3}]
        await c.clear()
        await c.append({"n": 4})
        with pytest.raises(BeforeRetention, match="cleared at"):
            await c.messages(at=t2)  # the clear removed them: not "empty"
        assert await c.messages(at=datetime.now(UTC)) == [{"n": 4}]
        # the log keeps the clear (who and when), not the messages it removed
        assert [(e.kind, e.value, e.origin) for e in await _all(namespace, url)] == [
            ("clear", None, ME),
            ("append", {"n": 4}, ME),
        ]
        with ChatHistory("c", namespace=namespace, url=url) as sync:
            assert sync.messages(at=datetime.now(UTC)) == [{"n": 4}]


async def test_restore_rebuilds_the_namespace_as_of_a_time(url: str, namespace: str) -> None:
    target = namespace + "r"
    async with AsyncMemory(namespace, url=url) as m:
        a, b = AsyncChatHistory("a", namespace=namespace, url=url), AsyncChatHistory("b", namespace=namespace, url=url)
        await m.set("keep", {"v": 1})
        await m.set("change", "old")
        await m.set("drop", [1, 2])
        await a.extend([{"a": i} for i in range(5)])
        await b.append({"b": 0})
        at = datetime.now(UTC)
        await m.set("change", "new")
        assert await m.delete("drop")
        await m.set("later", 1)
        await a.append({"a": "later"})
        await AsyncChatHistory("c", namespace=namespace, url=url).append({"c": "later"})
        report = await arestore(namespace, at=at, into=target, url=url)
        assert (report.keys, report.conversations, report.messages) == (3, 2, 6)
        async with AsyncMemory(target, url=url) as r:
            assert await r.list_keys() == ["change", "drop", "keep"]
            assert [await r.get(k) for k in ("change", "drop", "keep")] == ["old", [1, 2], {"v": 1}]
        assert await AsyncChatHistory("a", namespace=target, url=url).messages() == [{"a": i} for i in range(5)]
        assert await AsyncChatHistory("b", namespace=target, url=url).messages() == [{"b": 0}]
        assert await AsyncChatHistory("c", namespace=target, url=url).messages() == []
        # a target that holds anything is refused, and nothing is written to it
        with pytest.raises(Conflict, match="not empty"):
            await arestore(namespace, at=datetime.now(UTC), into=target, url=url)
        async with AsyncMemory(target, url=url) as r:
            assert await r.get("change") == "old" and await r.get("later") is None
        report = restore(namespace, at=datetime.now(UTC), into=target, overwrite=True, url=url)
        assert report.keys == 3  # keep, change, later
        with Memory(target, url=url) as r:
            assert r.get("change") == "new" and r.get("later") == 1


async def test_bad_arguments_are_refused_and_write_nothing(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("c", namespace=namespace, url=url) as c:
        await m.set("k", 1)
        await c.append({"n": 1})
        naive = datetime.now()
        with pytest.raises(InvalidArgument, match="timezone-aware"):
            await m.get("k", at=naive)
        with pytest.raises(InvalidArgument, match="timezone-aware"):
            await c.messages(at=naive)
        with pytest.raises(InvalidArgument, match="at most one"):
            await c.messages(last=1, at=datetime.now(UTC))
        with pytest.raises(InvalidArgument, match="one log"):
            areplay(namespace, url=url, start=1)  # at the call, not at the first event
        with pytest.raises(InvalidArgument):
            areplay(namespace, url=url, start="yesterday")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            m.replay(end=-1)
        with pytest.raises(InvalidArgument):
            replay(namespace, url=url, end=True)
        with pytest.raises(InvalidArgument, match="must differ"):
            await arestore(namespace, at=datetime.now(UTC), into=namespace, url=url)
        with pytest.raises(InvalidArgument):
            await arestore(namespace, at=naive, into=namespace + "x", url=url)
        assert [(e.kind, e.key) for e in await _all(namespace, url)] == [("set", "k"), ("append", "c")]
