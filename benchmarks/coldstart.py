"""Cold start: a fresh process's first ``Memory(...)``, with and without a running embedded server.

Each run is a new Python subprocess with a fresh ``BOTWIRE_HOME`` (so no embedded server runs
yet); the times are taken inside the subprocess, import included, interpreter start-up excluded.
The server that run started is left running for a second subprocess (the "server running" case)
and then stopped with ``botwire_stream.nats.embedded.stop(home)``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

from botwire_stream.nats import embedded

from ._registry import Context, benchmark
from ._report import RESULT, Table

COLD_TARGET_MS = 300.0
WARM_TARGET_MS = 50.0

FIRST_USE = """
import time
t = time.perf_counter()
from botwire_stream import Memory
t_import = time.perf_counter() - t
m = Memory("x")
m.set("k", 1)
print(t_import, time.perf_counter() - t)
"""
IMPORT_ONLY = "import time; t = time.perf_counter(); import botwire_stream; print(0.0, time.perf_counter() - t)"


def _env(ctx: Context, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOTWIRE_")}
    if "BOTWIRE_NATS_SERVER" in os.environ:
        env["BOTWIRE_NATS_SERVER"] = os.environ["BOTWIRE_NATS_SERVER"]
    env["BOTWIRE_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ctx.project_root), os.environ.get("PYTHONPATH")) if p)
    # Time imports as an installed package has them: from cached bytecode. This environment may
    # forbid writing bytecode next to the sources; a private cache folder works either way.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(ctx.tmp / "pycache"))
    return env


def _run(ctx: Context, script: str, home: Path) -> tuple[float, float]:
    """Run ``script`` in a fresh interpreter; return its (import, total) times in ms."""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(ctx, home),
        cwd=ctx.tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start subprocess failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    t_import, total = (float(x) * 1000 for x in proc.stdout.split())
    return t_import, total


@benchmark("cold-start", "first Memory() in a fresh process: starting the embedded server / connecting to it")
def cold_start(ctx: Context) -> list[Table]:
    runs = ctx.pick(3, 5)
    root = ctx.tmp / "cold"
    times: dict[str, list[float]] = {k: [] for k in ("import", "cold", "cold_after_import", "warm", "warm_after_import")}
    for i in range(runs + 1):  # run 0 warms the bytecode cache and the OS file cache: not counted
        home = root / f"home{i}"
        try:
            _, t_import = _run(ctx, IMPORT_ONLY, home)
            imp_cold, cold = _run(ctx, FIRST_USE, home)
            if embedded.status(home) is None:
                raise RuntimeError("the first Memory() left no embedded server running")
            imp_warm, warm = _run(ctx, FIRST_USE, home)
        finally:
            embedded.stop(home)
        if i == 0:
            continue
        times["import"].append(t_import)
        times["cold"].append(cold)
        times["cold_after_import"].append(cold - imp_cold)
        times["warm"].append(warm)
        times["warm_after_import"].append(warm - imp_warm)

    table = Table(
        "cold-start: fresh process, times measured inside it (interpreter start-up excluded)",
        ["scenario", "median ms", "min ms", "max ms", "runs", "target", RESULT],
    )

    def add(label: str, key: str, target: float | None) -> None:
        v = times[key]
        med = statistics.median(v)
        result = ("PASS" if med < target else "MISS") if target is not None else ""
        table.add(label, med, min(v), max(v), len(v), f"< {target:.0f} ms" if target else "-", result)

    add("import botwire_stream", "import", None)
    add("first Memory() + set, starts the server (import incl.)", "cold", COLD_TARGET_MS)
    add("  of which after the import", "cold_after_import", None)
    add("Memory() + set, server already running (import incl.)", "warm", None)
    add("  of which after the import: connecting", "warm_after_import", WARM_TARGET_MS)
    table.notes.append(
        f"{runs} runs after one unmeasured run; each run has a fresh BOTWIRE_HOME, its server stopped afterwards."
    )
    table.notes.append(
        "the 50 ms target is for connecting to a running server; the import (mostly nats-py and asyncio) is shown apart."
    )
    table.notes.append(
        "bytecode is cached (PYTHONPYCACHEPREFIX in the run's temp folder) as for an installed package."
    )
    return [table]

