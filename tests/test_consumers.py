"""consumers/: the history materialiser, audit export, webhooks, the runtime (crash, restart, SIGTERM).

Consumers run as real processes (``python -m botwire_stream consume ...``) on the session's
nats-server, and are SIGKILLed / SIGTERMed by PID; the webhook tests run the worker in-process
against a loopback HTTP receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory
from botwire_stream.nats import materialised as mat
from botwire_stream.nats.chatlog import NatsChatLog, _entry
from botwire_stream.nats.jetstream import Connection
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve
from consumers.runtime import status
from consumers.webhook import Webhook, deadletter_stream, sign

from .procs import ROOT
from .waits import until

pytestmark = pytest.mark.nats_only


def _consume(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "consume", *args, "--url", url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


@contextlib.contextmanager
def _running(url: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    proc = _consume(url, *args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _writers(url: str, namespace: str, rounds: int, sessions: list[str], processes: int) -> list[subprocess.Popen[str]]:
    cmd = [sys.executable, "-m", "tests.consumer_workers", "write", url, namespace, str(rounds), *sessions]
    return [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]


def _wait_all(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-3000:]


async def _caught_up(url: str, consumer: str, stream: str) -> bool:
    for s in await status(url):
        if s.name == consumer and s.stream == stream:
            return s.pending == 0 and s.ack_pending == 0 and s.ack_floor == s.stream_last
    return False


async def _raw(h: AsyncChatHistory) -> list[dict[str, Any]]:
    """The conversation read from the log only, as without a materialiser."""
    log = await h._connection()
    assert isinstance(log, NatsChatLog)
    return [msgspec.json.decode(m.data) for m in await log._read(None, None, headers=False)]


async def _chunks(conn: Connection, namespace: str, session: str) -> int:
    from botwire_stream import keys

    return len((await mat.read_chain(conn, namespace, keys.encode_key(session), 5.0))[1])


@pytest.mark.slow
async def test_materialised_reads_are_exact_while_it_runs_after_a_kill_and_while_it_catches_up(
    url: str, namespace: str
) -> None:
    sessions = [f"s{i}" for i in range(4)]
    histories = {s: AsyncChatHistory(s, namespace=namespace, url=url) for s in sessions}
    conn = await acquire(resolve(url))
    stream = f"BOTWIRE_CHAT_{namespace}"
    try:
        # 1. while it runs: 2 processes x 4 interleaved conversations (8 writers' streams)
        with _running(url, "materialise", "-n", namespace) as proc:
            writers = _writers(url, namespace, 100, sessions, 2)
            seen: dict[str, list[list[dict[str, Any]]]] = {s: [] for s in sessions}
            while any(w.poll() is None for w in writers):
                for s, h in histories.items():
                    seen[s].append(await h.messages())
            _wait_all(writers)
            await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 30)
            for s, h in histories.items():
                final = await _raw(h)
                assert len(final) == 2 * 110
                assert await h.messages() == final
                for read in seen[s]:  # every read during the writes: exactly what was there then
                    assert read == final[: len(read)]
                assert await _chunks(conn, namespace, s) >= 1  # read from chunks, not only the log
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

        # 2. after it was killed: new writes are read from the log after the chunks
        _wait_all(_writers(url, namespace, 50, sessions, 2))
        for h in histories.values():
            assert await h.messages() == await _raw(h)
            assert len(await h.messages()) == 2 * 110 + 2 * 55

        # clear, and write again, while no materialiser runs: the stale chunks are never served
        await histories["s0"].clear()
        assert await histories["s0"].messages() == []
        await histories["s0"].append({"role": "user", "content": "after the clear"})
        assert await histories["s0"].messages() == [{"role": "user", "content": "after the clear"}]

        # 3. while it catches up, killed in the middle once more, then to the end
        with _running(url, "materialise", "-n", namespace) as proc:
            for _ in range(50):
                for h in histories.values():
                    assert await h.messages() == await _raw(h)
                if await _caught_up(url, "botwire-materialise", stream):
                    break
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        with _running(url, "materialise", "-n", namespace):
            await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 30)
            for h in histories.values():
                assert await h.messages() == await _raw(h)
                log = await h._connection()
                assert isinstance(log, NatsChatLog)
                raw_entries = [(e.seq, e.time) for e in map(_entry, await log._read(None, None, headers=True))]
                assert [(e.seq, e.time) for e in await h.entries()] == raw_entries  # same sequences and times
            assert await histories["s0"].messages() == [{"role": "user", "content": "after the clear"}]
            # a fork is a new conversation like any other
            fork = AsyncChatHistory("fork", namespace=namespace, url=url)
            try:
                await histories["s1"].fork("fork")
                await until(lambda: _caught_up(url, "botwire-materialise", stream), "the fork to be materialised", 30)
                assert await fork.messages() == await histories["s1"].messages()
            finally:
                await fork.close()
            # the summary: counts, title from the first user message
            summary = await conn.direct_get_last(mat.mat_stream(namespace), mat.summary_subject(namespace, "s1"), 5.0)
            assert summary is not None
            info = msgspec.json.decode(summary.data, type=mat.Summary)
            assert info.message_count == len(await histories["s1"].messages())
            assert info.title is not None and info.title.endswith("-0")
    finally:
        for h in histories.values():
            await h.close()
        await release(conn)


def _audit_ids(directory: Path) -> list[str]:
    ids = []
    for path in sorted(directory.glob("audit-*.jsonl*")):
        opener: Any = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            ids.extend(json.loads(line)["id"] for line in f)
    return ids


async def _backlog(url: str, namespace: str, n_keys: int, n_messages: int) -> set[str]:
    """Write keys and conversation messages; the ids (stream:seq) of every event."""
    ids: set[str] = set()
    async with AsyncMemory(namespace, url=url) as memory:
        for i in range(0, n_keys, 100):
            revs = await asyncio.gather(*(memory.set(f"k:{j}", {"v": j}) for j in range(i, min(i + 100, n_keys))))
            ids.update(f"KV_botwire_{namespace}:{r}" for r in revs)
    h = AsyncChatHistory("audit", namespace=namespace, url=url)
    try:
        for i in range(0, n_messages, 500):
            seqs = await h.extend([{"role": "user", "content": f"m{j}"} for j in range(i, min(i + 500, n_messages))])
            ids.update(f"BOTWIRE_CHAT_{namespace}:{s}" for s in seqs)
    finally:
        await h.close()
    return ids


@pytest.mark.slow
async def test_audit_killed_mid_backlog_then_restarted_writes_every_event_exactly_once(
    url: str, namespace: str, tmp_path: Path
) -> None:
    expected = await _backlog(url, namespace, 1000, 3000)
    out = tmp_path / "audit"
    args = ("audit", "-n", namespace, "--dir", str(out), "--gzip", "--rotate-bytes", "65536", "--batch", "100")
    with _running(url, *args) as proc:
        state = out / "state.json"
        await until(lambda: _written(state, 1), "the first batch", 30, every=0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    killed_at = _written_count(state)
    assert 0 < killed_at < len(expected)  # killed in the middle of the backlog
    with _running(url, *args) as proc:
        await until(lambda: _all_acked(url, namespace), "the audit to catch up", 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    ids = _audit_ids(out)
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == expected
    assert list(out.glob("audit-*.jsonl.gz"))  # rotated and compressed


async def _written(state: Path, at_least: int) -> bool:
    return _written_count(state) >= at_least


def _written_count(state: Path) -> int:
    try:
        return sum(json.loads(state.read_text())["seqs"].values())
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


async def _all_acked(url: str, namespace: str) -> bool:
    return await _caught_up(url, "botwire-audit", f"KV_botwire_{namespace}") and await _caught_up(
        url, "botwire-audit", f"BOTWIRE_CHAT_{namespace}"
    )


@pytest.mark.slow
async def test_sigterm_finishes_the_batch_in_hand_and_acks_it(url: str, namespace: str, tmp_path: Path) -> None:
    expected = await _backlog(url, namespace, 0, 3000)
    out = tmp_path / "audit"
    args = ("audit", "-n", namespace, "--dir", str(out), "--batch", "100")
    with _running(url, *args) as proc:
        await until(lambda: _written(out / "state.json", 1), "the first batch", 30, every=0.005)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    # everything written is acknowledged, nothing more: the ack floor is the last event written
    written = json.loads((out / "state.json").read_text())["seqs"][f"BOTWIRE_CHAT_{namespace}"]
    [info] = [s for s in await status(url) if s.name == "botwire-audit" and s.stream == f"BOTWIRE_CHAT_{namespace}"]
    assert 0 < written < max(int(i.split(":")[1]) for i in expected)  # stopped in the middle of the backlog
    assert info.ack_pending == 0
    assert info.ack_floor == written
    assert len(_audit_ids(out)) == written


class _Receiver:
    """A loopback HTTP receiver that answers 500 to the first ``fail`` attempts of each event."""

    def __init__(self, fail: int, secret: bytes) -> None:
        self.attempts: dict[str, int] = {}
        self.delivered: list[dict[str, Any]] = []
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ts = self.headers["Botwire-Timestamp"]
                if self.headers["Botwire-Signature"] != sign(secret, ts, body):
                    receiver.bad_signatures += 1
                event = self.headers["Botwire-Event-Id"]
                n = receiver.attempts[event] = receiver.attempts.get(event, 0) + 1
                ok = n > fail
                if ok:
                    receiver.delivered.append(json.loads(body))
                self.send_response(200 if ok else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def _run_webhook(url: str, worker: Webhook, done: Any) -> None:
    from consumers.runtime import run

    stop = asyncio.Event()
    task = asyncio.create_task(run(worker, url, stop=stop))
    try:
        await until(done, "the webhook to deliver", 30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_webhook_retries_with_backoff_until_delivered_signed(url: str, namespace: str) -> None:
    secret = b"s3cret"
    receiver = _Receiver(fail=2, secret=secret)
    try:
        async with AsyncMemory(namespace, url=url) as memory:
            await memory.set("user:1", {"name": "Ada"})
            await memory.set("other", 1)  # not matched
            await memory.delete("user:1")
        worker = Webhook([namespace], "user:*", receiver.url, secret, attempts=4, backoff=0.01)

        async def done() -> bool:
            return len(receiver.delivered) == 2

        await _run_webhook(url, worker, done)
        assert [(e["key"], e["op"]) for e in receiver.delivered] == [("user:1", "set"), ("user:1", "delete")]
        assert json.loads(receiver.delivered[0]["data"]) == {"name": "Ada"}
        assert set(receiver.attempts.values()) == {3}  # 2 failures, then delivered
        assert receiver.bad_signatures == 0
    finally:
        receiver.close()


async def test_webhook_that_always_fails_dead_letters_the_event(url: str, namespace: str) -> None:
    receiver = _Receiver(fail=10**6, secret=b"k")
    conn = await acquire(resolve(url))
    try:
        h = AsyncChatHistory("conv:1", namespace=namespace, url=url)
        seq = await h.append({"role": "user", "content": "hi"})
        await h.close()
        worker = Webhook([namespace], "conv:*", receiver.url, b"k", attempts=3, backoff=0.01)

        async def done() -> bool:
            try:
                return (await conn.js.stream_info(deadletter_stream(namespace))).state.messages >= 1
            except Exception:
                return False

        await _run_webhook(url, worker, done)
        assert list(receiver.attempts.values()) == [3]
        dead = await conn.direct_batch(deadletter_stream(namespace), {"seq": 1, "batch": 10}, 5.0)
        assert len(dead.msgs) == 1
        body = json.loads(dead.msgs[0].data)
        assert (body["session_id"], body["seq"], json.loads(body["data"])) == (
            "conv:1",
            seq,
            {"role": "user", "content": "hi"},
        )
        assert (dead.msgs[0].headers or {})["Botwire-Error"] == "HTTP 500"
    finally:
        receiver.close()
        await release(conn)


def test_consume_status_shows_each_consumers_lag(url: str, namespace: str, tmp_path: Path) -> None:
    asyncio.run(_backlog(url, namespace, 10, 20))
    out = tmp_path / "audit"
    with _running(url, "audit", "-n", namespace, "--dir", str(out)) as proc:
        asyncio.run(until(lambda: _all_acked(url, namespace), "the audit to catch up", 30))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    from click.testing import CliRunner

    from botwire_stream.cli import cli

    result = CliRunner().invoke(cli, ["consume", "status", "--json", "--url", url])
    assert result.exit_code == 0, result.output
    rows = {(r["name"], r["stream"]): r for r in json.loads(result.output)}
    row = rows[("botwire-audit", f"BOTWIRE_CHAT_{namespace}")]
    assert (row["pending"], row["ack_pending"], row["ack_floor"]) == (0, 0, row["stream_last"])
    assert row["last_active"] is not None
    result = CliRunner().invoke(cli, ["--url", url, "consume", "status"])  # the group's --url applies too
    assert result.exit_code == 0, result.output
    table = result.output
    assert table.splitlines()[0].split() == [
        "CONSUMER", "STREAM", "PENDING", "UNACKED", "ACK", "FLOOR", "LAST", "SEQ", "LAST", "ACTIVE"
    ]
    assert any(line.split()[:2] == ["botwire-audit", f"KV_botwire_{namespace}"] for line in table.splitlines())


@pytest.mark.slow
async def test_webhook_killed_mid_backlog_then_restarted_delivers_every_event(
    url: str, namespace: str, tmp_path: Path
) -> None:
    secret = tmp_path / "hook.key"
    secret.write_bytes(b"k3y\n")
    receiver = _Receiver(fail=0, secret=b"k3y")
    try:
        expected = await _backlog(url, namespace, 150, 0)
        args = ("webhook", "-n", namespace, "--match", "k:*", "--to", receiver.url, "--secret-file", str(secret))
        with _running(url, *args, "--batch", "5") as proc:

            async def some() -> bool:
                return len(receiver.delivered) >= 10

            await until(some, "the first deliveries", 30, every=0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        killed_at = len(receiver.delivered)
        assert killed_at < len(expected)  # killed in the middle of the backlog
        with _running(url, *args) as proc:
            await until(lambda: _caught_up(url, "botwire-webhook", f"KV_botwire_{namespace}"), "the webhook to catch up", 30)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        ids = [e["id"] for e in receiver.delivered]
        assert set(ids) == expected  # every event, at least once
        assert len(ids) - len(set(ids)) <= 5  # repeats: at most the batch in hand when killed
        assert receiver.bad_signatures == 0
    finally:
        receiver.close()


def test_bad_input_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from botwire_stream.cli import cli

    key = tmp_path / "k"
    key.write_text("k")
    for args, message in [
        (["materialise", "-n", "bad ns!"], "namespace"),
        (["webhook", "-n", "app", "--match", "", "--to", "http://127.0.0.1:9/", "--secret-file", str(key)], "pattern"),
    ]:
        result = CliRunner().invoke(cli, ["consume", *args, "--url", "nats://127.0.0.1:1"])
        assert result.exit_code == 2
        assert "error: " in result.output and message in result.output


@pytest.mark.slow
async def test_materialised_reads_stay_exact_across_a_ttl_expiry(url: str, namespace: str) -> None:
    from consumers.materialiser import Materialiser
    from consumers.runtime import run

    stream = f"BOTWIRE_CHAT_{namespace}"
    stop = asyncio.Event()
    task = asyncio.create_task(run(Materialiser(namespace), url, stop=stop))
    h = AsyncChatHistory("short", namespace=namespace, url=url, ttl=1)
    conn = await acquire(resolve(url))
    try:
        await h.extend([{"role": "user", "content": f"old {i}"} for i in range(3)])
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 30)
        assert await _chunks(conn, namespace, "short") == 1

        async def expired() -> bool:
            return await _raw(h) == []

        await until(expired, "the conversation to expire", 15, every=0.05)
        assert await h.messages() == []  # the chunks of the expired messages are not served
        await h.append({"role": "user", "content": "new"})
        assert await h.messages() == [{"role": "user", "content": "new"}]
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 30)
        assert await h.messages() == [{"role": "user", "content": "new"}]
        start, chunks, _ = await mat.read_chain(conn, namespace, "short", 5.0)
        assert [m for c in chunks for m in c.data] == [b'{"role":"user","content":"new"}']  # started again
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await h.close()
        await release(conn)


@pytest.mark.slow
async def test_a_message_larger_than_a_chunk_is_read_from_the_log(url: str, namespace: str) -> None:
    from consumers.materialiser import Materialiser
    from consumers.runtime import run

    stream = f"BOTWIRE_CHAT_{namespace}"
    stop = asyncio.Event()
    task = asyncio.create_task(run(Materialiser(namespace), url, stop=stop))
    h = AsyncChatHistory("big", namespace=namespace, url=url)
    conn = await acquire(resolve(url))
    try:
        sent = [{"role": "user", "content": "a"}, {"role": "tool", "content": "x" * (mat.CHUNK_BYTES + 1)}]
        sent.append({"role": "assistant", "content": "b"})
        for m in sent:
            await h.append(m)
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 30)
        _, chunks, _ = await mat.read_chain(conn, namespace, "big", 5.0)
        assert [len(d) for c in chunks for d in c.data][1] == 0  # kept only in the log
        assert await h.messages() == sent
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await h.close()
        await release(conn)
