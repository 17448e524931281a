"""``botwire consume compact``: summaries recorded by the compaction consumer, once per range."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from botwire_stream import AsyncChatHistory, areplay
from botwire_stream.errors import InvalidArgument
from consumers.compactor import Compactor
from consumers.runtime import run, status

from .compact_workers import asummarise
from .procs import ROOT
from .test_consumers import _running
from .waits import until

pytestmark = pytest.mark.nats_only


async def _caught_up(url: str, namespace: str, consumer: str = "botwire-compact") -> bool:
    for s in await status(url):
        if s.name == consumer and s.stream == f"BOTWIRE_CHAT_{namespace}":
            return s.pending == 0 and s.ack_pending == 0 and s.ack_floor == s.stream_last
    return False


def _msg(i: int) -> dict[str, Any]:
    return {"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"}


def _joined(n: int) -> str:
    return "|".join(f"m{i}" for i in range(n))


async def _summaries(url: str, namespace: str, session: str) -> list[tuple[int, str]]:
    """Every summary event of ``session`` (upto, content), oldest first, from replay."""
    return [
        (e.upto or 0, e.value["content"])
        async for e in areplay(namespace, keys=None, conversations=session, url=url)
        if e.kind == "summary"
    ]


async def test_compact_consumer_summarises_past_the_size_and_window_returns_summary_plus_tail(
    url: str, namespace: str
) -> None:
    h = AsyncChatHistory("c", namespace=namespace, url=url)
    worker = Compactor([namespace], asummarise, max_messages=10, keep=2, url=url)
    stop = asyncio.Event()
    task = asyncio.create_task(run(worker, url, stop=stop))
    try:
        seqs = await h.extend([_msg(i) for i in range(25)])
        await until(lambda: _caught_up(url, namespace), "the compactor to catch up", 20)
        # 25 > 10 messages: all but the newest 2 summarised, the summary covering up to m22
        summary = {"role": "system", "content": _joined(23)}
        assert await h.messages(window=2) == [summary, _msg(23), _msg(24)]
        assert await _summaries(url, namespace, "c") == [(seqs[22], _joined(23))]
        # 7 unsummarised (not over 10): nothing new; 12: the next summary covers the first one too
        seqs += await h.extend([_msg(i) for i in range(25, 30)])
        await until(lambda: _caught_up(url, namespace), "the compactor to catch up", 20)
        assert len(await _summaries(url, namespace, "c")) == 1
        seqs += await h.extend([_msg(i) for i in range(30, 35)])
        await until(lambda: _caught_up(url, namespace), "the compactor to catch up", 20)
        assert await h.messages(window=5) == [{"role": "system", "content": _joined(33)}, _msg(33), _msg(34)]
        assert await _summaries(url, namespace, "c") == [(seqs[22], _joined(23)), (seqs[32], _joined(33))]
        # the full log is still there and replayable: every message, then each summary event
        assert await h.messages() == [_msg(i) for i in range(35)]
        kinds = [e.kind async for e in areplay(namespace, keys=None, url=url)]
        assert kinds.count("append") == 35 and kinds.count("summary") == 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await h.close()


async def test_compact_consumer_by_bytes(url: str, namespace: str) -> None:
    h = AsyncChatHistory("b", namespace=namespace, url=url)
    worker = Compactor([namespace], asummarise, max_messages=None, max_bytes=900, url=url)
    stop = asyncio.Event()
    task = asyncio.create_task(run(worker, url, stop=stop))
    try:
        big = [{"role": "user", "content": f"{i}" + "x" * 300} for i in range(3)]
        await h.extend(big[:2])  # about 640 bytes: under the limit
        await until(lambda: _caught_up(url, namespace), "the compactor to catch up", 20)
        assert await _summaries(url, namespace, "b") == []
        seqs = await h.extend(big[2:])  # about 960 bytes, over 900: summarised
        await until(lambda: _caught_up(url, namespace), "the compactor to catch up", 20)
        assert await _summaries(url, namespace, "b") == [(seqs[0], "|".join(m["content"] for m in big))]
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await h.close()


@pytest.mark.slow
async def test_compact_consumer_killed_mid_backlog_then_restarted_records_one_summary_per_range(
    url: str, namespace: str
) -> None:
    sessions = [f"s{i}" for i in range(3)]
    histories = {s: AsyncChatHistory(s, namespace=namespace, url=url) for s in sessions}
    try:
        for r in range(40):  # interleaved: each batch of 20 events touches every conversation
            for s, h in histories.items():
                await h.extend([_msg(i) for i in range(r * 10, r * 10 + 10)])
        args = ("compact", "-n", namespace, "--summarise", "tests.compact_workers:summarise")
        args += ("--max-messages", "15", "--keep", "1", "--batch", "20")

        async def some_summary() -> bool:
            return bool(await _summaries(url, namespace, "s0"))

        with _running(url, *args) as proc:
            await until(some_summary, "the first summary", 30, every=0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        assert not await _caught_up(url, namespace)  # killed in the middle of the backlog
        with _running(url, *args) as proc:
            await until(lambda: _caught_up(url, namespace), "the compactor to catch up", 60)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        for s, h in histories.items():
            entries = await h.entries()
            index = {e.seq: i for i, e in enumerate(entries)}
            found = await _summaries(url, namespace, s)
            uptos = [u for u, _ in found]
            assert uptos == sorted(set(uptos))  # one summary per range, each after the previous
            for upto, content in found:  # each names exactly the messages up to its upto, once
                assert content == _joined(index[upto] + 1)
            assert len(entries) - index[uptos[-1]] - 1 <= 15  # caught up: at most the limit left over
            window = await h.messages(window=1)
            assert window[0] == {"role": "system", "content": found[-1][1]}
    finally:
        for h in histories.values():
            await h.close()


def test_compact_bad_input_is_refused_before_anything_runs(tmp_path: Path) -> None:
    for summariser in ("nosuchmodule_x:summarise", "tests.compact_workers:nosuch", "no-colon"):
        done = subprocess.run(
            [sys.executable, "-m", "botwire_stream", "consume", "compact", "--summarise", summariser],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "BOTWIRE_URL": "nats://127.0.0.1:1"},  # never reached
        )
        assert done.returncode == 2, done.stderr
        assert "summariser" in done.stderr or "module:function" in done.stderr
    with pytest.raises(InvalidArgument):
        Compactor(["ns"], asummarise, max_messages=None, max_bytes=None)
    with pytest.raises(InvalidArgument):
        Compactor(["ns"], asummarise, keep=-1)
