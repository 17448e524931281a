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
import sys
from pathlib import Path
from typing import Any

from tests import procs

_WAIT = procs.WAIT


# -- parent side -----------------------------------------------------------------------------------
def run(*args: str, timeout: float = _WAIT) -> Any:
    """Run one worker to completion and return the JSON it printed last."""
    return procs.run("tests.workers", args, timeout)


def run_together(n: int, go: Path, *args: str, timeout: float = _WAIT) -> list[Any]:
    """Start ``n`` workers, release them at once through the ``go`` file, return their outputs."""
    return procs.run_together("tests.workers", [args] * n, go, timeout)


take = procs.take


# -- child side ------------------------------------------------------------------------------------
_wait_for = procs.wait_for_go


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
        from botwire_stream.nats import embedded

        _wait_for(go)
        state, _token = embedded.ensure()
        return state.pid
    if cmd == "open":  # ns go -> pid of the embedded server, after a write through Memory
        ns, go = rest
        from botwire_stream import Memory
        from botwire_stream.nats import embedded

        _wait_for(go)
        with Memory(ns) as m:
            m.set(f"pid:{os.getpid()}", os.getpid())
        running = embedded.status()
        return None if running is None else running.pid
    raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
