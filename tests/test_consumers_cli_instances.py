"""One running instance per consumer name: ``botwire consume`` refuses a second process on the
same durable consumer (two OS processes), and a killed one is replaced at once."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nats.js.errors
import pytest

from botwire_stream import AsyncMemory
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve
from consumers.lock import BUCKET

from .procs import ROOT
from .waits import until

pytestmark = pytest.mark.nats_only


def _consume(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "consume", *args, "--url", url],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )


async def _holder(url: str, namespace: str) -> int | None:
    """The pid holding the audit consumer of ``namespace``'s keys, None: nobody."""
    conn = await acquire(resolve(url))
    try:
        kv = await conn.js.key_value(BUCKET)
        entry = await kv.get(f"KV_botwire_{namespace}.botwire-audit")
        pid: int = json.loads(entry.value or b"{}")["pid"]
        return pid
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
        return None
    finally:
        await release(conn)


async def _until_held_by(proc: subprocess.Popen[str], url: str, namespace: str, what: str) -> None:
    """Wait until ``proc`` (still running) holds the audit consumer of ``namespace``."""

    async def held() -> bool:
        assert proc.poll() is None, proc.communicate()
        return await _holder(url, namespace) == proc.pid

    await until(held, what, bound=60)


async def test_a_second_audit_of_the_same_name_is_refused_and_a_killed_one_replaced(
    url: str, namespace: str, tmp_path: Path
) -> None:
    # Two audits of one name into two directories would each get half of the events (one durable
    # consumer): the second must fail, naming the first; after a SIGKILL a new one starts at once.
    async with AsyncMemory(namespace, url=url) as m:
        await m.set("k", 1)
    procs: list[subprocess.Popen[str]] = []
    try:
        first = _consume(url, "audit", "-n", namespace, "--dir", str(tmp_path / "a"), "--no-progress")
        procs.append(first)
        await _until_held_by(first, url, namespace, "the first audit holds its consumer")
        second = _consume(url, "audit", "-n", namespace, "--dir", str(tmp_path / "b"), "--no-progress")
        procs.append(second)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2, err
        assert f"consumer botwire-audit is already running as {socket.gethostname()}/{first.pid}" in err
        assert not (tmp_path / "b").exists() or not list((tmp_path / "b").glob("*.jsonl"))
        assert first.poll() is None  # untouched

        first.send_signal(signal.SIGKILL)
        first.wait(30)
        third = _consume(url, "audit", "-n", namespace, "--dir", str(tmp_path / "a"), "--no-progress")
        procs.append(third)
        await _until_held_by(third, url, namespace, "a restarted audit takes over from the killed one")
        third.send_signal(signal.SIGTERM)
        assert third.wait(30) == 0
        assert await _holder(url, namespace) is None  # released on a graceful stop
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
