"""Child processes that write chunked values to the same keys at the same moments, for the race
tests of ``tests/test_blobs.py``.

``python -m tests.blob_workers <role> <url> <namespace> <prefix> <trials> <size> <sync-dir>``:
for each trial ``i`` the process meets its peer at a file barrier in ``sync-dir``, waits a random
0-``jitter`` ms (so that either may go first) and then ``set``s ``<prefix><i>`` to a value of about
``size`` bytes (role ``a``/``b``) or deletes it (role ``del``). Prints the revisions (or delete
results) as JSON.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from tests.procs import WAIT, wait_for_go


def value_of(role: str, trial: int, size: int) -> dict[str, Any]:
    """The value ``role`` writes in ``trial`` (the parent rebuilds it to compare)."""
    return {"writer": role, "trial": trial, "pad": role * size}


def _barrier(sync: Path, role: str, peer: str, trial: int) -> None:
    (sync / f"{role}.{trial}").touch()
    deadline = time.monotonic() + WAIT
    while not (sync / f"{peer}.{trial}").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"peer {peer} never reached trial {trial}")
        time.sleep(0.001)


def main(argv: list[str]) -> list[Any]:
    role, url, ns, prefix, trials, size, sync_dir, peer, jitter = argv
    from botwire_stream import Memory

    out: list[Any] = []
    rng = random.Random(os.getpid())
    with Memory(ns, url=url) as memory:
        memory.get(prefix)  # connect before the start signal
        wait_for_go(str(Path(sync_dir) / "go"))
        for i in range(int(trials)):
            _barrier(Path(sync_dir), role, peer, i)
            time.sleep(rng.uniform(0, float(jitter)) / 1000)
            key = f"{prefix}{i}"
            if role == "del":
                out.append(memory.delete(key))
            else:
                out.append(memory.set(key, value_of(role, i, int(size))))
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
