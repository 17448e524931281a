"""Reads on a 3-node cluster: how often another connection reads an older state right after an
acknowledged write (``?reads=any``, the default) against ``?reads=leader``, and what the leader
costs in latency.

A local cluster (``tests/cluster.py``: three nats-server processes on loopback) is started in the
run's temporary folder. The writer is connected to the stream leader's node, the readers to a
follower (whose own replica answers its direct gets: NATS prefers a local queue subscriber), in
the same process and loop, so the read starts right after the ack. ``--quick`` runs fewer rounds.
"""

from __future__ import annotations

import subprocess
import sys
from time import perf_counter_ns

from benchmarks._registry import Context, benchmark
from benchmarks._report import Table
from benchmarks._timing import Stats
from botwire_stream import AsyncChatHistory, AsyncMemory
from botwire_stream.nats.chatlog import stream_name
from tests.cluster import Cluster, stream_info


def _burners(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` CPU-bound processes, so that replicas lag as on a loaded host."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


async def _nodes(cluster: Cluster, stream: str) -> tuple[str, str]:
    """The URLs of the stream leader's node and of a follower."""
    leader = (await stream_info(cluster.url, stream))["cluster"]["leader"]
    follower = next(n for n in cluster.nodes if n.name != leader)
    return cluster.node(leader).url, follower.url


async def stale_rounds(cluster: Cluster, namespace: str, rounds: int, reads: str) -> dict[str, int]:
    """``rounds`` of: the writer ``set``s a key / appends to a conversation and, once acknowledged,
    a reader on another connection reads it. Returns how many reads returned an older state."""
    kv_stream, chat_stream = f"KV_botwire_{namespace}", stream_name(namespace)
    async with (
        AsyncMemory(namespace, url=cluster.url, timeout=30) as mem,
        AsyncChatHistory("bench", namespace=namespace, url=cluster.url, timeout=30) as h,
    ):
        await mem.set("k", -1)
        await h.append({"i": -1})
    kv_leader, kv_follower = await _nodes(cluster, kv_stream)
    chat_leader, chat_follower = await _nodes(cluster, chat_stream)
    stale = {"get": 0, "messages(last=1)": 0, "count()": 0, "list_keys": 0}
    option = "" if reads == "any" else f"?reads={reads}"  # the default spelled out nowhere: runs on older code too
    async with (
        AsyncMemory(namespace, url=kv_leader, timeout=30) as writer,
        AsyncMemory(namespace, url=kv_follower + option, timeout=30) as reader,
        AsyncChatHistory("bench", namespace=namespace, url=chat_leader, timeout=30) as cw,
        AsyncChatHistory("bench", namespace=namespace, url=chat_follower + option, timeout=30) as cr,
    ):
        n = await cw.count()
        for i in range(rounds):
            await writer.set("k", i)
            if await reader.get("k") != i:
                stale["get"] += 1
            await writer.set(f"new{i}", i)
            if f"new{i}" not in await reader.list_keys("new*"):
                stale["list_keys"] += 1
            await cw.append({"i": i})
            n += 1
            got = await cr.messages(last=1)
            if not got or got[-1] != {"i": i}:
                stale["messages(last=1)"] += 1
            await cw.append({"i": i, "again": True})
            n += 1
            if await cr.count() != n:
                stale["count()"] += 1
    return stale


async def latencies(cluster: Cluster, namespace: str, n: int) -> dict[str, dict[str, Stats]]:
    """p50/p99 of ``get`` and ``messages(last=10)`` on a follower, per ``reads`` mode, interleaved."""
    async with (
        AsyncMemory(namespace, url=cluster.url, timeout=30) as mem,
        AsyncChatHistory("lat", namespace=namespace, url=cluster.url, timeout=30) as h,
    ):
        await mem.set("k", {"v": "x" * 200})
        await h.extend([{"role": "user", "content": "x" * 200} for _ in range(50)])
    _, kv_follower = await _nodes(cluster, f"KV_botwire_{namespace}")
    _, chat_follower = await _nodes(cluster, stream_name(namespace))
    samples: dict[str, dict[str, list[int]]] = {
        m: {"get": [], "messages(last=10)": [], "count()": []} for m in ("any", "leader")
    }
    clients: dict[str, tuple[AsyncMemory, AsyncChatHistory]] = {}
    try:
        for mode in ("any", "leader"):
            mem = await AsyncMemory(namespace, url=f"{kv_follower}?reads={mode}", timeout=30).open()
            chat = await AsyncChatHistory(
                "lat", namespace=namespace, url=f"{chat_follower}?reads={mode}", timeout=30
            ).open()
            clients[mode] = (mem, chat)
        for i in range(2 * n):
            mode = ("any", "leader")[i % 2]
            mem, chat = clients[mode]
            t0 = perf_counter_ns()
            await mem.get("k")
            t1 = perf_counter_ns()
            await chat.messages(last=10)
            t2 = perf_counter_ns()
            await chat.count()
            t3 = perf_counter_ns()
            if i >= 100:  # warmed up
                samples[mode]["get"].append(t1 - t0)
                samples[mode]["messages(last=10)"].append(t2 - t1)
                samples[mode]["count()"].append(t3 - t2)
    finally:
        for mem, chat in clients.values():
            await mem.close()
            await chat.close()
    return {mode: {op: Stats.of(s) for op, s in ops.items()} for mode, ops in samples.items()}


@benchmark(
    "cluster-reads",
    "another connection's read right after an acknowledged write: stale reads and latency, reads=any vs reads=leader",
)
def cluster_reads(ctx: Context) -> list[Table]:
    rounds, n, burn = ctx.pick((100, 300, 3), (400, 2000, 3))
    cluster = Cluster(ctx.tmp / "cluster-reads").start()
    try:
        stale = Table(
            f"cluster-reads: reads through another connection right after an acknowledged write "
            f"({rounds} rounds each, {burn} CPU burners, reader on a follower)",
            ["reads=", "get", "list_keys", "messages(last=1)", "count()"],
        )
        burners = _burners(burn)
        try:
            for mode in ("any", "leader"):
                found = ctx.run(stale_rounds(cluster, f"bench_stale_{mode}", rounds, mode))
                stale.add(mode, *(f"{found[k]}/{rounds}" for k in ("get", "list_keys", "messages(last=1)", "count()")))
        finally:
            for p in burners:
                p.kill()
                p.wait()
        lat = Table(
            f"cluster-reads: read latency on a follower, no CPU burners ({n} of each, interleaved), µs",
            ["op", "reads=any p50", "p99", "reads=leader p50", "p99"],
        )
        stats = ctx.run(latencies(cluster, "bench_lat", n))
        for op in ("get", "messages(last=10)", "count()"):
            a, b = stats["any"][op], stats["leader"][op]
            lat.add(op, a.p50, a.p99, b.p50, b.p99)
        return [stale, lat]
    finally:
        cluster.stop()
