"""Child side of ``tests/test_qa_faults.py``: writes while the parent stalls the server.

``python -m tests.qa_fault_workers <cmd> <url> <namespace> <name> <stop> <go>`` runs ``cmd`` with
``timeout=1`` until the file ``stop`` exists (at most 30 s) and prints JSON:

- ``incr``: ``update`` of key ``counter``: how many returned, raised ``OutcomeUnknown`` or another
  ``ServerUnavailable``;
- ``append``: appends ``{"w": name, "i": i}`` to conversation ``c``, alternating with 2-message
  ``extend``s: the acknowledged ``[seq, i]`` pairs and the ``i`` that raised ``OutcomeUnknown``.
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
    cmd, url, ns, name, stop, go = argv
    from botwire_stream import ChatHistory, Memory
    from botwire_stream.errors import OutcomeUnknown, ServerUnavailable

    deadline = time.monotonic() + 30
    if cmd == "incr":
        ok = unknown = failed = 0
        with Memory(ns, url=url, timeout=1) as m:
            m.get("counter")  # connect and create the bucket before the start signal
            procs.wait_for_go(go)
            while not os.path.exists(stop) and time.monotonic() < deadline:
                try:
                    m.update("counter", _incr, default=0)
                    ok += 1
                except OutcomeUnknown:
                    unknown += 1
                except ServerUnavailable:
                    failed += 1
        return {"ok": ok, "unknown": unknown, "failed": failed}
    if cmd == "append":
        acked: list[list[int]] = []
        unknown_i: list[int] = []
        failed_i: list[int] = []
        with ChatHistory("c", namespace=ns, url=url, timeout=1) as chat:
            len(chat)
            procs.wait_for_go(go)
            i = 0
            while not os.path.exists(stop) and time.monotonic() < deadline:
                batch = [i] if i % 3 else [i, i + 1]
                try:
                    if len(batch) == 1:
                        acked.append([chat.append({"w": name, "i": i}), i])
                    else:
                        seqs = chat.extend([{"w": name, "i": j} for j in batch])
                        acked.extend([s, j] for s, j in zip(seqs, batch, strict=True))
                except OutcomeUnknown:
                    unknown_i.extend(batch)
                except ServerUnavailable:
                    failed_i.extend(batch)
                i += len(batch)
        return {"acked": acked, "unknown": unknown_i, "failed": failed_i}
    raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
