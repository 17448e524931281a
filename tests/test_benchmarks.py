"""The benchmark suite stays runnable: every module of ``benchmarks/`` imports, ``python -m
benchmarks --list`` lists them, and neither writes a file into the working directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_module_imports_and_is_listed(tmp_path: Path) -> None:
    # One fresh interpreter in an empty directory: imports every module (as the runner does) and
    # lists what they registered; a stale import or a file written on import shows here.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--list"],
        cwd=tmp_path,
        env={**_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    listed = proc.stdout
    for name in ("chat-last", "chat-turn", "cold-start", "kv-list"):
        assert f"{name} " in listed, listed
    assert list(tmp_path.iterdir()) == [], "importing the benchmarks wrote files into the working directory"


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
