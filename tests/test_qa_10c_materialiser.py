"""QA of issue 10's consumers under faults, with many conversations interleaved: the history
materialiser SIGKILLed in the middle of a raw batch of a backlog and SIGSTOPped while 2,000
appends land (``ChatHistory.messages()``/``entries()`` must equal the raw log for every
conversation, ``sessions()`` must count exactly, the chunks must hold each message once), and
the audit export SIGKILLed twice mid-backlog (every event once in its files)."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, keys
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
        stream = f"BOTWIRE_CHAT_{namespace}"
        [info] = [s for s in await status(url) if s.name == "botwire-materialise" and s.stream == stream]
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


def _audit_ids(directory: Path) -> list[str]:
    ids: list[str] = []
    for path in sorted(directory.glob("audit-*.jsonl*")):
        opener: Any = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            ids.extend(json.loads(line)["id"] for line in f)
    return ids


async def test_audit_killed_twice_mid_backlog_of_interleaved_conversations_writes_each_event_once(
    url: str, namespace: str, tmp_path: Path
) -> None:
    """1,800 events of 50 interleaved conversations plus 200 key writes; the audit SIGKILLed twice
    in the middle (after its first files, then after a rotation), restarted each time: every event
    exactly once in its files, in each log's order."""
    _write(url, namespace, 600, 2, 48)
    async with AsyncMemory(namespace, url=url) as m:
        key_revs = [await m.set(f"k{i}", i) for i in range(200)]
    conn = await acquire(resolve(url))
    try:
        chat_last = (await conn.js.stream_info(f"BOTWIRE_CHAT_{namespace}")).state.last_seq
    finally:
        await release(conn)
    expected = [f"BOTWIRE_CHAT_{namespace}:{s}" for s in range(1, chat_last + 1)]
    expected += [f"KV_botwire_{namespace}:{r}" for r in key_revs]
    out = tmp_path / "audit"
    cmd = [sys.executable, "-m", "botwire_stream", "consume", "audit", "-n", namespace, "--dir", str(out)]
    cmd += ["--gzip", "--rotate-bytes", "65536", "--batch", "50", "--no-progress", "--url", url]

    def written() -> int:
        try:
            return sum(json.loads((out / "state.json").read_text())["seqs"].values())
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return 0

    for at_least in (300, 1000, None):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if at_least is not None:

                async def far_enough(n: int = at_least) -> bool:
                    assert proc.poll() is None, proc.communicate()
                    return written() >= n

                await until(far_enough, f"{at_least} events audited", 60, every=0.002)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                assert written() < chat_last + len(key_revs)  # killed in the middle
            else:

                async def all_done() -> bool:
                    assert proc.poll() is None, proc.communicate()
                    return written() >= chat_last + key_revs[-1]

                await until(all_done, "the audit to catch up", 60)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    ids = _audit_ids(out)
    assert len(ids) == len(set(ids))  # none twice
    assert sorted(ids) == sorted(expected)  # none missing
    for stream in (f"BOTWIRE_CHAT_{namespace}", f"KV_botwire_{namespace}"):
        seqs = [int(i.rsplit(":", 1)[1]) for i in ids if i.startswith(stream + ":")]
        assert seqs == sorted(seqs)  # each log in order
    assert list(out.glob("audit-*.jsonl.gz"))  # rotated and compressed
