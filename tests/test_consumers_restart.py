"""A worker outlives its embedded server: SIGKILLed, the server comes back on another port, and the
worker (the materialiser, a raw batch pull; the audit, nats-py pull subscriptions) follows it there
by itself and handles what is written after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from botwire_stream import AsyncChatHistory, keys
from botwire_stream.nats import embedded
from botwire_stream.nats import materialised as mat
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve
from consumers.lock import BUCKET, HEARTBEAT
from consumers.runtime import status

from .procs import ROOT, holding
from .waits import until

pytestmark = pytest.mark.nats_only


def _dead(home: Path, pid: int) -> bool:
    """Whether the embedded server ``pid`` is gone (a zombie of this process counts as gone)."""
    state = embedded.status(home)
    return state is None or state.pid != pid


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["materialise", "audit"])
async def test_a_worker_follows_its_embedded_server_to_a_new_port(
    botwire_home: Path, namespace: str, tmp_path: Path, kind: str
) -> None:
    history = AsyncChatHistory("s", namespace=namespace)
    conn = await acquire(resolve(None))  # the embedded server of botwire_home, as the worker's
    subject = mat.summary_subject(namespace, keys.encode_key("s"))

    async def handled(count: int) -> bool:
        """Every message acknowledged by the worker; the materialiser's summary counts ``count``."""
        done = [
            s.pending == 0 and s.ack_pending == 0 and s.ack_floor == s.stream_last
            for s in await status()
            if s.name == f"botwire-{kind}" and s.stream == f"BOTWIRE_CHAT_{namespace}"
        ]
        if done != [True]:
            return False
        if kind == "audit":
            return True
        last = await conn.direct_get_last(mat.mat_stream(namespace), subject, 5.0)
        return last is not None and msgspec.json.decode(last.data, type=mat.Summary).message_count == count

    extra = ["--dir", str(tmp_path / "audit")] if kind == "audit" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "consume", kind, "-n", namespace, *extra],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        await history.extend([{"role": "user", "content": f"before {i}"} for i in range(20)])
        await until(lambda: handled(20), "the first 20 messages handled", 30)

        state = embedded.status(botwire_home)
        assert state is not None
        os.kill(state.pid, signal.SIGKILL)  # the server this test's process started
        deadline = time.monotonic() + 10
        while not _dead(botwire_home, state.pid):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with holding(state.port):
            # this write restarts the server (the process's connection recovers), on a new port
            await history.extend([{"role": "user", "content": f"after {i}"} for i in range(20)])
            now = embedded.status(botwire_home)
            assert now is not None and now.port != state.port
            await until(lambda: handled(40), "the 20 later messages handled", 30)
            # and it still holds its instance lock: the heartbeat rewrites the entry on the new server
            lock = await conn.js.key_value(BUCKET)
            key = f"BOTWIRE_CHAT_{namespace}.botwire-{kind}"
            first = (await lock.get(key)).revision

            async def beating() -> bool:
                return (await lock.get(key)).revision > first

            await until(beating, "a heartbeat of the lock", 10 * HEARTBEAT)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        expected = [f"before {i}" for i in range(20)] + [f"after {i}" for i in range(20)]
        assert [m["content"] for m in await history.messages()] == expected
        if kind == "audit":  # every message in the export, once, in order
            files = sorted((tmp_path / "audit").glob("audit-*.jsonl"))
            records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
            appended = sorted((r["seq"], json.loads(r["data"])["content"]) for r in records if r["op"] == "append")
            assert [content for _, content in appended] == expected
            assert len({r["id"] for r in records}) == len(records)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        await history.close()
        await release(conn)
