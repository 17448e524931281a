"""Conversation-log work done in child OS processes, for tests of what several processes share.

Run as ``python -m tests.chat_workers <command> <url> <namespace> <session id> ...`` from the
repository root. Each command prints one JSON document on its last stdout line. Commands that take
a ``go`` file connect first, print ``ready``, and wait for that file, so that the parent can
release many writers at the same moment.

The parent side is ``run`` (one process, to completion), ``run_together`` (several processes
released at once) and ``take`` (bounded reads from a blocking iterator).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0  # bound of every wait, in seconds


# -- parent side -----------------------------------------------------------------------------------
def _command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "tests.chat_workers", *args]


def run(*args: str, timeout: float = WAIT) -> Any:
    """Run one worker to completion and return the JSON it printed last."""
    proc = subprocess.run(
        _command(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise AssertionError(f"worker {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_together(commands: Sequence[Sequence[str]], go: Path, timeout: float = WAIT) -> list[Any]:
    """Start one worker per command, release them at once through ``go``, return their outputs."""
    procs = [
        subprocess.Popen(
            _command(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
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


# -- child side ------------------------------------------------------------------------------------
def _wait_for(go: str) -> None:
    print("ready", flush=True)
    deadline = time.monotonic() + WAIT
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("the go file never appeared")
        time.sleep(0.002)


async def _append(url: str, ns: str, sid: str, writer: str, n: int, tasks: int, go: str) -> list[list[Any]]:
    """``tasks`` concurrent writers ``<writer>.<t>``, each appending its ``i`` in order; [w, i, seq]."""
    from botwire_stream import AsyncChatHistory

    async with AsyncChatHistory(sid, namespace=ns, url=url) as chat:
        await asyncio.to_thread(_wait_for, go)

        async def lane(t: int) -> list[list[Any]]:
            w = f"{writer}.{t}"
            out: list[list[Any]] = []
            for i in range(n // tasks):
                out.append([w, i, await chat.append({"writer": w, "i": i})])
            return out

        lanes = await asyncio.wait_for(asyncio.gather(*(lane(t) for t in range(tasks))), WAIT)
    return [row for rows in lanes for row in rows]


async def _extend(
    url: str, ns: str, sid: str, writer: str, batches: int, size: int, tasks: int, go: str
) -> list[list[Any]]:
    """``tasks`` concurrent writers, each extending ``batches`` batches of ``size``; [w, [seqs]]."""
    from botwire_stream import AsyncChatHistory

    async with AsyncChatHistory(sid, namespace=ns, url=url) as chat:
        await asyncio.to_thread(_wait_for, go)

        async def lane(t: int) -> list[list[Any]]:
            w = f"{writer}.{t}"
            out: list[list[Any]] = []
            for b in range(batches // tasks):
                batch = [{"writer": w, "i": b * size + j} for j in range(size)]
                out.append([w, await chat.extend(batch)])
            return out

        lanes = await asyncio.wait_for(asyncio.gather(*(lane(t) for t in range(tasks))), WAIT)
    return [row for rows in lanes for row in rows]


def _write(url: str, ns: str, sid: str, messages: str) -> list[int]:
    """Append each message of the JSON list through the sync face; their sequences."""
    from botwire_stream import ChatHistory

    with ChatHistory(sid, namespace=ns, url=url) as chat:
        return [chat.append(m) for m in json.loads(messages)]


def main(argv: list[str]) -> Any:
    cmd, rest = argv[0], argv[1:]
    if cmd == "append":  # url ns sid writer n tasks go
        url, ns, sid, writer, n, tasks, go = rest
        return asyncio.run(_append(url, ns, sid, writer, int(n), int(tasks), go))
    if cmd == "extend":  # url ns sid writer batches size tasks go
        url, ns, sid, writer, batches, size, tasks, go = rest
        return asyncio.run(_extend(url, ns, sid, writer, int(batches), int(size), int(tasks), go))
    if cmd == "write":  # url ns sid json-list-of-messages
        url, ns, sid, messages = rest
        return _write(url, ns, sid, messages)
    raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
