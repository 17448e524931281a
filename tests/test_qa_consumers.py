"""QA of consumers/ (issue 10) against a real nats-server: a stop during a webhook's retry
backoff, webhook targets that are not HTTP URLs, ``consume status`` with no server."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, aretention
from botwire_stream.errors import InvalidArgument
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve
from consumers.runtime import run, status
from consumers.webhook import Webhook

from .procs import ROOT
from .test_consumers import _Receiver
from .waits import until

pytestmark = pytest.mark.nats_only


async def test_a_stop_during_webhook_backoff_returns_promptly_and_the_event_is_redelivered(
    url: str, namespace: str
) -> None:
    """SIGTERM (here: the stop event run() sets on it) while a failing event waits to be retried
    must not wait out the whole backoff (30 s, then 60 s... here): the event is left unacknowledged
    and delivered by the next run."""
    receiver = _Receiver(fail=1, secret=b"k")
    conn = await acquire(resolve(url))
    try:
        async with AsyncMemory(namespace, url=url) as memory:
            await memory.set("user:1", 1)
        worker = Webhook([namespace], "*", receiver.url, b"k", attempts=5, backoff=30.0)
        stop = asyncio.Event()
        task = asyncio.create_task(run(worker, url, stop=stop))

        async def tried() -> bool:
            return sum(receiver.attempts.values()) >= 1

        await until(tried, "the first attempt", 15)
        stop.set()
        await asyncio.wait_for(task, 10)  # does not hang (was: 30 s of backoff, then more tries)
        assert receiver.delivered == []
        info = await conn.js.consumer_info(f"KV_botwire_{namespace}", worker.durable)
        assert info.ack_floor.stream_seq == 0  # not acknowledged: it is not lost

        again = Webhook([namespace], "*", receiver.url, b"k", attempts=5, backoff=30.0)
        stop2 = asyncio.Event()
        task2 = asyncio.create_task(run(again, url, stop=stop2))

        async def delivered() -> bool:
            return len(receiver.delivered) == 1

        try:
            await until(delivered, "the redelivery", 15)
        finally:
            stop2.set()
            await asyncio.wait_for(task2, 10)
        assert [e["key"] for e in receiver.delivered] == ["user:1"]
    finally:
        receiver.close()
        await release(conn)


@pytest.mark.parametrize("target", ["ftp://127.0.0.1:9/hook", "127.0.0.1:9/hook", "", "http://"])
def test_webhook_target_that_is_not_an_http_url_is_refused(target: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from botwire_stream.cli import cli

    with pytest.raises(InvalidArgument, match="http"):
        Webhook(["app"], "*", target, b"k")
    key = tmp_path / "k"
    key.write_text("k")
    args = ["consume", "webhook", "-n", "app", "--to", target, "--secret-file", str(key), "--url", "nats://127.0.0.1:1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "error: " in result.output and "http" in result.output


def test_consume_status_without_a_server_fails_clearly_and_promptly() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "botwire_stream", "consume", "status", "--url", "nats://127.0.0.1:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "127.0.0.1:1" in proc.stderr or "server" in proc.stderr.lower()
    assert time.monotonic() - started < 45  # does not hang


async def _materialised_equals_raw(url: str, namespace: str, sessions: list[str]) -> None:
    from .test_consumers import _raw

    for s in sessions:
        async with AsyncChatHistory(s, namespace=namespace, url=url) as h:
            assert await h.messages() == await _raw(h), s


@pytest.mark.slow
async def test_materialised_reads_with_odd_ids_retention_trimming_and_a_clear_while_it_lags(
    url: str, namespace: str
) -> None:
    """Ids with subject characters; a count limit trimming messages the chunks still hold; a clear
    and the same content appended again while the materialiser is stopped: every read equals the
    raw log (never a missing or repeated message), before and after it catches up."""
    from consumers.materialiser import Materialiser

    from .test_consumers import _caught_up, _chunks

    sessions = ["a.b", "x>y*z", "ü: spaced"]
    stream = f"BOTWIRE_CHAT_{namespace}"
    await aretention(namespace, log_messages=64, url=url)
    conn = await acquire(resolve(url))
    stop = asyncio.Event()
    task = asyncio.create_task(run(Materialiser(namespace), url, stop=stop))
    try:
        for s in sessions:
            async with AsyncChatHistory(s, namespace=namespace, url=url) as h:
                await h.extend([{"role": "user", "content": f"{s} {i}"} for i in range(50)])
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 30)
        assert all([await _chunks(conn, namespace, s) >= 1 for s in sessions])
        await _materialised_equals_raw(url, namespace, sessions)
        for s in sessions:  # 100 in all: the server drops the oldest 36, which the chunks hold
            async with AsyncChatHistory(s, namespace=namespace, url=url) as h:
                for i in range(50, 100, 10):
                    await h.extend([{"role": "user", "content": f"{s} {j}"} for j in range(i, i + 10)])
        await _materialised_equals_raw(url, namespace, sessions)
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 30)
        await _materialised_equals_raw(url, namespace, sessions)
        async with AsyncChatHistory(sessions[0], namespace=namespace, url=url) as h:
            assert len(await h.messages()) == 64
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    try:
        # stopped (it lags): clear, then the same content again
        for s in sessions:
            async with AsyncChatHistory(s, namespace=namespace, url=url) as h:
                await h.clear()
                await h.extend([{"role": "user", "content": f"{s} {i}"} for i in range(5)])
        await _materialised_equals_raw(url, namespace, sessions)
        stop = asyncio.Event()
        task = asyncio.create_task(run(Materialiser(namespace), url, stop=stop))
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 30)
        await _materialised_equals_raw(url, namespace, sessions)
        async with AsyncChatHistory(sessions[1], namespace=namespace, url=url) as h:
            assert await h.messages() == [{"role": "user", "content": f"{sessions[1]} {i}"} for i in range(5)]
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await release(conn)


async def test_a_second_audit_into_the_same_directory_is_refused(url: str, namespace: str, tmp_path: Path) -> None:
    """Two audits appending to one directory each record their own file length in state.json, and
    a restart cuts the file back to the stale one: acknowledged events lost from the export.
    The second one must refuse to start, clearly, while the first keeps running."""
    from .test_consumers import _consume

    out = tmp_path / "audit"
    first = _consume(url, "audit", "-n", namespace, "--dir", str(out), "--no-progress")
    try:

        async def subscribed() -> bool:
            return any(s.name == "botwire-audit" and namespace in s.stream for s in await status(url))

        await until(subscribed, "the first audit to start", 30)
        second = _consume(url, "audit", "-n", namespace, "--dir", str(out), "--no-progress", "--name", "other")
        try:
            _, err = second.communicate(timeout=20)
        finally:
            if second.poll() is None:
                second.kill()
                second.wait(timeout=10)
        assert second.returncode == 2, err
        assert "error: " in err and str(out) in err
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


@pytest.mark.slow
async def test_materialised_reads_stay_exact_when_the_server_is_killed_while_it_writes_chunks(
    own_server: Any, tmp_path: Path
) -> None:
    """nats-server SIGKILLed while the materialiser (a real process) writes chunks, then restarted
    (and the materialiser too, if it gave up): every read equals the raw log, before and after
    it catches up; no acknowledged message lost."""
    from .test_consumers import _caught_up, _chunks, _consume

    url, namespace = own_server.url, "qa"
    sessions = [f"s{i}" for i in range(3)]
    expected: dict[str, list[dict[str, Any]]] = {s: [] for s in sessions}

    async def write(rounds: int) -> None:
        for r in range(rounds):
            for s in sessions:
                batch = [{"role": "user", "content": f"{s} {r} {j}"} for j in range(10)]
                async with AsyncChatHistory(s, namespace=namespace, url=url) as h:
                    await h.extend(batch)
                expected[s].extend(batch)

    await write(5)
    proc = _consume(url, "materialise", "-n", namespace)
    try:
        conn = await acquire(resolve(url))
        try:
            await until(lambda: _has_chunks(conn, namespace, sessions[0]), "the first chunks", 30)
        finally:
            await release(conn)
        await write(5)  # more arriving while it works
        own_server.kill()
        own_server.start()
        await write(2)
        if proc.poll() is not None:  # it may give up while the server is gone: run it again
            proc = _consume(url, "materialise", "-n", namespace)
        for s in sessions:
            async with AsyncChatHistory(s, namespace=namespace, url=url) as h:
                assert await h.messages() == expected[s], s
        stream = f"BOTWIRE_CHAT_{namespace}"
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 40)
        conn = await acquire(resolve(url))
        try:
            assert await _chunks(conn, namespace, sessions[0]) >= 1
        finally:
            await release(conn)
        for s in sessions:
            async with AsyncChatHistory(s, namespace=namespace, url=url) as h:
                assert await h.messages() == expected[s], s
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


async def _has_chunks(conn: Any, namespace: str, session: str) -> bool:
    from .test_consumers import _chunks

    try:
        return await _chunks(conn, namespace, session) >= 1
    except Exception:  # noqa: BLE001 - the stream is not there yet
        return False
