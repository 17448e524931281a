"""HTTP API: ``botwire serve`` (one process) against the FastAPI + SQLite baseline of the hosted
product's design (``hosted_baseline.py``), in the same run, each driven by a separate load
generator process (``http_load.py``) on loopback.

``python -m benchmarks.http_api [--seconds 3] [--rounds 2]``. Rows: a small key's GET and PUT,
p50 with one connection (sequential requests), and requests/s with 32 connections. Targets
(issue 9): GET p50 under 2 ms and at least 3000 req/s from one serve process; at least 2x the
baseline's req/s on reads and on writes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks._server import NatsServer

ROOT = Path(__file__).resolve().parent.parent
VALUE = json.dumps({"value": "Ada Lovelace, prefers short answers"})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: exited\n{log.read_text()[-2000:]}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url}: no answer in 30 s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _load(port: int, method: str, path: str, conns: int, seconds: float) -> dict[str, float]:
    body = VALUE if method == "PUT" else ""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.http_load", "127.0.0.1", str(port), method, path, body, str(conns), str(seconds)],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60,
    )
    if out.returncode != 0:
        raise SystemExit(f"{method} {path} on port {port}: {out.stderr[-600:]}{out.stdout}")
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        nats = NatsServer(work / "nats").start()
        ours_port, base_port = _free_port(), _free_port()
        ours = _spawn([sys.executable, "-m", "botwire_stream", "serve", "--port", str(ours_port), "--url", nats.url], work / "serve.log")
        base = _spawn(
            [sys.executable, "-m", "uvicorn", "benchmarks.hosted_baseline:app", "--port", str(base_port), "--log-level", "warning", "--no-access-log"],
            work / "baseline.log", {"BASELINE_DB": str(work / "baseline.db")},
        )
        try:
            _wait(f"http://127.0.0.1:{ours_port}/healthz", ours, work / "serve.log")
            _wait(f"http://127.0.0.1:{base_port}/docs", base, work / "baseline.log")
            for port in (ours_port, base_port):
                httpx.put(f"http://127.0.0.1:{port}/memory/bench/k", content=VALUE, headers={"content-type": "application/json"}).raise_for_status()
            httpx.put(f"http://127.0.0.1:{ours_port}/v1/ns/bench/keys/k", content=VALUE, headers={"content-type": "application/json"}).raise_for_status()
            contenders = {
                "serve /v1 GET": (ours_port, "GET", "/v1/ns/bench/keys/k"),
                "serve /memory GET": (ours_port, "GET", "/memory/bench/k"),
                "baseline GET": (base_port, "GET", "/memory/bench/k"),
                "serve /v1 PUT": (ours_port, "PUT", "/v1/ns/bench/keys/k"),
                "serve /memory PUT": (ours_port, "PUT", "/memory/bench/k"),
                "baseline PUT": (base_port, "PUT", "/memory/bench/k"),
            }
            results: dict[str, dict[str, list[float]]] = {name: {"p50": [], "rps": []} for name in contenders}
            for r in range(args.rounds):
                order = list(contenders.items())
                order = order[r % len(order):] + order[: r % len(order)]
                for name, (port, method, path) in order:
                    results[name]["p50"].append(_load(port, method, path, 1, args.seconds)["p50_us"])
                    results[name]["rps"].append(_load(port, method, path, 32, args.seconds)["rps"])
            print(f"nats-server {nats.version}; {args.rounds} rounds of {args.seconds} s; median of rounds")
            print(f"{'contender':22} {'p50 ms (1 conn)':>16} {'req/s (32 conns)':>17}")
            med = {n: (sorted(v["p50"])[len(v["p50"]) // 2], sorted(v["rps"])[len(v["rps"]) // 2]) for n, v in results.items()}
            for name, (p50, rps) in med.items():
                print(f"{name:22} {p50 / 1000:16.2f} {rps:17.0f}")
            for op in ("GET", "PUT"):
                ratio = med[f"serve /memory {op}"][1] / med[f"baseline {op}"][1]
                print(f"serve /memory {op} req/s over baseline: {ratio:.1f}x (target >= 2x: {'PASS' if ratio >= 2 else 'MISS'})")
            p50, rps = med["serve /v1 GET"]
            print(f"serve /v1 GET p50 {p50 / 1000:.2f} ms (target < 2 ms: {'PASS' if p50 < 2000 else 'MISS'}), "
                  f"{rps:.0f} req/s (target >= 3000: {'PASS' if rps >= 3000 else 'MISS'})")
        except SystemExit:
            print("serve log:", (work / "serve.log").read_text()[-3000:], "baseline log:", (work / "baseline.log").read_text()[-3000:])
            raise
        finally:
            _stop(ours)
            _stop(base)
            nats.stop()


if __name__ == "__main__":
    main()
