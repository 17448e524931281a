"""QA of the materialiser's pipelined flushes and of consumers following a revived server (issue 10):
the materialiser SIGKILLed again and again in the middle of its pipelined groups, its server
SIGSTOPped while it flushes, SIGTERMed during a long catch-up; the embedded server SIGKILLed while
a stopped consumer's lease is old (its first check must renew it while disconnected)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from botwire_stream import AsyncChatHistory
from botwire_stream.nats import embedded
from botwire_stream.nats import materialised as mat
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve

from .procs import consumer, consumer_handled, kill_all, kill_embedded
from .servers import NatsServer
from .test_qa_10c_materialiser import _caught_up, _chunks_hold_each_message_once, _exact, _materialiser, _truth, _write
from .waits import sigstop, until

pytestmark = [pytest.mark.nats_only, pytest.mark.slow]

SESSIONS = ["h0", "h1"] + [f"c{i:02d}" for i in range(48)]


async def _mat_count(url: str, namespace: str) -> int:
    conn = await acquire(resolve(url))
    try:
        return (await conn.js.stream_info(mat.mat_stream(namespace))).state.messages
    except Exception:  # not made yet
        return 0
    finally:
        await release(conn)


async def test_materialiser_killed_three_times_mid_group_then_restarted_is_exact(url: str, namespace: str) -> None:
    """A backlog of 2,400 events of 50 interleaved conversations; the materialiser SIGKILLed three
    times as soon as its chunk stream grew (mid pipelined group: some chunks stored, their
    summaries and acks maybe not), restarted each time: exact reads, each message once in chunks."""
    _write(url, namespace, 800, 2, 48)
    conn = await acquire(resolve(url))
    try:
        truth = await _truth(conn, namespace, SESSIONS)
        for _ in range(3):
            before = await _mat_count(url, namespace)
            with _materialiser(url, namespace) as proc:

                async def grew(n: int = before) -> bool:
                    assert proc.poll() is None, proc.communicate()
                    return await _mat_count(url, namespace) > n

                await until(grew, "more chunks", 60, every=0.002)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
            await _exact(url, namespace, truth)
        with _materialiser(url, namespace) as proc:
            await until(lambda: _caught_up(url, namespace), "the restarted materialiser to catch up", 60)
            await _exact(url, namespace, truth)
            await _chunks_hold_each_message_once(conn, namespace, truth)
            listed = await AsyncChatHistory.sessions(namespace, limit=None, url=url)
            assert all(i.title is not None for i in listed)  # every summary counts exactly
    finally:
        await release(conn)


async def test_server_stopped_while_the_materialiser_flushes_then_it_converges(
    own_server: NatsServer, namespace: str
) -> None:
    """The materialiser catching up a backlog; its nats-server SIGSTOPped for 8 s (longer than a
    lease rewrite's 5 s timeout, shorter than a pipelined write's 10 s): after SIGCONT it did not
    exit (before: its own timed-out rewrite, stored late, read as a takeover: exit 0), it catches
    up exactly, and it materialises appends written after."""
    url = own_server.url
    _write(url, namespace, 800, 2, 48)
    conn = await acquire(resolve(url))
    try:
        with _materialiser(url, namespace) as proc:

            async def some() -> bool:
                assert proc.poll() is None, proc.communicate()
                return await _mat_count(url, namespace) > 0

            await until(some, "the first chunks", 60, every=0.002)
            sigstop(own_server.pid)
            try:
                time.sleep(8)
            finally:
                os.kill(own_server.pid, signal.SIGCONT)

            async def running_and_caught_up() -> bool:
                assert proc.poll() is None, proc.communicate()
                return await _caught_up(url, namespace)

            await until(running_and_caught_up, "the materialiser to catch up after SIGCONT", 60)
            truth = await _truth(conn, namespace, SESSIONS)
            await _exact(url, namespace, truth)
            await _chunks_hold_each_message_once(conn, namespace, truth)
            _write(url, namespace, 20, 2, 48)  # and it goes on
            await until(running_and_caught_up, "the later appends materialised", 60)
            truth = await _truth(conn, namespace, SESSIONS)
            await _exact(url, namespace, truth)
            await _chunks_hold_each_message_once(conn, namespace, truth)
    finally:
        await release(conn)


async def test_sigterm_during_a_long_catch_up_exits_0_and_a_restart_is_exact(url: str, namespace: str) -> None:
    """SIGTERM while the materialiser works through a backlog of 2,400 events: it exits 0 within
    20 s; a restarted one catches up and reads are exact."""
    _write(url, namespace, 800, 2, 48)
    conn = await acquire(resolve(url))
    try:
        truth = await _truth(conn, namespace, SESSIONS)
        with _materialiser(url, namespace) as proc:

            async def some() -> bool:
                assert proc.poll() is None, proc.communicate()
                return await _mat_count(url, namespace) > 0

            await until(some, "the first chunks", 60, every=0.002)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, proc.communicate()
        assert not await _caught_up(url, namespace)  # stopped in the middle
        await _exact(url, namespace, truth)
        with _materialiser(url, namespace) as proc:
            await until(lambda: _caught_up(url, namespace), "the restarted materialiser to catch up", 60)
            await _exact(url, namespace, truth)
            await _chunks_hold_each_message_once(conn, namespace, truth)
    finally:
        await release(conn)


@pytest.mark.parametrize("kind", ["materialise", "audit"])
async def test_embedded_server_killed_while_a_stopped_consumer_lease_is_old(
    botwire_home: Path, namespace: str, tmp_path: Path, kind: str
) -> None:
    """A consumer SIGSTOPped for 3.5 s (its lease older than the 2.5 s a check trusts) and its
    embedded server SIGKILLed meanwhile; SIGCONT: the consumer revives the server by itself (no
    other process writes) and handles what is written after, every message once."""
    history = AsyncChatHistory("s", namespace=namespace)
    await history.extend([{"role": "user", "content": f"before {i}"} for i in range(20)])
    conn = await acquire(resolve(None))

    async def handled(count: int) -> bool:
        return await consumer_handled(proc, conn, kind, namespace, count)

    proc = consumer(kind, namespace, *(["--dir", str(tmp_path / "audit")] if kind == "audit" else []))
    try:
        await until(lambda: handled(20), "the first 20 messages handled", 30)
        sigstop(proc.pid)
        try:
            state = kill_embedded(botwire_home)  # the server this test's process started
            time.sleep(3.5)  # the stopped consumer's lease ages past STALE / 2 (nothing to wait on)
        finally:
            os.kill(proc.pid, signal.SIGCONT)

        def revived() -> bool:
            now = embedded.status(botwire_home)
            return now is not None and now.pid != state.pid

        async def by_the_consumer() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            return revived()

        await until(by_the_consumer, "the consumer to revive the server", 10)  # ~2 s (before: ~17 s)
        await history.extend([{"role": "user", "content": f"after {i}"} for i in range(20)])
        await until(lambda: handled(40), "the 20 later messages handled", 30)
        expected = [f"before {i}" for i in range(20)] + [f"after {i}" for i in range(20)]
        assert [m["content"] for m in await history.messages()] == expected
        if kind == "audit":
            files = sorted((tmp_path / "audit").glob("audit-*.jsonl"))
            records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
            appended = [json.loads(r["data"])["content"] for r in records if r["op"] == "append"]
            assert sorted(appended) == sorted(expected) and len(appended) == 40
    finally:
        kill_all([proc])
        await history.close()
        await release(conn)
