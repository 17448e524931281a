"""QA of replay, time travel and restore (issue 10) against a real nats-server: the edges of
``at=`` (a write's own time, the future, before anything), restore over an existing namespace,
large (chunked) values, conversation ids and globs with NATS subject characters."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone, tzinfo

import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, ChatHistory, Memory, areplay, arestore
from botwire_stream.errors import InvalidArgument, InvalidNamespace


async def test_get_and_messages_at_a_writes_own_time_include_it(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("c", namespace=namespace, url=url) as c:
        await m.set("k", "first")
        await c.append({"n": 1})
        await m.set("k", "second")
        await c.append({"n": 2})
        events = [e async for e in areplay(namespace, url=url)]
        times = {(e.source, e.value if e.source == "memory" else e.value["n"]): e.time for e in events}
        assert await m.get("k", at=times[("memory", "first")]) == "first"
        assert await m.get("k", at=times[("memory", "second")]) == "second"
        assert await c.messages(at=times[("chat", 1)]) == [{"n": 1}]
        assert await c.messages(at=times[("chat", 2)]) == [{"n": 1}, {"n": 2}]
        # before the first write: nothing (not an error)
        before = times[("memory", "first")] - timedelta(days=1)
        assert await m.get("k", "none", at=before) == "none"
        assert await c.messages(at=before) == []


async def test_get_and_messages_at_a_future_time_raise_invalid_argument(url: str, namespace: str) -> None:
    """A moment in the future is refused as ``restore`` refuses it (its state is not known yet;
    before, today's state was answered: a local time given as UTC, hours ahead, went unnoticed);
    "now" and a write's own time are answered; the sync faces alike."""
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("c", namespace=namespace, url=url) as c:
        await m.set("k", "v")
        await c.append({"n": 1})
        for ahead in (timedelta(days=1), timedelta(seconds=5)):
            future = datetime.now(UTC) + ahead
            with pytest.raises(InvalidArgument, match="is in the future"):
                await m.get("k", at=future)
            with pytest.raises(InvalidArgument, match="is in the future"):
                await c.messages(at=future)
        local_as_utc = datetime.now(timezone(timedelta(hours=3))).replace(tzinfo=UTC)  # UTC+3 read as UTC: 3 h ahead
        with pytest.raises(InvalidArgument, match="is in the future"):
            await m.get("k", at=local_as_utc)
        now = datetime.now(UTC)
        assert await m.get("k", at=now) == "v"
        assert await c.messages(at=now) == [{"n": 1}]
        [entry] = await c.entries()
        assert await c.messages(at=entry.time) == [{"n": 1}]
        # a client whose clock lags the server's by a second: the entry's own time, as it reads it
        lagging = entry.time + timedelta(seconds=1)
        assert await c.messages(at=lagging) == [{"n": 1}]
        assert await m.get("k", at=lagging) == "v"

    def sync_faces() -> None:
        with Memory(namespace, url=url) as sm, ChatHistory("c", namespace=namespace, url=url) as sc:
            future = datetime.now(UTC) + timedelta(minutes=1)
            with pytest.raises(InvalidArgument, match="is in the future"):
                sm.get("k", at=future)
            with pytest.raises(InvalidArgument, match="is in the future"):
                sc.messages(at=future)
            assert sm.get("k", at=datetime.now(UTC)) == "v"

    await asyncio.to_thread(sync_faces)


class _NoOffset(tzinfo):
    """A time zone that knows no offset: Python counts a datetime with it as naive."""

    def utcoffset(self, dt: datetime | None) -> None:
        return None

    def tzname(self, dt: datetime | None) -> str:
        return "somewhere"

    def dst(self, dt: datetime | None) -> None:
        return None


async def test_at_with_a_time_zone_of_no_offset_is_refused_as_naive(url: str, namespace: str) -> None:
    """A datetime whose tzinfo gives no offset is naive (Python's definition): ``at=`` and a replay
    bound refuse it with InvalidArgument, as a naive one (before: TypeError "can't compare
    offset-naive and offset-aware datetimes" from the future check)."""
    vague = datetime(2020, 1, 1, tzinfo=_NoOffset())
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("c", namespace=namespace, url=url) as c:
        await c.append({"n": 1})
        with pytest.raises(InvalidArgument, match="timezone-aware"):
            await m.get("k", at=vague)
        with pytest.raises(InvalidArgument, match="timezone-aware"):
            await c.messages(at=vague)
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        [e async for e in areplay(namespace, start=vague, url=url)]


async def test_restore_with_overwrite_leaves_each_conversation_as_of_the_moment(url: str, namespace: str) -> None:
    """A second restore over the first must not append the messages again (no repeated message)."""
    target = namespace + "r"
    async with AsyncChatHistory("a", namespace=namespace, url=url) as a:
        await a.extend([{"a": i} for i in range(3)])
        await arestore(namespace, at=datetime.now(UTC), into=target, url=url)
        await a.append({"a": 3})
        await arestore(namespace, at=datetime.now(UTC), into=target, overwrite=True, url=url)
    async with AsyncChatHistory("a", namespace=target, url=url) as r:
        assert await r.messages() == [{"a": i} for i in range(4)]


async def test_restore_and_replay_carry_large_chunked_values(url: str, namespace: str) -> None:
    big = "x" * (3 * 1024 * 1024)  # over the 1 MiB max_payload: stored in chunks
    target = namespace + "r"
    async with AsyncMemory(namespace, url=url) as m:
        await m.set("big", big)
        at = datetime.now(UTC)
        assert await m.get("big", at=at) == big
        [e] = [e async for e in areplay(namespace, url=url)]
        assert (e.kind, e.key, e.value == big) == ("set", "big", True)
        report = await arestore(namespace, at=at, into=target, url=url)
        assert report.keys == 1
    async with AsyncMemory(target, url=url) as r:
        assert await r.get("big") == big


@pytest.mark.parametrize("odd", ["a.b", "a>b", "a*b", "a b", "ü:x", "a:b:c", "-"])
async def test_conversation_ids_and_keys_with_subject_characters(url: str, namespace: str, odd: str) -> None:
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory(odd, namespace=namespace, url=url) as c:
        await m.set(odd, 1)
        await m.set("other", 2)
        await c.append({"n": 1})
        await AsyncChatHistory("other", namespace=namespace, url=url).append({"n": 9})
        at = datetime.now(UTC)
        assert await c.messages(at=at) == [{"n": 1}]
        assert await m.get(odd, at=at) == 1
        from botwire_stream.keys import glob_escape

        got = [(e.source, e.key) async for e in areplay(namespace, url=url, keys=glob_escape(odd), conversations=glob_escape(odd))]
        assert got == [("memory", odd), ("chat", odd)]


async def test_replay_of_an_empty_namespace_yields_nothing_and_creates_nothing(url: str, namespace: str) -> None:
    assert [e async for e in areplay(namespace, url=url)] == []
    assert [e async for e in areplay(namespace, url=url, start=datetime.now(UTC) + timedelta(days=1), conversations=None)] == []
    report = await arestore(namespace, at=datetime.now(UTC), into=namespace + "r", url=url)
    assert (report.keys, report.conversations, report.messages) == (0, 0, 0)


@pytest.mark.parametrize("bad", ["", None, 3, "a.>"])
async def test_restore_into_bad_namespace_is_refused(url: str, namespace: str, bad: object) -> None:
    with pytest.raises(InvalidNamespace):
        await arestore(namespace, at=datetime.now(UTC), into=bad, url=url)  # type: ignore[arg-type]


async def test_restore_with_overwrite_removes_keys_that_had_no_value_then(url: str, namespace: str) -> None:
    """"The restored namespace equals the source as of that time": a key deleted (or not yet
    written) at that moment must not keep what a former restore put there."""
    target = namespace + "r"
    async with AsyncMemory(namespace, url=url) as m:
        await m.set("gone", 1)
        await m.set("kept", 2)
        await arestore(namespace, at=datetime.now(UTC), into=target, url=url)
        assert await m.delete("gone")
        report = await arestore(namespace, at=datetime.now(UTC), into=target, overwrite=True, url=url)
        assert report.keys == 1
    async with AsyncMemory(target, url=url) as r:
        assert await r.list_keys() == ["kept"]
        assert await r.get("gone") is None


@pytest.mark.parametrize(
    "args",
    [
        ["retention", "{ns}", "--log-messages", "10"],
        ["retention", "{ns}", "--key-history", "0"],
        ["restore", "{ns}", "--at", "now", "--into", "{ns}"],
        ["replay", "{ns}"],
        ["retention", "{ns}"],
        ["history", "{ns}", "k"],
    ],
)
async def test_cli_replay_restore_retention_create_nothing_in_an_unwritten_namespace(
    url: str, namespace: str, args: list[str]
) -> None:
    """Bad values are refused, and reading a namespace never written creates no stream for it."""
    import subprocess
    import sys

    from botwire_stream.nats.pool import acquire, release
    from botwire_stream.settings import resolve

    from .procs import ROOT

    argv = [a.format(ns=namespace) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "botwire_stream", "--url", url, *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert "Traceback" not in proc.stderr
    if "--log-messages" in argv or "--key-history" in argv or "--into" in argv:
        assert proc.returncode == 2 and "error: " in proc.stderr, proc.stderr
    conn = await acquire(resolve(url))
    try:
        names = [i.config.name for i in await conn.js.streams_info()]
    finally:
        await release(conn)
    assert [n for n in names if n and namespace in n] == []


async def test_at_each_events_own_time_sees_that_event(url: str, namespace: str) -> None:
    """``get(at=e.time)`` / ``messages(at=e.time)`` for every replayed event ``e`` include it: the
    event's time and the stored time ``at=`` compares must round the server's nanoseconds alike
    (they differed by 1 µs for some writes, so the write was not seen at its own time)."""
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("c", namespace=namespace, url=url) as c:
        for i in range(100):
            await m.set(f"k{i}", i)
            await c.append({"n": i})
        events = [e async for e in areplay(namespace, url=url)]
        for e in events:
            if e.source == "memory":
                assert await m.get(e.key, at=e.time) == e.value, e
            else:
                assert (await c.messages(at=e.time))[-1:] == [e.value], e


async def test_an_overwritten_large_value_replays_as_a_set_without_value(url: str, namespace: str) -> None:
    """Its chunks are reclaimed when it is overwritten: replay says so (value None) rather than
    failing, ``get(at=)`` raises ``BeforeRetention``, and a restore to then writes nothing."""
    from botwire_stream.errors import BeforeRetention

    one, two = "a" * (2 * 1024 * 1024), "b" * (2 * 1024 * 1024)
    async with AsyncMemory(namespace, url=url) as m:
        await m.set("big", one)
        await m.set("big", two)
        first, second = [e async for e in areplay(namespace, url=url)]
        assert (first.kind, first.value, second.kind, second.value == two) == ("set", None, "set", True)
        with pytest.raises(BeforeRetention, match="large value"):
            await m.get("big", at=first.time)
        with pytest.raises(BeforeRetention):
            await arestore(namespace, at=first.time, into=namespace + "r", url=url)
    assert [e async for e in areplay(namespace + "r", url=url)] == []
