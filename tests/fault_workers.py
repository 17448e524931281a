"""Child side of the fault tests: work that runs while the parent kills and restarts the server.

``python -m tests.fault_workers incr <url> <namespace> <key> <stop> <go>`` increments ``key`` with
``update`` until the file ``stop`` exists (at most 40 s) and prints, as JSON, how many calls
succeeded, how many raised ``OutcomeUnknown`` and how many raised another ``ServerUnavailable``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from tests import procs


def _incr(value: int) -> int:
    return value + 1


def main(argv: list[str]) -> Any:
    cmd, url, ns, key, stop, go = argv
    if cmd != "incr":
        raise SystemExit(f"unknown command {cmd!r}")
    from botwire_stream import Memory
    from botwire_stream.errors import OutcomeUnknown, ServerUnavailable

    ok = unknown = failed = 0
    with Memory(ns, url=url, timeout=5) as m:
        m.get(key)  # connect and create the bucket before the start signal
        procs.wait_for_go(go)
        deadline = time.monotonic() + 40
        while not os.path.exists(stop) and time.monotonic() < deadline:
            try:
                m.update(key, _incr, default=0)
                ok += 1
            except OutcomeUnknown:
                unknown += 1  # stored once or not at all
            except ServerUnavailable:
                failed += 1  # not sent: nothing stored
    return {"ok": ok, "unknown": unknown, "failed": failed}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
