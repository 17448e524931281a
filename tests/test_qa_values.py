"""QA of chunked values, TTLs and values at the edges: cases the first fixes of issue 14 missed.

Faults are real: the test's own nats-server is frozen with SIGSTOP at the one moment that
matters (just before a chunked value's manifest is published), found by wrapping the library's
own publish call; the server itself is never replaced.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from botwire_stream import AsyncMemory, Memory
from botwire_stream.errors import InvalidTTL, ServerUnavailable
from botwire_stream.nats import embedded
from botwire_stream.nats.jetstream import Connection
from botwire_stream.times import ttl_seconds
from tests.servers import NatsServer
from tests.waits import sigstop

MiB = 1024 * 1024


@pytest.mark.slow
def test_a_big_set_whose_commit_timed_out_leaves_the_key_readable(
    own_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stalls (SIGSTOP, 2 s) just as a chunked value's manifest is sent, longer than the
    request timeout (1 s): ``set`` raises ``ServerUnavailable`` (or, on a loaded machine, is
    confirmed in time), and the server stores the manifest when it resumes. The key must then read as one of the two values, whole, never as an error:
    the writer must not reclaim the chunks of a manifest whose outcome it does not know."""
    original = Connection.publish
    resume: list[threading.Timer] = []

    async def stall_on_manifest(
        self: Connection, subject: str, data: bytes, headers: Mapping[str, str] | None = None, timeout: float = 5.0,
        **kw: Any,
    ) -> int:
        if headers and "Botwire-Blob" in headers and not resume:
            sigstop(own_server.pid)
            timer = threading.Timer(2.0, os.kill, (own_server.pid, signal.SIGCONT))
            resume.append(timer)
            timer.start()
        return await original(self, subject, data, headers, timeout, **kw)

    big = "n" * (3 * MiB)

    async def main() -> None:
        async with AsyncMemory("t" + uuid.uuid4().hex[:8], url=own_server.url, timeout=1) as memory:
            await memory.set("k", "old")
            monkeypatch.setattr(Connection, "publish", stall_on_manifest)
            try:
                await memory.set("k", big)
                acknowledged = True  # on a loaded machine the stall can end within the deadline
            except ServerUnavailable:  # OutcomeUnknown included: stored or not, never half
                acknowledged = False
            monkeypatch.setattr(Connection, "publish", original)
            resume[0].join()
            for _ in range(3):
                assert await memory.get("k") in ((big,) if acknowledged else ("old", big))
            trail = await memory.revisions("k")
            assert trail[-1].value == await memory.get("k")

    try:
        asyncio.run(main())
    finally:
        for timer in resume:
            timer.cancel()
        os.kill(own_server.pid, signal.SIGCONT)


@pytest.mark.slow
def test_a_big_value_with_a_ttl_reads_whole_until_it_reads_as_missing(tmp_path: Path) -> None:
    """A chunked value with ``ttl=1``, written as 4,096 small messages (4 KiB bodies): its first
    chunks are written well before its manifest. Polled until it expires, ``get`` returns the whole
    value or nothing, never the error that the value kept changing."""
    server = NatsServer(tmp_path / "small", max_payload=20 * 1024).start()
    value = "t" * (16 * MiB)

    async def main() -> None:
        async with AsyncMemory("t" + uuid.uuid4().hex[:8], url=server.url) as memory:
            for _ in range(3):
                await memory.set("k", value, ttl=1)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 15  # bounds the loop only: expiry takes 1-2 s
                while loop.time() < deadline:
                    got = await memory.get("k")
                    if got is None:
                        break
                    assert got == value
                assert await memory.get("k") is None

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_huge_negative_int_ttl_raises_invalid_ttl() -> None:
    with pytest.raises(InvalidTTL):
        ttl_seconds(-(10**400))


@pytest.mark.slow
def test_a_big_update_sent_twice_after_a_stall_keeps_its_chunks(
    botwire_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the embedded server a publish that timed out is sent once more. The server stalls 1.5 s
    (SIGSTOP) as the manifest of a chunked ``update`` is sent with ``timeout=1``: the first copy is
    stored when it resumes, and the second conflicts with it. The update must not take that
    conflict for a lost race and reclaim its own chunks: the key stays readable, ``fn`` ran once."""
    original = Connection.publish
    resume: list[threading.Timer] = []
    pids: list[int] = []

    async def stall_on_manifest(
        self: Connection, subject: str, data: bytes, headers: Mapping[str, str] | None = None, timeout: float = 5.0,
        **kw: Any,
    ) -> int:
        if headers and "Botwire-Blob" in headers and not resume:
            state = embedded.status(botwire_home)
            assert state is not None
            pids.append(state.pid)
            sigstop(state.pid)
            timer = threading.Timer(1.5, os.kill, (state.pid, signal.SIGCONT))
            resume.append(timer)
            timer.start()
        return await original(self, subject, data, headers, timeout, **kw)

    calls: list[int] = []

    def bump(current: dict[str, Any]) -> dict[str, Any]:
        calls.append(current["n"])
        return {"n": current["n"] + 1, "pad": "u" * (9 * MiB)}  # the embedded server takes 8 MiB

    async def main() -> None:
        async with AsyncMemory("t" + uuid.uuid4().hex[:8], timeout=1) as memory:
            await memory.set("k", {"n": 0})
            monkeypatch.setattr(Connection, "publish", stall_on_manifest)
            try:
                result: dict[str, Any] | None = await memory.update("k", bump)
            except ServerUnavailable:
                result = None  # the second copy timed out too: the outcome is not known
            monkeypatch.setattr(Connection, "publish", original)
            resume[0].join()
            # After ServerUnavailable the outcome is unknown: a copy still queued in the resumed
            # server may land after this read (seen under load), so read until the key is settled.
            deadline = time.monotonic() + 10
            while True:
                value = await memory.get("k")
                trail = await memory.revisions("k")
                if trail[-1].value == value or result is not None or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert value["n"] in (0, 1)
            if result is not None:
                assert value == result and calls == [0]
            assert trail[-1].value == value

    try:
        asyncio.run(main())
    finally:
        for timer in resume:
            timer.cancel()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def test_the_deepest_value_set_accepts_reads_back_from_deeper_code(url: str, namespace: str) -> None:
    """How deep a value may nest is decided by Python's recursion limit, counted from the caller's
    own stack: a value that ``set`` accepted must still read back when ``get`` is called from code
    60 calls deeper (a web framework's handler), not raise ``RecursionError``."""

    async def main() -> None:
        async with AsyncMemory(namespace, url=url) as memory:
            depth = 1000
            while True:  # the deepest value set accepts here; deeper ones raise TypeError, unwritten
                try:
                    await memory.set("deep", _nested(depth))
                    break
                except TypeError:
                    depth -= 1
            assert depth > 900

            async def get_from_deeper(calls: int) -> Any:
                return await get_from_deeper(calls - 1) if calls else await memory.get("deep")

            assert await get_from_deeper(60) == _nested(depth)

    asyncio.run(main())


def test_cli_set_of_json_nested_too_deeply_exits_2_and_writes_nothing(url: str, namespace: str) -> None:
    """5,000 nested lists on stdin are valid JSON that Python cannot hold: one ``error:`` line,
    exit code 2 (not a traceback and exit 1, which means "not found"), nothing written."""
    proc = subprocess.run(
        [sys.executable, "-m", "botwire_stream", "--url", url, "-n", namespace, "set", "k", "-"],
        input=b"[" * 5000 + b"]" * 5000,
        capture_output=True,
        timeout=60,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1
    with Memory(namespace, url=url) as memory:
        assert memory.revisions("k") == []
