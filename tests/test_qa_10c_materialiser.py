"""QA of issue 10's history materialiser under faults, with many conversations interleaved: a
SIGKILL in the middle of a raw batch of a backlog, and a SIGSTOP while 2,000 appends land.
``ChatHistory.messages()``/``entries()`` must equal the raw log for every conversation,
``sessions()`` must count exactly, and the chunks must hold each message once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime

import msgspec
import pytest

from botwire_stream import AsyncChatHistory, keys
from botwire_stream.nats import materialised as mat
from botwire_stream.nats.jetstream import Connection
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve
from botwire_stream.times import parse_time
from consumers.runtime import status

from .procs import ROOT
from .waits import sigstop, until

pytestmark = [pytest.mark.nats_only, pytest.mark.slow]

Truth = dict[str, list[tuple[int, datetime, bytes]]]


@contextlib.contextmanager
def _materialiser(url: str, namespace: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "consume", "materialise", "-n", namespace, "--url", url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=30)


def _write(url: str, namespace: str, rounds: int, hot: int, cold: int) -> None:
    cmd = [sys.executable, "-m", "tests.qa10c_workers", "write", url, namespace, str(rounds), str(hot), str(cold)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


async def _caught_up(url: str, namespace: str) -> bool:
    for s in await status(url):
        if s.name == "botwire-materialise" and s.stream == f"BOTWIRE_CHAT_{namespace}":
            return s.pending == 0 and s.ack_pending == 0 and s.ack_floor == s.stream_last
    return False


async def _truth(conn: Connection, namespace: str, sessions: list[str]) -> Truth:
    """Each conversation as the raw log holds it: (sequence, stored time, body)."""
    out: Truth = {}
    for s in sessions:
        subject = f"botwire.{namespace}.chat.{keys.encode_key(s)}"
        msgs = await conn.read_subject(f"BOTWIRE_CHAT_{namespace}", subject, headers=True, timeout=10.0)
        out[s] = [
            (int(h["Nats-Sequence"]), parse_time(h["Nats-Time-Stamp"]), m.data)
            for m in msgs
            if m.data and (h := m.headers or {})
        ]
    return out


async def _exact(url: str, namespace: str, truth: Truth) -> None:
    """messages(), entries() and sessions() answer what the raw log holds."""
    for s, rows in truth.items():
        async with AsyncChatHistory(s, namespace=namespace, url=url) as h:
            assert await h.messages() == [msgspec.json.decode(d) for _, _, d in rows], s
            assert [(e.seq, e.time) for e in await h.entries()] == [(q, t) for q, t, _ in rows], s
    listed = await AsyncChatHistory.sessions(namespace, limit=None, url=url)
    assert {i.session_id: (i.message_count, i.last_activity) for i in listed} == {
        s: (len(rows), rows[-1][1]) for s, rows in truth.items()
    }
    order = sorted(truth, key=lambda s: (truth[s][-1][1], s), reverse=True)
    page = await AsyncChatHistory.sessions(namespace, limit=10, url=url)
    assert [(i.session_id, i.message_count) for i in page] == [(s, len(truth[s])) for s in order[:10]]
    rest = await AsyncChatHistory.sessions(namespace, limit=10, before=page[-1], url=url)
    assert [i.session_id for i in rest] == order[10:20]


async def _chunks_hold_each_message_once(conn: Connection, namespace: str, truth: Truth) -> None:
    for s, rows in truth.items():
        _, chunks, _ = await mat.read_chain(conn, namespace, keys.encode_key(s), 10.0)
        seqs = [q for c in chunks for q in c.seqs]
        assert seqs == [q for q, _, _ in rows], s  # in order, none missing, none twice


async def test_materialiser_killed_mid_backlog_then_restarted_is_exact(url: str, namespace: str) -> None:
    """A backlog of 3,600 events (2 hot conversations, 48 cold ones, interleaved); the materialiser
    SIGKILLed once its first chunks are written (in the middle of a raw batch: the hot ones
    flushed, the cold ones held, nothing acknowledged beyond); reads exact meanwhile; restarted:
    reads exact, the chunks hold each message once, every summary counts exactly (``sessions``
    shows a title only when its summary matches the log)."""
    sessions = ["h0", "h1"] + [f"c{i:02d}" for i in range(48)]
    _write(url, namespace, 1200, 2, 48)
    conn = await acquire(resolve(url))
    try:
        truth = await _truth(conn, namespace, sessions)
        assert sum(len(r) for r in truth.values()) == 3600
        mat_stream = mat.mat_stream(namespace)

        async def some_chunks() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                return (await conn.js.stream_info(mat_stream)).state.messages > 0
            except Exception:  # not made yet
                return False

        with _materialiser(url, namespace) as proc:
            await until(some_chunks, "the first chunks", 60, every=0.002)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        [info] = [s for s in await status(url) if s.name == "botwire-materialise"]
        assert info.ack_floor < info.stream_last  # killed in the middle of the backlog
        await _exact(url, namespace, truth)  # half-materialised, nobody running

        with _materialiser(url, namespace) as proc:
            await until(lambda: _caught_up(url, namespace), "the restarted materialiser to catch up", 60)
            await _exact(url, namespace, truth)
            await _chunks_hold_each_message_once(conn, namespace, truth)
            listed = await AsyncChatHistory.sessions(namespace, limit=None, url=url)
            assert all(i.title is not None for i in listed)  # each summary counts exactly what the log holds
            page = await AsyncChatHistory.sessions(namespace, limit=50, url=url)
            assert all(i.title is not None and i.tokens for i in page)
            assert {i.session_id: i.first_activity for i in page} == {s: r[0][1] for s, r in truth.items()}
    finally:
        await release(conn)


async def test_reads_are_exact_while_the_materialiser_is_stopped_during_2000_appends(url: str, namespace: str) -> None:
    """50 conversations materialised; the materialiser SIGSTOPped while 2,000 more appends land:
    messages(), entries() and sessions() (counts, order, pages) are exact while it lags; SIGCONT:
    it goes on (its lease renewed, nobody took over) and catches up, still exact."""
    sessions = [f"h{i}" for i in range(50)]
    conn = await acquire(resolve(url))
    try:
        with _materialiser(url, namespace) as proc:
            _write(url, namespace, 6, 50, 0)
            await until(lambda: _caught_up(url, namespace), "the materialiser to catch up", 60)
            sigstop(proc.pid)
            _write(url, namespace, 40, 50, 0)
            truth = await _truth(conn, namespace, sessions)
            assert sum(len(r) for r in truth.values()) == 50 * 46
            assert not await _caught_up(url, namespace)
            await _exact(url, namespace, truth)
            os.kill(proc.pid, signal.SIGCONT)

            async def running_and_caught_up() -> bool:
                assert proc.poll() is None, proc.communicate()
                return await _caught_up(url, namespace)

            await until(running_and_caught_up, "the resumed materialiser to catch up", 60)
            await _exact(url, namespace, truth)
            await _chunks_hold_each_message_once(conn, namespace, truth)
            page = await AsyncChatHistory.sessions(namespace, limit=50, url=url)
            assert len(page) == 50 and all(i.title is not None for i in page)
    finally:
        await release(conn)
