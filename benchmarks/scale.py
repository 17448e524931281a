"""Listings among many interleaved keys, and the read cache against redis-py (issue 13).

- ``kv-list-interleaved``: ``list_keys("user:42:*")`` -> 100 keys written interleaved with every
  other user's (key ``i`` of every user, then key ``i + 1``...), among 100k and 1M keys; against
  the previous way (a headers-only consumer over the pattern, which pays the span of the log).
- ``sessions-interleaved``: ``ChatHistory.sessions("tenant:42:*")`` -> 10 conversations among
  100k, written interleaved.
- ``kv-cache``: a repeated ``get`` with ``cache=True`` against one without and redis-py ``GET``,
  in the same run; and how soon a write by another process is seen by a cached reader.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from time import perf_counter_ns

import nats

from botwire_stream import AsyncChatHistory, AsyncMemory, Memory

from ._registry import Context, benchmark
from ._report import RESULT, Ratio, Table, verdict
from ._timing import Stats, interleave, time_async, time_sync

LIST_TARGET_MS = 5.0
GROWTH_TARGET = 1.5
CACHE_TARGET = 0.1  # cached get p50 / redis-py GET p50
VALUE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Will it rain in Paris tomorrow?"},
    {"role": "assistant", "content": "Light rain after 3 pm, around 14 C; take an umbrella."},
]


async def _publish(url: str, subjects: list[str], body: bytes) -> float:
    """Publish ``body`` on each subject, in order, pipelined; seconds taken."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(publish_async_max_pending=8000)
        t0 = perf_counter_ns()
        for subject in subjects:
            await js.publish_async(subject, body)
        await asyncio.wait_for(js.publish_async_completed(), 600)
        return (perf_counter_ns() - t0) / 1e9
    finally:
        await nc.close()


async def _load_keys(url: str, namespace: str, total: int, per_user: int) -> float:
    mem = AsyncMemory(namespace, url=url)
    prefix = (await mem._connection()).prefix  # type: ignore[attr-defined]
    await mem.close()
    users = total // per_user
    # key i of every user, then key i + 1: user 42's keys are spread evenly over the whole log
    subjects = [f"{prefix}user.{u}.k{i}" for i in range(per_user) for u in range(users)]
    return await _publish(url, subjects, b"1")


async def _consumer_list(mem: AsyncMemory, pattern: str) -> int:
    """The previous ``list_keys``: every kept revision under the pattern, by one consumer."""
    kv = await mem._connection()
    msgs = await kv.conn.pull_headers(kv.stream, kv.prefix + "user.42.>", last_per_subject=False)  # type: ignore[attr-defined]
    return len({m.subject for m in msgs})


@benchmark("kv-list-interleaved", "list_keys('user:42:*') -> 100 keys spread among 100k and 1M keys")
def kv_list_interleaved(ctx: Context) -> list[Table]:
    url, per_user, pattern = ctx.nats_url, 100, "user:42:*"
    sizes = ctx.pick([100_000], [100_000, 1_000_000])
    loaded = {n: ctx.run(_load_keys(url, f"bench_ilv_{n}", n, per_user)) for n in sizes}
    mems = {n: Memory(f"bench_ilv_{n}", url=url) for n in sizes}
    amems = {n: ctx.run(AsyncMemory(f"bench_ilv_{n}", url=url).open()) for n in sizes}
    try:
        for n, mem in mems.items():
            got = mem.list_keys(pattern)
            if len(got) != per_user:
                raise RuntimeError(f"list_keys at {n}: {len(got)} keys, expected {per_user}")
            time_sync(lambda m=mem: m.list_keys(pattern), 5)  # type: ignore[misc]
        rounds, k = ctx.pick((3, 7), (6, 15))
        samples = interleave(rounds, {n: (lambda m=mem: time_sync(lambda: m.list_keys(pattern), k)) for n, mem in mems.items()})  # type: ignore[misc]
        old = {
            n: ctx.run(time_async(lambda a=am: _consumer_list(a, pattern), ctx.pick(2, 3)))  # type: ignore[misc]
            for n, am in amems.items()
        }
    finally:
        for mem in mems.values():
            mem.close()
        for am in amems.values():
            ctx.run(am.close())
    table = Table(
        f"kv-list-interleaved: list_keys({pattern!r}) -> {per_user} keys spread evenly among all keys",
        ["call", "keys total", "p50 ms", "p99 ms", "runs", "ratio", "target", RESULT],
    )
    ours = {n: Stats.of(v) for n, v in samples.items()}
    for n, st in ours.items():
        table.add(f"Memory.list_keys({pattern!r})", n, st.p50 / 1000, st.p99 / 1000, st.n, None,
                  f"< {LIST_TARGET_MS:.0f} ms", "PASS" if st.p50 / 1000 < LIST_TARGET_MS else "MISS")
    if len(ours) > 1:
        growth = Ratio(ours[sizes[-1]].p50 / ours[sizes[0]].p50)
        table.add(f"growth: p50 at {sizes[-1]:,} / at {sizes[0]:,}", None, None, None, None, growth,
                  f"<= {GROWTH_TARGET:.1f}x", verdict(growth, GROWTH_TARGET))
    for n, runs in old.items():
        st = Stats.of(runs)
        table.add("previous: a consumer over user.42.> (headers)", n, st.p50 / 1000, st.p99 / 1000, st.n,
                  Ratio(st.p50 / ours[n].p50), "-", "")
    table.notes.append("ratio: the previous way's p50 / list_keys p50 at the same size (>1: list_keys is faster).")
    table.notes.append("loaded with js.publish_async: " + ", ".join(f"{n:,} keys in {s:.1f} s" for n, s in loaded.items()))
    return [table]


@benchmark("sessions-interleaved", "sessions('tenant:42:*') -> 10 conversations among 100k")
def sessions_interleaved(ctx: Context) -> list[Table]:
    url, ns, tenants, per_tenant = ctx.nats_url, "bench_sess_ilv", 10_000, 10
    total = tenants * per_tenant

    async def load() -> float:
        chat = AsyncChatHistory("probe", namespace=ns, url=url)
        prefix = (await chat._connection()).subject[: -len("probe")]  # type: ignore[attr-defined]
        await chat.close()
        subjects = [f"{prefix}tenant.{t}.c{i}" for i in range(per_tenant) for t in range(tenants)]
        return await _publish(url, subjects, json.dumps({"role": "user", "content": "hi"}).encode())

    seconds = ctx.run(load())

    async def page() -> object:
        got = await AsyncChatHistory.sessions(ns, "tenant:42:*", limit=100, url=url)
        if len(got) != per_tenant:
            raise RuntimeError(f"sessions: {len(got)} conversations, expected {per_tenant}")
        return got

    ctx.run(time_async(page, 5))
    st = Stats.of(ctx.run(time_async(page, ctx.pick(20, 60))))
    table = Table(
        f"sessions-interleaved: sessions('tenant:42:*') -> {per_tenant} conversations among {total:,}",
        ["call", "conversations", "p50 ms", "p99 ms", "runs", "target", RESULT],
    )
    table.add("AsyncChatHistory.sessions (one call: connect from the pool, count, multi-last)", total,
              st.p50 / 1000, st.p99 / 1000, st.n, f"< {LIST_TARGET_MS:.0f} ms",
              "PASS" if st.p50 / 1000 < LIST_TARGET_MS else "MISS")
    table.notes.append(f"loaded {total:,} one-message conversations interleaved, in {seconds:.1f} s.")
    return [table]


_WRITER = """
import json, sys, time
from botwire_stream import Memory
url, ns, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
acked = []
with Memory(ns, url=url) as m:
    m.set("lag", -1)
    time.sleep(0.5)
    for i in range(n):
        m.set("lag", i)
        acked.append(time.monotonic_ns())  # CLOCK_MONOTONIC: the same clock in every process
        time.sleep(0.01)
print(json.dumps(acked))
"""


def _lag(ctx: Context, url: str, ns: str, n: int) -> list[int]:
    """Nanoseconds from another process's acknowledged write to a cached reader's first read
    of it (the reader polls every 0.1 ms, releasing the GIL between reads, as an app would);
    negative when the reader saw it before the writer had its acknowledgement."""
    with Memory(ns, url=url, cache=True) as m:
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, url, ns, str(n)], cwd=ctx.project_root, stdout=subprocess.PIPE, text=True
        )
        try:
            seen: dict[int, int] = {}
            deadline = time.monotonic() + 120
            while n - 1 not in seen and time.monotonic() < deadline:
                v = m.get("lag")
                if isinstance(v, int) and v >= 0 and v not in seen:
                    seen[v] = time.monotonic_ns()
                time.sleep(0.0001)
            out, _ = writer.communicate(timeout=30)
            acked = json.loads(out.strip().splitlines()[-1])
            return [seen[i] - acked[i] for i in sorted(seen)]
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()


@benchmark("kv-cache", "repeated get with cache=True vs without vs redis-py GET; another process's write seen")
def kv_cache(ctx: Context) -> list[Table]:
    url = ctx.nats_url
    rounds, n, warm = ctx.pick((3, 500, 200), (8, 2000, 500))
    cached = Memory("bench_cache", url=url, cache=True)
    plain = Memory("bench_cache", url=url)
    acached = ctx.run(AsyncMemory("bench_cache", url=url, cache=True).open())
    red = ctx.redis()
    try:
        plain.set("hot", VALUE)
        contenders = {
            "cached": lambda k: time_sync(lambda: cached.get("hot"), k),
            "async": lambda k: ctx.run(time_async(lambda: acached.get("hot"), k)),
            "plain": lambda k: time_sync(lambda: plain.get("hot"), k),
        }
        if red is not None:
            r = red
            r.set("hot", json.dumps(VALUE))
            contenders["redis"] = lambda k: time_sync(lambda: json.loads(r.get("hot")), k)  # type: ignore[arg-type]
        for fn in contenders.values():
            fn(warm)
        if cached.get("hot") != VALUE:
            raise RuntimeError("the cached get read another value")
        samples = interleave(rounds, {name: (lambda f=fn: f(n)) for name, fn in contenders.items()})  # type: ignore[misc]
    finally:
        cached.close()
        plain.close()
        ctx.run(acached.close())
        if red is not None:
            red.close()
    stats = {name: Stats.of(v) for name, v in samples.items()}
    table = Table(
        f"kv-cache: a repeated get of one {len(json.dumps(VALUE))} B JSON value",
        ["operation", "p50 µs", "p99 µs", "ops/s", "vs redis GET", "target", RESULT],
    )
    labels = {"cached": "Memory.get, cache=True (sync face)", "async": "AsyncMemory.get, cache=True",
              "plain": "Memory.get, no cache", "redis": "redis-py GET + json.loads (reference)"}
    base = stats.get("redis")
    for name, st in stats.items():
        ratio = Ratio(st.p50 / base.p50) if base is not None else None
        target = f"<= {CACHE_TARGET:g}x" if name == "cached" and base is not None else "-"
        result = verdict(ratio, CACHE_TARGET) if name == "cached" and ratio is not None else ""
        table.add(labels[name], st.p50, st.p99, st.ops_per_s, ratio, target, result)
    lag = Stats.of(_lag(ctx, url, "bench_cache_lag", ctx.pick(100, 400)))
    table.add("another process's write seen by a cached reader", lag.p50, lag.p99, None, None, "-", "")
    table.notes.append(f"{rounds} interleaved rounds x {n} gets after {warm} warm-up gets; ours decode with msgspec.")
    table.notes.append(f"seen: {lag.n} writes, from the writer's acknowledgement to the reader's first read of it "
                       "(polling every 0.1 ms).")
    if red is None:
        table.notes.append(f"redis: skipped ({ctx.redis_skip})")
    return [table]
