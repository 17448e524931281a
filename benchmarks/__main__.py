"""``python -m benchmarks [--quick] [--only NAME] [--json PATH] [--list]``: run the suite, print tables.

Every figure is measured in this run, against baselines measured in this run on the same
servers, so the ratios stay meaningful on a noisy machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent


def discover() -> list[str]:
    """Import every public module of the package (each registers its benchmarks); return the broken ones."""
    broken = []
    for info in sorted(pkgutil.iter_modules([str(PACKAGE_DIR)]), key=lambda m: m.name):
        if not info.name.startswith("_"):
            try:
                importlib.import_module(f"benchmarks.{info.name}")
            except Exception:  # a broken module must not stop the others from running
                traceback.print_exc()
                broken.append(f"benchmarks/{info.name}.py (import)")
    return broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the botwire-stream benchmarks: figures and ratios against baselines measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and samples: a smoke run (< 1 min)")
    parser.add_argument(
        "--only", action="append", metavar="NAME",
        help="run only this benchmark or module (e.g. kv-list, kv, cold-start); repeatable, or comma-separated; "
        "chaos alone runs the fault scenarios (python -m chaos)",
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON to PATH")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)

    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    if args.only and {w.strip() for item in args.only for w in item.split(",")} == {"chaos"}:
        # The fault scenarios' counts (issue 12): `python -m chaos`, not in the default run (minutes).
        from chaos.__main__ import main as chaos_main

        return chaos_main(["--quick"] if args.quick else [])
    from benchmarks._registry import REGISTRY, Context

    broken = discover()
    if args.list:
        for b in REGISTRY.values():
            print(f"{b.name:<16} [{b.group}] {b.help}")
        return 1 if broken else 0  # a module that no longer imports fails the listing (tests/test_benchmarks.py)
    selected = list(REGISTRY.values())
    if args.only:
        wanted = {w.strip() for item in args.only for w in item.split(",") if w.strip()}
        unknown = wanted - {b.name for b in selected} - {b.group for b in selected}
        if unknown:
            parser.error(f"unknown benchmark(s) {sorted(unknown)}; --list shows them")
        selected = [b for b in selected if b.name in wanted or b.group in wanted]

    mode = "quick" if args.quick else "full"
    print(f"botwire-stream benchmarks ({mode}): python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    ctx = Context(quick=args.quick, project_root=PROJECT_ROOT)
    results: list[dict[str, Any]] = []
    verdicts: list[tuple[str, str, str]] = []
    failed: list[str] = list(broken)
    started = time.monotonic()
    try:
        for b in selected:
            print(f"\n# {b.name}: {b.help}", flush=True)
            t0 = time.monotonic()
            try:
                tables = b.fn(ctx)
            except Exception:  # one broken benchmark must not hide the others' figures
                traceback.print_exc()
                failed.append(b.name)
                continue
            for table in tables:
                print(table.render(), flush=True)
                verdicts += [(b.name, label, v) for label, v in table.verdicts()]
            print(f"({b.name}: {time.monotonic() - t0:.1f} s)", flush=True)
            results.append({"name": b.name, "seconds": round(time.monotonic() - t0, 2),
                            "tables": [t.to_json() for t in tables]})
        versions = ctx.versions()
    finally:
        ctx.close()

    elapsed = time.monotonic() - started
    misses = [v for v in verdicts if v[2] == "MISS"]
    print(f"\n== summary: {len(verdicts) - len(misses)} PASS, {len(misses)} MISS"
          + (f", {len(failed)} FAILED ({', '.join(failed)})" if failed else "")
          + f" in {elapsed:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    for name, label, _ in misses:
        print(f"   MISS  {name}: {label}")
    if args.json:
        doc = {
            "mode": mode,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions,
            "cpus": os.cpu_count(),
            "seconds": round(elapsed, 1),
            "benchmarks": results,
            "failed": failed,
            "verdicts": [{"benchmark": n, "row": label, "result": v} for n, label, v in verdicts],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
