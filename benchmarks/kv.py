"""Key-value memory: ``Memory``/``AsyncMemory`` against raw nats-py KV (and redis-py) on the same run.

- ``kv-latency``: set/get p50/p99 of one ~200 B JSON value, plus throughput with 64 in flight.
- ``kv-rmw``: the seed's ``get`` / ``append`` / ``set`` of a chat history of 10, 100, 1000 messages.
- ``kv-list``: ``list_keys("user:42:*")`` among 10k and 100k keys, against ``kv.keys()``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from botwire_stream import AsyncMemory, Memory

from ._registry import Context, benchmark
from ._report import RESULT, Ratio, Table, verdict
from ._timing import Stats, interleave, time_async, time_sync

# A short chat history: the kind of value the seed keeps under "user:<id>:history".
VALUE: list[dict[str, str]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Will it rain in Paris tomorrow?"},
    {"role": "assistant", "content": "Light rain after 3 pm, around 14 C; take an umbrella."},
]
VALUE_BYTES = len(json.dumps(VALUE).encode())
ASYNC_TARGET = 1.2  # AsyncMemory p50 / raw nats-py p50
SYNC_TARGET = 1.5  # Memory (sync face) p50 / raw nats-py p50
SYNC_VS_ASYNC_TARGET = 1.3  # Memory (sync face) p50 / AsyncMemory p50: what the sync face adds
LIST_TARGET_MS = 20.0
GROWTH_TARGET = 1.5  # list_keys p50 at 100k keys / at 10k keys
LAT_COLUMNS = ["operation", "p50 µs", "p99 µs", "ops/s", "p50 vs raw", "target", RESULT]


def message(i: int) -> dict[str, str]:
    """One chat message of about 80 B of JSON."""
    role = "user" if i % 2 == 0 else "assistant"
    return {"role": role, "content": f"message {i}: tell me a bit more about that, please."}


async def _raw_kv(url: str, bucket: str) -> tuple[NATS, KeyValue]:
    """A nats-py connection and a KV bucket with the settings of ours (history 16, direct gets)."""
    nc = await nats.connect(url)
    kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=bucket, history=16, direct=True))
    return nc, kv


def _row(table: Table, label: str, s: Stats, base: Stats | None, limit: float | None) -> None:
    ratio = Ratio(s.p50 / base.p50) if base is not None else None
    target = f"<= {limit:.1f}x" if limit is not None else "-"
    result = verdict(ratio, limit) if limit is not None else ""
    table.add(label, s.p50, s.p99, s.ops_per_s, ratio, target, result)


# -- 1. set/get latency ----------------------------------------------------------------------------
@benchmark("kv-latency", "set/get p50/p99: AsyncMemory, Memory, raw nats-py KV, redis-py")
def kv_latency(ctx: Context) -> list[Table]:
    url = ctx.nats_url
    rounds, n, warm = ctx.pick((3, 200, 100), (8, 500, 300))
    nc, kv = ctx.run(_raw_kv(url, "bench_raw_lat"))
    amem = ctx.run(AsyncMemory("bench_async_lat", url=url).open())
    mem = Memory("bench_sync_lat", url=url)
    red = ctx.redis()
    try:

        async def raw_put() -> object:
            return await kv.put("lat.k", json.dumps(VALUE).encode())

        async def raw_get() -> object:
            entry = await kv.get("lat.k")
            assert entry.value is not None
            return json.loads(entry.value)

        def ours_put() -> Awaitable[object]:
            return amem.set("lat:k", VALUE)

        def ours_get() -> Awaitable[object]:
            return amem.get("lat:k")

        def sync_put() -> object:
            return mem.set("lat:k", VALUE)

        def sync_get() -> object:
            return mem.get("lat:k")

        def a(op: Callable[[], Awaitable[object]], k: int) -> Callable[[], list[int]]:
            return lambda: ctx.run(time_async(op, k))

        def s(op: Callable[[], object], k: int) -> Callable[[], list[int]]:
            return lambda: time_sync(op, k)

        phases: dict[str, dict[str, Callable[[int], Callable[[], list[int]]]]] = {
            "set": {"raw": lambda k: a(raw_put, k), "async": lambda k: a(ours_put, k), "sync": lambda k: s(sync_put, k)},
            "get": {"raw": lambda k: a(raw_get, k), "async": lambda k: a(ours_get, k), "sync": lambda k: s(sync_get, k)},
        }
        if red is not None:
            r = red
            phases["set"]["redis"] = lambda k: s(lambda: r.set("lat:k", json.dumps(VALUE)), k)
            phases["get"]["redis"] = lambda k: s(lambda: json.loads(r.get("lat:k")), k)  # type: ignore[arg-type]
        labels = {
            "set": {"raw": "raw nats-py kv.put (baseline)", "async": "AsyncMemory.set", "sync": "Memory.set (sync)",
                    "redis": "redis-py SET (reference)"},
            "get": {"raw": "raw nats-py kv.get (baseline)", "async": "AsyncMemory.get", "sync": "Memory.get (sync)",
                    "redis": "redis-py GET (reference)"},
        }
        limits = {"raw": None, "async": ASYNC_TARGET, "sync": SYNC_TARGET, "redis": None}

        table = Table(f"kv-latency: one {VALUE_BYTES} B JSON value, sequential ops", LAT_COLUMNS)
        for op, contenders in phases.items():
            for make in contenders.values():  # warm up connections, code paths and server caches
                make(warm)()
            samples = interleave(rounds, {name: make(n) for name, make in contenders.items()})
            stats = {name: Stats.of(v) for name, v in samples.items()}
            for name, st in stats.items():
                _row(table, f"{op}  {labels[op][name]}", st, stats["raw"], limits[name])
            _row(table, f"{op}  Memory.{op} vs AsyncMemory.{op}", stats["sync"], stats["async"], SYNC_VS_ASYNC_TARGET)
        table.notes.append(
            f"{rounds} interleaved rounds x {n} ops per client after {warm} warm-up ops; ratios are p50 / raw p50."
        )
        table.notes.append("raw nats-py and redis-py encode/decode with stdlib json; ours with msgspec.")
        table.notes.append("'Memory.x vs AsyncMemory.x': the sync face's p50 / the async core's (not raw) p50.")
        if red is None:
            table.notes.append(f"redis: skipped ({ctx.redis_skip})")
        return [table, _throughput(ctx, kv, amem)]
    finally:
        mem.close()
        ctx.run(amem.close())
        ctx.run(nc.close())
        if red is not None:
            red.close()


def _throughput(ctx: Context, kv: KeyValue, amem: AsyncMemory) -> Table:
    """Writes and reads with 64 in flight on one connection: where the client's per-call cost shows."""
    conc, per_worker, rounds = 64, ctx.pick(30, 100), ctx.pick(2, 3)
    total = conc * per_worker

    async def burst(op: Callable[[int], Awaitable[object]]) -> list[int]:
        async def worker(w: int) -> None:
            for _ in range(per_worker):
                await op(w)

        t0 = perf_counter_ns()
        await asyncio.gather(*(worker(w) for w in range(conc)))
        return [perf_counter_ns() - t0]

    data = json.dumps(VALUE).encode()

    async def raw_put(w: int) -> object:
        return await kv.put(f"tp.{w}", data)

    async def raw_get(w: int) -> object:
        entry = await kv.get(f"tp.{w}")
        assert entry.value is not None
        return json.loads(entry.value)

    async def ours_put(w: int) -> object:
        return await amem.set(f"tp:{w}", VALUE)

    async def ours_get(w: int) -> object:
        return await amem.get(f"tp:{w}")

    table = Table(
        f"kv-throughput: {conc} concurrent ops in flight on one connection",
        ["operation", "ops/s", "vs raw", "target", RESULT],
    )
    for op, raw, ours in (("set", raw_put, ours_put), ("get", raw_get, ours_get)):
        ctx.run(burst(raw))  # warm up (and, for get, make sure the keys exist)
        ctx.run(burst(ours))
        elapsed = interleave(rounds, {"raw": lambda f=raw: ctx.run(burst(f)), "ours": lambda f=ours: ctx.run(burst(f))})  # type: ignore[misc]
        rate = {k: total / (statistics.median(v) / 1e9) for k, v in elapsed.items()}
        table.add(f"{op}  raw nats-py kv.{'put' if op == 'set' else 'get'}", rate["raw"], Ratio(1.0), "-", "")
        table.add(f"{op}  AsyncMemory.{op}", rate["ours"], Ratio(rate["ours"] / rate["raw"]), "info", "")
    table.notes.append(f"{total} ops per burst, median of {rounds} interleaved bursts; 'vs raw' > 1 is faster.")
    return table


# -- 2. the seed's read-modify-write history pattern -----------------------------------------------
@benchmark("kv-rmw", "history get/append/set per message at 10/100/1000 messages, vs raw nats-py and redis-py")
def kv_rmw(ctx: Context) -> list[Table]:
    url = ctx.nats_url
    rounds, m = ctx.pick((2, 15), (5, 40))
    sizes = (10, 100, 1000)
    nc, kv = ctx.run(_raw_kv(url, "bench_raw_rmw"))
    mem = Memory("bench_sync_rmw", url=url)
    red = ctx.redis()
    new_msg = message(-1)
    table = Table(
        f"kv-rmw: history = get(k) or []; append; set(k, history) - time per appended message ({m} per round)",
        ["history size  client", "value KB", "p50 µs", "p99 µs", "msgs/s", "p50 vs raw", "target", RESULT],
    )
    try:
        for size in sizes:
            start = [message(i) for i in range(size)]
            kb = len(json.dumps(start).encode()) / 1024
            key, raw_key = f"rmw:{size}", f"rmw.{size}"

            def ours(k: int) -> list[int]:
                mem.set(key, start)
                out = []
                for _ in range(k):
                    t0 = perf_counter_ns()
                    history = mem.get(key) or []
                    history.append(new_msg)
                    mem.set(key, history)
                    out.append(perf_counter_ns() - t0)
                return out

            def add(history: Any) -> Any:
                history = history or []
                history.append(new_msg)
                return history

            def ours_update(k: int) -> list[int]:
                mem.set(key, start)
                return time_sync(lambda: mem.update(key, add), k)

            async def raw_batch(k: int) -> list[int]:
                await kv.put(raw_key, json.dumps(start).encode())
                out = []
                for _ in range(k):
                    t0 = perf_counter_ns()
                    entry = await kv.get(raw_key)
                    history = json.loads(entry.value) if entry.value else []
                    history.append(new_msg)
                    await kv.put(raw_key, json.dumps(history).encode())
                    out.append(perf_counter_ns() - t0)
                return out

            def raw(k: int) -> list[int]:
                return ctx.run(raw_batch(k))

            contenders: dict[str, Callable[[int], list[int]]] = {"raw": raw, "ours": ours, "update": ours_update}
            if red is not None:
                r = red

                def redis_rmw(k: int) -> list[int]:
                    r.set(key, json.dumps(start))
                    out = []
                    for _ in range(k):
                        t0 = perf_counter_ns()
                        got = r.get(key)
                        history = json.loads(got) if got else []
                        history.append(new_msg)
                        r.set(key, json.dumps(history))
                        out.append(perf_counter_ns() - t0)
                    return out

                contenders["redis"] = redis_rmw
            for fn in contenders.values():
                fn(3)  # warm up
            samples = interleave(rounds, {name: (lambda f=fn: f(m)) for name, fn in contenders.items()})  # type: ignore[misc]
            stats = {name: Stats.of(v) for name, v in samples.items()}
            base = stats["raw"]
            labels = {
                "raw": "raw nats-py get/json/put (baseline)",
                "ours": "Memory get/append/set (sync)",
                "update": "Memory.update (conditional write)",
                "redis": "redis-py GET/json/SET (reference)",
            }
            for name, st in stats.items():
                limit = SYNC_TARGET if name == "ours" else None
                ratio = Ratio(st.p50 / base.p50)
                table.add(
                    f"{size:>5}  {labels[name]}", kb, st.p50, st.p99, st.ops_per_s, ratio,
                    f"<= {limit:.1f}x" if limit else "-", verdict(ratio, limit) if limit else "",
                )
        table.notes.append(
            f"each round resets the history to its size, then appends {m} messages; {rounds} interleaved rounds."
        )
        table.notes.append("Memory.update re-reads and retries on a concurrent write (no lost updates); shown for cost.")
        if red is None:
            table.notes.append(f"redis: skipped ({ctx.redis_skip})")
        return [table]
    finally:
        mem.close()
        ctx.run(nc.close())
        if red is not None:
            red.close()


# -- 3. list_keys among many keys ------------------------------------------------------------------
async def _load(url: str, namespace: str, users: int, per_user: int) -> float:
    """Write ``users * per_user`` keys ``user:<u>:k<i>`` into ``namespace``, pipelined; return seconds."""
    mem = AsyncMemory(namespace, url=url)
    kv = await mem._connection()  # creates the namespace's stream; the NATS backend names it
    prefix, stream = kv.prefix, kv.stream  # type: ignore[attr-defined]
    await mem.close()
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(publish_async_max_pending=8000)
        t0 = perf_counter_ns()
        for u in range(users):
            for i in range(per_user):
                await js.publish_async(f"{prefix}user.{u}.k{i}", b"1")
        await asyncio.wait_for(js.publish_async_completed(), 120)
        elapsed = (perf_counter_ns() - t0) / 1e9
        stored = (await js.stream_info(stream)).state.messages
        if stored != users * per_user:
            raise RuntimeError(f"{namespace}: {stored} keys stored of {users * per_user}")
        return elapsed
    finally:
        await nc.close()


async def _naive_keys(url: str, bucket: str, prefix: str, runs: int) -> tuple[list[int], int]:
    """nats-py ``kv.keys()`` (a watch of every key) filtered by hand: the naive way to list."""
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(bucket)
        out, found = [], 0
        for _ in range(runs):
            t0 = perf_counter_ns()
            found = len([k for k in await kv.keys() if k.startswith(prefix)])
            out.append(perf_counter_ns() - t0)
        return out, found
    finally:
        await nc.close()


async def _watch_keys(url: str, bucket: str, subject: str, runs: int) -> tuple[list[int], int]:
    """nats-py ``kv.watch(filter, meta_only=True)`` drained: the best plain nats-py can do."""
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(bucket)
        out, found = [], 0
        for _ in range(runs):
            t0 = perf_counter_ns()
            watcher = await kv.watch(subject, meta_only=True, ignore_deletes=True)
            keys = []
            async for entry in watcher:
                if entry is None:
                    break
                keys.append(entry.key)
            await watcher.stop()  # type: ignore[no-untyped-call]
            out.append(perf_counter_ns() - t0)
            found = len(keys)
        return out, found
    finally:
        await nc.close()


@benchmark("kv-list", "list_keys('user:42:*') among 10k and 100k keys, vs nats-py kv.keys()")
def kv_list(ctx: Context) -> list[Table]:
    url = ctx.nats_url
    per_user = 100
    spaces = {10_000: "bench_keys_10k", 100_000: "bench_keys_100k"}
    pattern = "user:42:*"
    loaded = {}
    for total, ns in spaces.items():
        loaded[total] = ctx.run(_load(url, ns, total // per_user, per_user))
    mems = {total: Memory(ns, url=url) for total, ns in spaces.items()}
    try:
        for total, mem in mems.items():
            got = mem.list_keys(pattern)
            if len(got) != per_user:
                raise RuntimeError(f"list_keys({pattern!r}) at {total}: {len(got)} keys, expected {per_user}")
            time_sync(lambda m=mem: m.list_keys(pattern), ctx.pick(3, 5))  # type: ignore[misc]
        rounds, n = ctx.pick((3, 7), (6, 15))
        samples = interleave(
            rounds, {total: (lambda m=mem: time_sync(lambda: m.list_keys(pattern), n)) for total, mem in mems.items()}  # type: ignore[misc]
        )
    finally:
        for mem in mems.values():
            mem.close()
    ours = {total: Stats.of(v) for total, v in samples.items()}
    naive_runs = ctx.pick(1, 2)
    naive = {
        total: ctx.run(_naive_keys(url, f"botwire_{ns}", "user.42.", naive_runs)) for total, ns in spaces.items()
    }
    watch, watch_found = ctx.run(_watch_keys(url, "botwire_bench_keys_100k", "user.42.>", ctx.pick(3, 5)))

    table = Table(
        f"kv-list: list_keys({pattern!r}) -> {per_user} keys, among 10k and 100k keys",
        ["call", "keys total", "p50 ms", "p99 ms", "runs", "ratio", "target", RESULT],
    )
    small, big = ours[10_000], ours[100_000]
    table.add(f"Memory.list_keys({pattern!r})", 10_000, small.p50 / 1000, small.p99 / 1000, small.n, None, "-", "")
    table.add(
        f"Memory.list_keys({pattern!r})", 100_000, big.p50 / 1000, big.p99 / 1000, big.n, None,
        f"< {LIST_TARGET_MS:.0f} ms", "PASS" if big.p50 / 1000 < LIST_TARGET_MS else "MISS",
    )
    growth = Ratio(big.p50 / small.p50)
    table.add("growth: p50 at 100k / p50 at 10k", None, None, None, None, growth,
              f"<= {GROWTH_TARGET:.1f}x", verdict(growth, GROWTH_TARGET))
    for total, (runs, found) in naive.items():
        st = Stats.of(runs)
        if found != per_user:
            raise RuntimeError(f"kv.keys() found {found} keys of user 42 at {total}, expected {per_user}")
        table.add("nats-py kv.keys() + filter (naive)", total, st.p50 / 1000, st.p99 / 1000, st.n,
                  Ratio(st.p50 / ours[total].p50), "-", "")
    wst = Stats.of(watch)
    table.add("nats-py kv.watch('user.42.>') drained", 100_000, wst.p50 / 1000, wst.p99 / 1000, wst.n,
              Ratio(wst.p50 / big.p50), "-", "")
    if watch_found != per_user:
        table.notes.append(f"kv.watch found {watch_found} keys (expected {per_user})")
    table.notes.append("ratio: naive/reference rows are their p50 / list_keys p50 at the same size (>1: ours is faster).")
    table.notes.append(
        "loaded with js.publish_async: "
        + ", ".join(f"{t:,} keys in {s:.1f} s ({t / s:,.0f}/s)" for t, s in loaded.items())
        + f"; {rounds} interleaved rounds x {n} calls per size."
    )
    return [table]
