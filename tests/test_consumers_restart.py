"""A worker outlives its embedded server: SIGKILLed, the server comes back on another port, and the
worker (the materialiser, a raw batch pull; the audit, nats-py pull subscriptions) follows it there
by itself and handles what is written after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from botwire_stream import AsyncChatHistory
from botwire_stream.nats import embedded
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve
from consumers.lock import BUCKET, HEARTBEAT

from .procs import consumer, consumer_handled, holding, kill_all, kill_embedded
from .waits import until

pytestmark = pytest.mark.nats_only


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["materialise", "audit"])
async def test_a_worker_follows_its_embedded_server_to_a_new_port(
    botwire_home: Path, namespace: str, tmp_path: Path, kind: str
) -> None:
    history = AsyncChatHistory("s", namespace=namespace)
    conn = await acquire(resolve(None))  # the embedded server of botwire_home, as the worker's

    async def handled(count: int) -> bool:
        """Every message acknowledged by the worker; the materialiser's summary counts ``count``."""
        return await consumer_handled(proc, conn, kind, namespace, count)

    proc = consumer(kind, namespace, *(["--dir", str(tmp_path / "audit")] if kind == "audit" else []))
    try:
        await history.extend([{"role": "user", "content": f"before {i}"} for i in range(20)])
        await until(lambda: handled(20), "the first 20 messages handled", 30)

        state = kill_embedded(botwire_home)  # the server this test's process started
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
        kill_all([proc])
        await history.close()
        await release(conn)
