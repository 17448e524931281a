"""QA of issue 10's consumer instance lock (consumers/lock.py): a holder stalled past its heartbeat
(SIGSTOP) on another host is taken over; once resumed (SIGCONT) it must write nothing more.

"Another host" is real: the first consumer runs in its own UTS namespace (``unshare --uts`` in a
user namespace) with its own hostname, so the lock sees a holder it cannot probe by pid, exactly
as for a consumer on another machine; both reach the same nats-server on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nats.js.errors
import pytest

from botwire_stream import AsyncMemory
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve
from consumers.lock import BUCKET

from .procs import ROOT, kill_all
from .waits import sigstop, until

pytestmark = pytest.mark.nats_only


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--uts", "sh", "-c", "hostname qa10c-probe"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


def _audit(url: str, namespace: str, directory: Path, host: str | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "botwire_stream", "consume", "audit", "-n", namespace]
    cmd += ["--dir", str(directory), "--no-progress", "--url", url]
    if host is not None:  # its own hostname: ``exec`` keeps the pid, so the test signals python itself
        cmd = ["unshare", "--user", "--map-root-user", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )


def _lines(directory: Path) -> list[str]:
    out: list[str] = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        out.extend(json.loads(line)["id"] for line in path.read_text().splitlines())
    return out


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unshare --user --uts (a second hostname)")
async def test_a_stalled_holder_taken_over_writes_nothing_once_resumed(
    url: str, namespace: str, tmp_path: Path
) -> None:
    """Audit A (host qa10c-other) is SIGSTOPped; audit B (this host) takes over after 5 s; B is
    stopped in turn, 20 events are written, A is resumed. A must write none of them (its lease is
    gone) and exit; B, resumed, writes them. Before: A fetched and wrote the new events and
    acknowledged them, so B never saw them (both audits' files wrong)."""
    stream = f"KV_botwire_{namespace}"
    conn = await acquire(resolve(url))
    procs: list[subprocess.Popen[str]] = []
    try:
        kv = None

        async def holder() -> str | None:
            nonlocal kv
            try:
                kv = kv or await conn.js.key_value(BUCKET)
                entry = await kv.get(f"{stream}.botwire-audit")
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
                return None
            h = json.loads(entry.value or b"{}")
            return f"{h['host']}/{h['pid']}"

        async def waiting_pulls() -> int:
            return (await conn.js.consumer_info(stream, "botwire-audit")).num_waiting or 0

        async with AsyncMemory(namespace, url=url) as m:
            first = [await m.set(f"a{i}", i) for i in range(20)]
            a = _audit(url, namespace, tmp_path / "a", host="qa10c-other")
            procs.append(a)

            async def a_wrote_all() -> bool:  # written and acknowledged (else B would write them again)
                assert a.poll() is None, a.communicate()
                try:
                    info = await conn.js.consumer_info(stream, "botwire-audit")
                except nats.js.errors.NotFoundError:
                    return False  # not made yet
                done = info.ack_floor is not None and info.ack_floor.stream_seq == first[-1]
                return done and len(_lines(tmp_path / "a")) == 20

            await until(a_wrote_all, "audit A writes the first events", 60)
            assert await holder() == f"qa10c-other/{a.pid}"
            sigstop(a.pid)
            await until(lambda: _zero(waiting_pulls), "A's pull request to expire", 10)

            b = _audit(url, namespace, tmp_path / "b")
            procs.append(b)

            async def b_holds() -> bool:
                assert b.poll() is None, b.communicate()
                return (await holder() or "").endswith(f"/{b.pid}")

            await until(b_holds, "audit B takes over from the stalled A", 30)
            sigstop(b.pid)
            await until(lambda: _zero(waiting_pulls), "B's pull request to expire", 10)
            second = [await m.set(f"b{i}", i) for i in range(20)]

        written_by_a = _lines(tmp_path / "a")
        os.kill(a.pid, signal.SIGCONT)
        a.communicate(timeout=30)  # A finds its lease taken over and stops
        assert _lines(tmp_path / "a") == written_by_a  # nothing written after it was resumed
        os.kill(b.pid, signal.SIGCONT)

        async def b_wrote_the_rest() -> bool:
            assert b.poll() is None, b.communicate()
            return len(_lines(tmp_path / "b")) >= 20

        await until(b_wrote_the_rest, "audit B writes the new events", 30)
        b.send_signal(signal.SIGTERM)
        assert b.wait(30) == 0
        ids_a, ids_b = _lines(tmp_path / "a"), _lines(tmp_path / "b")
        assert ids_a == [f"{stream}:{s}" for s in first]
        assert ids_b == [f"{stream}:{s}" for s in second]  # each once, in order
    finally:
        kill_all(procs)
        await release(conn)


async def _zero(count: object) -> bool:
    n: int = await count()  # type: ignore[operator]
    return n == 0


def _webhook(url: str, namespace: str, target: str, secret: Path, host: str | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "botwire_stream", "consume", "webhook", "-n", namespace, "--match", "k*"]
    cmd += ["--to", target, "--secret-file", str(secret), "--attempts", "5", "--backoff", "2", "--url", url]
    if host is not None:
        cmd = ["unshare", "--user", "--map-root-user", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unshare --user --uts (a second hostname)")
async def test_a_webhook_stalled_in_its_backoff_and_taken_over_posts_nothing_more(
    url: str, namespace: str, tmp_path: Path
) -> None:
    """Webhook A (host qa10c-other) fails its first POST and is SIGSTOPped in the 2 s backoff;
    webhook B takes over and delivers the event; A, resumed, must not POST it again. Before: A's
    backoff ended and it POSTed the event a second time (delivered twice)."""
    from .test_consumers import _Receiver

    secret = tmp_path / "hook.key"
    secret.write_bytes(b"k3y")
    receiver = _Receiver(fail=1, secret=b"k3y")
    stream = f"KV_botwire_{namespace}"
    procs: list[subprocess.Popen[str]] = []
    try:
        async with AsyncMemory(namespace, url=url) as m:
            rev = await m.set("k1", 1)
        event = f"{stream}:{rev}"
        a = _webhook(url, namespace, receiver.url, secret, host="qa10c-other")
        procs.append(a)

        async def first_attempt() -> bool:
            assert a.poll() is None, a.communicate()
            return receiver.attempts.get(event, 0) >= 1

        await until(first_attempt, "webhook A's first (failed) POST", 60, every=0.005)
        sigstop(a.pid)  # in its 2 s backoff
        b = _webhook(url, namespace, receiver.url, secret)
        procs.append(b)

        async def delivered() -> bool:
            assert b.poll() is None, b.communicate()
            return len(receiver.delivered) >= 1

        await until(delivered, "webhook B to take over and deliver", 30)
        os.kill(a.pid, signal.SIGCONT)
        a.communicate(timeout=30)  # A finds its lease taken over and stops
        b.send_signal(signal.SIGTERM)
        assert b.wait(30) == 0
        assert [e["id"] for e in receiver.delivered] == [event]  # once
        assert receiver.attempts[event] == 2  # A's failed one, B's
        assert receiver.bad_signatures == 0
    finally:
        kill_all(procs)
        receiver.close()
