"""``python -m chaos [--quick] [--only NAME ...]``: the fault scenarios at full size, with counts.

Scenarios (names for ``--only``): ``single`` (SIGKILL of a single server during 10,000
acknowledged appends), ``cluster`` (the stream leader of a 3-node cluster killed under load, then
the next one), ``lameduck`` (the same, each leader stopped in lame duck mode, as a deployment
stops a node), ``proxy`` (stalled and cut links), ``latency`` (p50/p99 of appends and sets on one
server and on a 3-replica cluster), ``durability`` (append rate of a server with JetStream's
default sync interval vs ``sync_interval: always``). Every figure is measured in this run, on
loopback; targets are printed beside them, not asserted. Exit status 1 when a write was lost or
stored twice.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chaos import scenarios  # noqa: E402
from tests.cluster import Cluster  # noqa: E402
from tests.servers import NatsServer  # noqa: E402

NAMES = ("single", "cluster", "lameduck", "proxy", "latency", "durability")


async def _durability(workdir: Path, n: int) -> dict[str, float]:
    """Sequential appends per second, default sync interval vs ``always`` (fsync every write)."""
    out: dict[str, float] = {}
    for mode in ("default", "always"):
        server = NatsServer(workdir / mode)
        server.start()
        if mode == "always":  # config file only (no CLI flag): rewrite the jetstream block
            conf = server.workdir / "nats.conf"
            conf.write_text(conf.read_text().replace("jetstream {", "jetstream { sync_interval: always,"))
            server.stop()
            server.proc, server.port = _restart(server, conf)
        try:
            lat = await scenarios.latency(server.url, n=n)
            out[f"{mode}_append_p50_ms"] = lat["append_p50_ms"]
            out[f"{mode}_append_p99_ms"] = lat["append_p99_ms"]
        finally:
            server.stop()
    return out


def _restart(server: NatsServer, conf: Path):  # type: ignore[no-untyped-def]
    from botwire_stream._natsproc import start
    from botwire_stream.nats.embedded import find_binary

    return start(find_binary(), conf, server.ports_dir, log=server.log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (as the tests)")
    parser.add_argument("--kills", type=int, default=2, help="leader kills in the cluster scenario (default 2)")
    parser.add_argument("--only", action="append", choices=NAMES, help="run only this scenario (repeatable)")
    args = parser.parse_args(argv)
    only = set(args.only or NAMES)
    quick = args.quick
    bad = 0
    with tempfile.TemporaryDirectory(prefix="botwire-chaos-") as tmp:
        work = Path(tmp)
        if "single" in only:
            c = asyncio.run(scenarios.single_kill(work / "single", total=1000 if quick else 10_000, kills=2 if quick else 5))
            print(c.line(), flush=True)
            bad += c.lost + c.duplicated
        if "proxy" in only:
            c = asyncio.run(scenarios.proxy_faults(work / "proxy", stall=0.5 if quick else 1.0, rounds=2 if quick else 5))
            print(c.line(), flush=True)
            bad += c.lost + c.duplicated
        if "cluster" in only or "latency" in only or "lameduck" in only:
            cluster = Cluster(work / "cluster").start()
            try:
                if "cluster" in only:
                    c = asyncio.run(scenarios.cluster_failover(cluster, steady=0.5 if quick else 2.0, kills=args.kills))
                    print(c.line(), flush=True)
                    print(
                        f"  failover: writes resumed {c.extra['resume_s']} s after each leader kill (target < 6 s); "
                        f"a survivor named a new leader after {c.extra['elected_s']} s (the servers' Raft "
                        f"election), the client's own share {c.extra['client_s']} s"
                    )
                    bad += c.lost + c.duplicated
                if "lameduck" in only:
                    cluster.wait_healthy()
                    c = asyncio.run(
                        scenarios.cluster_failover(cluster, steady=0.5 if quick else 2.0, kills=args.kills, lame_duck=True)
                    )
                    print(c.line(), flush=True)
                    print(f"  lame duck stop: writes resumed {c.extra['resume_s']} s after each (target < 6 s)")
                    bad += c.lost + c.duplicated
                if "latency" in only:
                    cluster.wait_healthy()
                    n = 500 if quick else 5000
                    r3 = asyncio.run(scenarios.latency(cluster.url, n=n))
                    single = NatsServer(work / "r1").start()
                    try:
                        r1 = asyncio.run(scenarios.latency(single.url, n=n))
                    finally:
                        single.stop()
                    print(f"latency, {n} sequential calls, loopback: 1 server (R1) {r1}")
                    print(f"latency, 3-node cluster (R3) {r3} (target: append p99 < 2 ms)")
            finally:
                cluster.stop()
        if "durability" in only:
            t = time.monotonic()
            d = asyncio.run(_durability(work / "sync", 500 if quick else 3000))
            print(f"durability: sequential append latency, default sync interval vs sync_interval: always: {d} "
                  f"({time.monotonic() - t:.0f} s)")
    print("zero acknowledged writes lost or stored twice" if bad == 0 else f"FAILED: {bad} writes lost or stored twice")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
