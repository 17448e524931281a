"""Work done in child OS processes, for tests of what several processes see of one namespace.

Run as ``python -m tests.workers <command> <url> ...`` from the repository root; ``<url>`` is a NATS
URL, or ``-`` for the embedded server of the inherited ``BOTWIRE_HOME``. Each command prints one
JSON document on its last stdout line. Commands that take a ``go`` file print ``ready`` first and
wait for that file to exist, so the parent can release many processes at the same moment.

The parent side is ``run`` (one process, to completion) and ``run_together`` (N processes
released at once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
_WAIT = 60.0  # bound of every wait, in seconds


# -- parent side -----------------------------------------------------------------------------------
def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.workers", *args]


def run(*args: str, timeout: float = _WAIT) -> Any:
    """Run one worker to completion and return the JSON it printed last."""
    proc = subprocess.run(
        _command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise AssertionError(f"worker {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_together(n: int, go: Path, *args: str, timeout: float = _WAIT) -> list[Any]:
    """Start ``n`` workers, release them at once through the ``go`` file, return their outputs."""
    procs = [
        subprocess.Popen(
            _command(*args),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise AssertionError(f"worker did not get ready: {line!r} {p.stderr.read() if p.stderr else ''}")
        go.touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise AssertionError(f"worker {args} failed ({p.returncode}):\n{err[-4000:]}")
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
    deadline = time.monotonic() + _WAIT
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("the go file never appeared")
        time.sleep(0.002)


def _memory(url: str, namespace: str) -> Any:
    from botwire_stream import Memory

    return Memory(namespace) if url == "-" else Memory(namespace, url=url)


def _incr(value: int) -> int:
    return value + 1


def main(argv: list[str]) -> Any:
    cmd, rest = argv[0], argv[1:]
    if cmd == "set":  # url ns key json-value -> revision
        url, ns, key, value = rest
        with _memory(url, ns) as m:
            return m.set(key, json.loads(value))
    if cmd == "get":  # url ns key -> {"found": bool, "value": ...}
        url, ns, key = rest
        with _memory(url, ns) as m:
            marker = object()
            value = m.get(key, marker)
            return {"found": value is not marker, "value": None if value is marker else value}
    if cmd == "ops":  # url ns json-list of ["set", key, value] / ["delete", key] -> revisions
        url, ns, ops = rest
        out = []
        with _memory(url, ns) as m:
            for op in json.loads(ops):
                if op[0] == "set":
                    out.append(m.set(op[1], op[2]))
                else:
                    out.append(m.delete(op[1]))
        return out
    if cmd == "incr":  # url ns key n go -> the values this process wrote
        url, ns, key, n, go = rest
        with _memory(url, ns) as m:
            m.get(key)  # connect and create the bucket before the start signal
            _wait_for(go)
            return [m.update(key, _incr, default=0) for _ in range(int(n))]
    if cmd == "ensure":  # go -> pid of the embedded server this process got
        (go,) = rest
        from botwire_stream import embedded

        _wait_for(go)
        state, _token = embedded.ensure()
        return state.pid
    if cmd == "open":  # ns go -> pid of the embedded server, after a write through Memory
        ns, go = rest
        from botwire_stream import Memory, embedded

        _wait_for(go)
        with Memory(ns) as m:
            m.set(f"pid:{os.getpid()}", os.getpid())
        running = embedded.status()
        return None if running is None else running.pid
    raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
