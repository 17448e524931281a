"""Writers in child OS processes for tests/test_namespace_deleted.py: a namespace deleted by
another client while they write to it.

Run as ``python -m tests.deleted_workers <command> ...`` from the repository root (``procs``).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tests import procs


def main(argv: list[str]) -> Any:
    cmd, rest = argv[0], argv[1:]
    if cmd == "write":  # url ns tag n go -> [[j, sent, acked, appended_sent, appended_acked], ...]
        # Each write gets its own key (tag-j) and message ({"t": tag, "j": j}); the times are
        # time.monotonic() (one clock for every process of the machine), taken around each call.
        from botwire_stream import ChatHistory, Memory

        url, ns, tag, n, go = rest
        out = []
        with Memory(ns, url=url, timeout=5) as m, ChatHistory("c", namespace=ns, url=url, timeout=5) as h:
            m.get("x")  # connected, streams made, before the start signal
            len(h)
            procs.wait_for_go(go)
            for j in range(int(n)):
                s = time.monotonic()
                m.set(f"{tag}-{j}", j)
                a = time.monotonic()
                h.append({"t": tag, "j": j})
                out.append([j, s, a, a, time.monotonic()])
        return out
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    import json

    print(json.dumps(main(sys.argv[1:])), flush=True)
