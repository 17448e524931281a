"""Durable Streams over HTTP: ``botwire serve`` against the Node reference server in the same run.

``streams-http`` starts, on 127.0.0.1 and free ports, the reference server
(``@durable-streams/server`` 0.3.7, file store: fdatasync and LMDB ``putSync`` on every append)
and two ``botwire serve`` processes: one on a nats-server with ``sync_interval: always`` (fsync
before every ack: the reference's durability) and one on the suite's default nats-server (the ack
comes once the write is in the OS: nothing is lost when a process dies, up to the last sync
interval when the machine does). ``streams_driver.mjs`` loads them all with Node's global fetch
(undici, keep-alive), interleaved in rounds, with ~200-byte JSON messages:

- sequential append: p50/p99 per POST and appends/s; targets: p50 below the reference's, rate at
  least **2x** (for the fsync'ed server, same durability);
- catch-up of a 1,000-message stream (``GET ?offset=-1`` until up-to-date, ``JSON.parse``):
  p50 below the reference's;
- live delivery to a long-poll reader at the tail (POST start to the reader's receipt), 5 ms
  apart: p50 below the reference's;
- SSE fan-out: 1,000 concurrent readers of one stream on one serve process, 20 appends 50 ms
  apart: readers that got every chunk, delivery p50/p99, the serve process's memory (VmRSS).

Needs ``node`` and the npm packages, found where ``tests/test_conformance.py`` installs them
(``BOTWIRE_DS_SUITE``, else ``~/.cache/botwire-ds-suite``); skipped with a note without them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from botwire_stream._natsproc import render_config, start
from botwire_stream.nats.embedded import find_binary

from ._registry import Context, benchmark
from ._report import RESULT, Ratio, Table, verdict

DRIVER = Path(__file__).with_name("streams_driver.mjs")
RATE_TARGET = 2.0  # our appends/s / the reference's, at least


def _suite_folder() -> Path:
    given = os.environ.get("BOTWIRE_DS_SUITE")
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "botwire-ds-suite"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, bound: float = 30.0) -> None:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited; see {log}")
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers (404 for a missing stream)
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {bound} s; see {log}")


def _spawn(args: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


@benchmark("streams-http", "Durable Streams over HTTP: botwire serve vs the Node reference server (file store)")
def streams_http(ctx: Context) -> list[Table]:
    folder = _suite_folder()
    node = shutil.which("node")
    reference = folder / "node_modules" / "@durable-streams" / "server"
    if node is None or not reference.exists():
        why = "node is not installed" if node is None else f"@durable-streams/server is not installed in {folder}"
        table = Table("streams-http", ["figure"], notes=[f"skipped: {why} (see tests/test_conformance.py)"])
        return [table]

    procs: list[subprocess.Popen[bytes]] = []
    try:
        # a nats-server that fsyncs every write before its ack
        sync_dir = ctx.tmp / "nats-sync"
        (sync_dir / "store").mkdir(parents=True, exist_ok=True)
        (sync_dir / "ports").mkdir(parents=True, exist_ok=True)
        conf = render_config(port=-1, ports_dir=sync_dir / "ports", store_dir=sync_dir / "store")
        conf = conf.replace("jetstream {", "jetstream { sync_interval: always,")
        (sync_dir / "nats.conf").write_text(conf)
        sync_proc, sync_port = start(find_binary(), sync_dir / "nats.conf", sync_dir / "ports", log=sync_dir / "nats.log")
        procs.append(sync_proc)

        servers: dict[str, str] = {}
        pids: dict[str, int] = {}
        ref_port = _free_port()
        ref_log = ctx.tmp / "ds-reference.log"
        script = (
            'import { DurableStreamTestServer as S } from "@durable-streams/server"; '
            f'await new S({{ host: "127.0.0.1", port: {ref_port}, dataDir: {json.dumps(str(ctx.tmp / "ds-data"))}, '
            "longPollTimeout: 30000 }).start()"
        )
        procs.append(_spawn([node, "--input-type=module", "-e", script], ref_log, cwd=folder))
        servers["reference (file store)"] = f"http://127.0.0.1:{ref_port}"
        pids["reference (file store)"] = procs[-1].pid
        for label, nats_url in (
            ("botwire serve (fsync each write)", f"nats://127.0.0.1:{sync_port}"),
            ("botwire serve (default sync)", ctx.nats_url),
        ):
            port = _free_port()
            args = [sys.executable, "-m", "botwire_stream", "serve", "--port", str(port), "--url", nats_url,
                    "--long-poll-timeout", "30"]
            procs.append(_spawn(args, ctx.tmp / f"serve-{port}.log", cwd=ctx.project_root))
            servers[label] = f"http://127.0.0.1:{port}"
            pids[label] = procs[-1].pid
        for label, base in servers.items():
            _wait_http(f"{base}/v1/stream/__ready__", procs[list(servers).index(label) + 1], ctx.tmp)

        cfg = {
            "servers": servers,
            "appends": ctx.pick(400, 2000),
            "warmup": ctx.pick(30, 100),
            "catchupMsgs": 1000,
            "catchupReads": ctx.pick(5, 20),
            "liveMsgs": ctx.pick(50, 200),
            "sseReaders": ctx.pick(100, 1000),
            "sseChunks": ctx.pick(5, 20),
        }
        run = subprocess.run([node, str(DRIVER), json.dumps(cfg)], cwd=folder, capture_output=True, text=True,
                             timeout=900)
        if run.returncode != 0:
            raise RuntimeError(f"streams_driver.mjs failed:\n{run.stderr[-3000:]}")
        data: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
        rss = {label: _rss_mb(pid) for label, pid in pids.items()}
    finally:
        for proc in reversed(procs):
            _stop(proc)

    ref = data["reference (file store)"]
    ref_append = _pct(ref["append"], 50)
    ref_rate = sum(n for n, _ in ref["appendWall"]) / sum(ms for _, ms in ref["appendWall"]) * 1000
    ref_catch, ref_live = _pct(ref["catchup"], 50), _pct(ref["live"], 50)

    appends = Table("streams-http: sequential append (one POST, ~200 B JSON)",
                    ["server", "p50 ms", "p99 ms", "appends/s", "rate vs ref", "target", RESULT])
    reads = Table("streams-http: catch-up of 1,000 messages and live long-poll delivery",
                  ["server", "catch-up p50 ms", "live p50 ms", "live p99 ms", "target", RESULT])
    fanout = Table(f"streams-http: {cfg['sseReaders']} SSE readers of one stream, {cfg['sseChunks']} appends",
                   ["server", "complete readers", "delivery p50 ms", "delivery p99 ms", "server RSS MB"])
    for label, v in data.items():
        p50 = _pct(v["append"], 50)
        rate = sum(n for n, _ in v["appendWall"]) / sum(ms for _, ms in v["appendWall"]) * 1000
        catch, live = _pct(v["catchup"], 50), _pct(v["live"], 50)
        if label.startswith("reference"):
            appends.add(label, p50, _pct(v["append"], 99), rate, None, "", "")
            reads.add(label, catch, live, _pct(v["live"], 99), "", "")
        else:
            ok = p50 < ref_append and rate >= RATE_TARGET * ref_rate
            appends.add(label, p50, _pct(v["append"], 99), rate, Ratio(rate / ref_rate),
                        f"p50 < ref, >= {RATE_TARGET:g}x", "PASS" if ok else "MISS")
            worst = max(catch / ref_catch, live / ref_live)
            reads.add(label, catch, live, _pct(v["live"], 99), "both < ref", verdict(worst, 0.999))
        s = v.get("sse")
        if s:
            fanout.add(label, f"{s['complete']}/{s['readers']}", _pct(s["lat"], 50) if s["lat"] else None,
                       _pct(s["lat"], 99) if s["lat"] else None, rss.get(label))
    appends.notes.append("durability: the reference and 'fsync each write' fsync before the ack; 'default sync' "
                         "acks once the write is in the OS (a process crash loses nothing)")
    return [appends, reads, fanout]
