"""Replay of a namespace (``areplay``): events per second from one process, against raw nats-py.

- ``replay-rate``: a namespace of N key writes and N chat messages (N = 500k: 1M events; quick:
  10k), replayed whole (keys and conversations merged by time, each event decoded with its time
  and origin), only its keys, and only its conversations; beside it, raw nats-py draining the same
  two streams with ordered consumers (no decoding), and the ceiling of a batch pull read in Python:
  the same streams pulled in batches of 10k onto a raw inbox (``botwire_stream.nats.rawsub``: nats-py's
  protocol parser, nothing else), messages only counted. Target: at least 100k events/s for the
  whole replay.
"""

from __future__ import annotations

import asyncio
from time import perf_counter

import msgspec
import nats
from nats.js.api import AckPolicy, ConsumerConfig

from botwire_stream import AsyncChatHistory, AsyncMemory, areplay
from botwire_stream.nats.rawsub import RawSubscription

from ._registry import Context, benchmark
from ._report import RESULT, Table

TARGET = 100_000  # events/s, one process


async def _fill(url: str, namespace: str, n: int) -> None:
    async with AsyncMemory(namespace, url=url) as m:
        for start in range(0, n, 500):
            await asyncio.gather(*(m.set(f"user:{i % 1000}:k{i}", {"i": i}) for i in range(start, min(n, start + 500))))
    sessions = [AsyncChatHistory(f"s{j}", namespace=namespace, url=url) for j in range(10)]
    try:
        for start in range(0, n, 1000):
            chat = sessions[(start // 1000) % len(sessions)]
            await chat.extend([{"role": "user", "content": f"message {i}"} for i in range(start, min(n, start + 1000))])
    finally:
        for chat in sessions:
            await chat.close()


async def _ours(url: str, namespace: str, **kw: str | None) -> tuple[int, float]:
    t = perf_counter()
    count = 0
    async for _ in areplay(namespace, url=url, timeout=30.0, **kw):  # type: ignore[arg-type]
        count += 1
    return count, perf_counter() - t


async def _raw(url: str, namespace: str) -> tuple[int, float]:
    """nats-py ordered consumers over both streams, messages counted, nothing decoded."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        t = perf_counter()
        count = 0
        for stream, subject in ((f"KV_botwire_{namespace}", f"$KV.botwire_{namespace}.>"),
                                (f"BOTWIRE_CHAT_{namespace}", f"botwire.{namespace}.>")):
            info = await js.stream_info(stream)
            total = info.state.messages
            done = asyncio.get_running_loop().create_future()
            seen = 0

            async def cb(_: object) -> None:
                nonlocal seen
                seen += 1
                if seen >= total and not done.done():
                    done.set_result(None)

            sub = await js.subscribe(subject, ordered_consumer=True, cb=cb)
            await asyncio.wait_for(done, 120)
            await sub.unsubscribe()
            count += seen
        return count, perf_counter() - t
    finally:
        await nc.close()


async def _pull_ceiling(url: str, namespace: str) -> tuple[int, float]:
    """Both streams pulled 10k at a time onto a raw inbox, each message only counted: what
    nats-py's parser delivers to Python at most (a replay decodes and builds events on top)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        t = perf_counter()
        count = 0
        for stream in (f"KV_botwire_{namespace}", f"BOTWIRE_CHAT_{namespace}"):
            info = await js.add_consumer(stream, ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=10.0))
            total = info.num_pending or 0
            seen = [0]
            ready = asyncio.Event()

            def sink(subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
                seen[0] += 1
                if seen[0] % 10_000 == 0 or seen[0] >= total:
                    ready.set()

            sub = await RawSubscription(nc, nc.new_inbox(), sink).start()
            asked = 0
            while seen[0] < total:
                if asked <= seen[0]:
                    want = min(10_000, total - asked)
                    req = msgspec.json.encode({"batch": want, "no_wait": True})
                    await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{info.name}", req, reply=sub.subject)
                    asked += want
                ready.clear()
                await asyncio.wait_for(ready.wait(), 30)
            await sub.stop()
            await js.delete_consumer(stream, info.name)
            count += seen[0]
        return count, perf_counter() - t
    finally:
        await nc.close()


@benchmark("replay-rate", "areplay events/s over a namespace of key writes and chat messages, vs raw nats-py")
def replay_rate(ctx: Context) -> list[Table]:
    url = ctx.nats_url
    n = ctx.pick(10_000, 500_000)
    namespace = "bench_replay"
    ctx.run(_fill(url, namespace, n))
    table = Table(
        f"replay-rate: {n} key writes + {n} chat messages, one process (best of 3)",
        ["replay", "events", "seconds", "events/s", "target", RESULT],
    )
    for label, kw in (
        ("areplay (keys + conversations)", {}),
        ("areplay keys only", {"conversations": None}),
        ("areplay conversations only", {"keys": None}),
    ):
        runs = [ctx.run(_ours(url, namespace, **kw)) for _ in range(3)]
        expect = n if kw else 2 * n
        short = [c for c, _ in runs if c != expect]
        if short:  # a replay that ends early is fast and wrong: never a figure (seen: 510k of 1M)
            raise AssertionError(f"{label}: {short} events instead of {expect}")
        count, seconds = min(runs, key=lambda r: r[1])
        rate = count / seconds
        whole = not kw
        table.add(label, count, seconds, rate, f">= {TARGET}" if whole else "-", ("PASS" if rate >= TARGET else "MISS") if whole else "")
    runs = [ctx.run(_raw(url, namespace)) for _ in range(3)]
    count, seconds = min(runs, key=lambda r: r[1])
    table.add("raw nats-py ordered consumers (no decoding)", count, seconds, count / seconds, "-", "")
    runs = [ctx.run(_pull_ceiling(url, namespace)) for _ in range(3)]
    count, seconds = min(runs, key=lambda r: r[1])
    table.add("batch pull, nats-py parser only (ceiling)", count, seconds, count / seconds, "-", "")
    return [table]
