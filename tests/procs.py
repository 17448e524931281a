"""Parent and child helpers for tests that run work in separate OS processes.

A worker module (``tests.workers``, ``tests.chat_workers``) is run as
``python -m <module> <command> ...`` from the repository root and prints one JSON document on its
last stdout line. Workers that take a ``go`` file print ``ready`` and wait for it, so that the
parent can release many of them at the same moment. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from botwire_stream.nats.embedded import ServerState

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0  # bound of every wait, in seconds


def run(module: str, args: Sequence[str], timeout: float = WAIT) -> Any:
    """Run one worker to completion and return the JSON it printed last."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise AssertionError(f"worker {list(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_together(module: str, commands: Sequence[Sequence[str]], go: Path, timeout: float = WAIT) -> list[Any]:
    """Start one worker per command, release them at once through ``go``, return their outputs."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for args in commands
    ]
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            assert p.stdout is not None
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = p.stdout.readline() if ready else "(nothing within the timeout)"
            if line.strip() != "ready":
                err = p.stderr.read() if p.stderr else ""
                raise AssertionError(f"worker did not get ready: {line!r}\n{err[-4000:]}")
        go.touch()
        results = []
        for p, args in zip(procs, commands, strict=True):
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise AssertionError(f"worker {list(args)} failed ({p.returncode}):\n{err[-4000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


def take(iterator: Iterator[T], n: int, timeout: float = 20.0) -> list[T]:
    """The next ``n`` items of a blocking iterator (a sync watch), failing after ``timeout`` s."""
    items: list[T] = []
    failure: list[BaseException] = []

    def pull() -> None:
        try:
            for _ in range(n):
                items.append(next(iterator))
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            failure.append(exc)

    thread = threading.Thread(target=pull, daemon=True)
    thread.start()
    thread.join(timeout)
    if failure:
        raise failure[0]
    if thread.is_alive():
        raise AssertionError(f"only {len(items)} of {n} items within {timeout} s: {items}")
    return items


def wait_for_go(go: str) -> None:
    """Child side: say ``ready``, then wait (bounded) until the parent creates ``go``."""
    print("ready", flush=True)
    deadline = time.monotonic() + WAIT
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("the go file never appeared")
        time.sleep(0.002)


def _interruptible() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps
    # an inherited SIG_IGN: give the child the default disposition, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def watching(*args: str) -> Iterator[subprocess.Popen[str]]:
    """A ``botwire watch`` subprocess, yielded once its subscription is live; killed on exit if
    still running (the test communicates with it to see it end by itself)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "watch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_interruptible,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        ready = proc.stderr.readline()  # printed once the subscription is live
        assert "watching" in ready, ready + proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def commanded(argv: Sequence[str]) -> Iterator[subprocess.Popen[str]]:
    """A child (``argv``, run from the repository root) that prints ``ready``, then takes commands
    on stdin until it is closed; yielded once ready, then given 20 s to end by itself, else killed."""
    proc = subprocess.Popen(list(argv), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def holding(port: int) -> Iterator[None]:
    """Keep ``port`` bound (after its server was killed), so that a restart must pick another."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                holder.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline, f"port {port} stayed busy"
                time.sleep(0.05)
        holder.listen()
        yield


def kill_all(procs: Sequence[subprocess.Popen[Any]]) -> None:
    """Kill each of ``procs`` (children of this test) still running, resumed first in case it was
    SIGSTOPped, and reap it."""
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.wait(30)


def consumer(kind: str, namespace: str, *extra: str) -> subprocess.Popen[bytes]:
    """A ``botwire consume <kind> -n <namespace>`` worker on the embedded server (stderr kept for
    failures); the caller kills it (``kill_all``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "consume", kind, "-n", namespace, *extra],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def consumer_handled(proc: subprocess.Popen[bytes], conn: Any, kind: str, namespace: str, count: int) -> bool:
    """Whether the running ``consumer`` ``proc`` acknowledged every message of the namespace's
    conversation log, and, for the materialiser, conversation ``s``'s summary counts ``count``
    (read through ``conn``, a pool connection)."""
    import msgspec

    from botwire_stream import keys
    from botwire_stream.nats import materialised as mat
    from consumers.runtime import status

    assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
    done = [
        s.pending == 0 and s.ack_pending == 0 and s.ack_floor == s.stream_last
        for s in await status()
        if s.name == f"botwire-{kind}" and s.stream == f"BOTWIRE_CHAT_{namespace}"
    ]
    if done != [True]:
        return False
    if kind == "audit":
        return True
    subject = mat.summary_subject(namespace, keys.encode_key("s"))
    last = await conn.direct_get_last(mat.mat_stream(namespace), subject, 5.0)
    return last is not None and msgspec.json.decode(last.data, type=mat.Summary).message_count == count


def kill_embedded(home: Path) -> ServerState:
    """SIGKILL the embedded server of ``home`` (one this test's process started) and wait until
    its state no longer names it; its state before (``embedded.status``)."""
    from botwire_stream.nats import embedded

    state = embedded.status(home)
    assert state is not None
    os.kill(state.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (now := embedded.status(home)) is not None and now.pid == state.pid:  # a zombie counts as gone
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return state
