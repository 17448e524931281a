"""LangGraph checkpoints: ``BotWireSaver`` against LangGraph's SQLite checkpointer, same machine.

- ``langgraph-checkpoint``: ``put`` (a step's checkpoint, ~2 KB of messages, child of the last)
  and ``get_tuple`` (the thread's latest, with its writes) p50/p99, sequential: the sync faces
  (``BotWireSaver`` vs ``SqliteSaver``) and the async ones (vs ``AsyncSqliteSaver``). Target: p50
  within **2x** of SQLite.
- ``langgraph-checkpoint-4-writers``: four processes each putting checkpoints (a step: ``put`` +
  ``put_writes``) on their own threads at once, into one namespace / one SQLite file (WAL, as
  ``SqliteSaver`` sets it up). Per-step p50 and the steps per second of all four. Target: faster
  than SQLite (higher steps/s).

Needs ``pip install -e '.[bench,langgraph]'`` (langgraph-checkpoint-sqlite is in the bench extra).
Run alone: ``python -m benchmarks --only langgraph_checkpoints``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from time import perf_counter_ns
from typing import Any

from ._registry import Context, benchmark
from ._report import RESULT, Ratio, Table, verdict
from ._timing import Stats, interleave, time_async, time_sync

TARGET = 2.0  # BotWireSaver p50 / SQLite p50
WRITERS = 4
ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["operation", "p50 µs", "p99 µs", "p50 vs sqlite", "target", RESULT]


def _messages(n: int = 10) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "ai", "content": f"message {i}: " + "x" * 180} for i in range(n)]


def _checkpoint(step: int) -> Any:
    from langgraph.checkpoint.base import empty_checkpoint

    cp = empty_checkpoint()
    cp["channel_values"] = {"messages": _messages(), "step": step}
    cp["channel_versions"] = {"messages": step + 1, "step": step + 1}
    return cp


class _Thread:
    """A thread that grows one checkpoint per ``put``, each the child of the one before."""

    def __init__(self, name: str) -> None:
        self.config: dict[str, Any] = {"configurable": {"thread_id": name, "checkpoint_ns": ""}}
        self.step = 0

    def next(self) -> tuple[Any, Any, Any, Any]:
        self.step += 1
        return self.config, _checkpoint(self.step), {"source": "loop", "step": self.step}, {"messages": self.step}

    def stored(self, config: Any) -> None:
        self.config = config


def _sync_pair(saver: Any, name: str, n: int) -> tuple[Any, Any]:
    thread = _Thread(name)
    saver.put(*thread.next())  # the first checkpoint, so that get_tuple finds one

    def put() -> list[int]:
        out = []
        for _ in range(n):
            args = thread.next()
            t0 = perf_counter_ns()
            config = saver.put(*args)
            out.append(perf_counter_ns() - t0)
            thread.stored(config)
        return out

    def get() -> list[int]:
        latest = {"configurable": {"thread_id": name, "checkpoint_ns": ""}}
        return time_sync(lambda: saver.get_tuple(latest), n)

    return put, get


def _async_pair(ctx: Context, saver: Any, name: str, n: int) -> tuple[Any, Any]:
    thread = _Thread(name)
    ctx.run(saver.aput(*thread.next()))

    async def aput() -> list[int]:
        out = []
        for _ in range(n):
            args = thread.next()
            t0 = perf_counter_ns()
            config = await saver.aput(*args)
            out.append(perf_counter_ns() - t0)
            thread.stored(config)
        return out

    latest = {"configurable": {"thread_id": name, "checkpoint_ns": ""}}
    return (lambda: ctx.run(aput())), (lambda: ctx.run(time_async(lambda: saver.aget_tuple(latest), n)))


def _row(table: Table, label: str, s: Stats, base: Stats | None) -> None:
    if base is None:
        table.add(label, s.p50, s.p99, None, "-", "")
        return
    ratio = Ratio(s.p50 / base.p50)
    table.add(label, s.p50, s.p99, ratio, f"<= {TARGET:.1f}x", verdict(ratio, TARGET))


@benchmark("langgraph-checkpoint", "BotWireSaver put/get_tuple p50 vs LangGraph's SQLite checkpointer")
def latency(ctx: Context) -> list[Table]:
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from botwire_stream.integrations.langgraph import BotWireSaver

    n, rounds = ctx.pick((50, 3), (200, 6))
    ns = "bench" + uuid.uuid4().hex[:8]
    ours = BotWireSaver(ns, url=ctx.nats_url)
    aours = BotWireSaver(ns, url=ctx.nats_url)
    lite = SqliteSaver(sqlite3.connect(ctx.tmp / "sync.sqlite", check_same_thread=False))
    lite.setup()

    async def open_alite() -> Any:
        import aiosqlite

        conn = await aiosqlite.connect(ctx.tmp / "async.sqlite")
        saver = AsyncSqliteSaver(conn)
        await saver.setup()
        return saver

    alite = ctx.run(open_alite())
    ours_put, ours_get = _sync_pair(ours, "sync", n)
    lite_put, lite_get = _sync_pair(lite, "sync", n)
    aours_put, aours_get = _async_pair(ctx, aours, "async", n)
    alite_put, alite_get = _async_pair(ctx, alite, "async", n)
    for warm in (ours_put, ours_get, lite_put, lite_get, aours_put, aours_get, alite_put, alite_get):
        warm()
    s = {
        k: Stats.of(v)
        for k, v in interleave(
            rounds,
            {
                "put": ours_put,
                "get": ours_get,
                "lite put": lite_put,
                "lite get": lite_get,
                "aput": aours_put,
                "aget": aours_get,
                "alite put": alite_put,
                "alite get": alite_get,
            },
        ).items()
    }
    table = Table(f"LangGraph checkpoints: put / get_tuple (latest), ~2 KB state, {n * rounds} samples each", COLUMNS)
    _row(table, "SqliteSaver.put", s["lite put"], None)
    _row(table, "BotWireSaver.put (sync)", s["put"], s["lite put"])
    _row(table, "SqliteSaver.get_tuple", s["lite get"], None)
    _row(table, "BotWireSaver.get_tuple (sync)", s["get"], s["lite get"])
    _row(table, "AsyncSqliteSaver.aput", s["alite put"], None)
    _row(table, "BotWireSaver.aput", s["aput"], s["alite put"])
    _row(table, "AsyncSqliteSaver.aget_tuple", s["alite get"], None)
    _row(table, "BotWireSaver.aget_tuple", s["aget"], s["alite get"])
    table.notes.append("SQLite: a local file (WAL, LangGraph's setup); ours: nats-server on 127.0.0.1 (a network hop)")
    ours.close()
    ctx.run(aours.aclose())
    ctx.run(alite.conn.close())
    lite.conn.close()
    return [table]


# -- four writer processes -----------------------------------------------------------------------
def _writer(kind: str, where: str, thread: str, steps: int, go: str) -> dict[str, Any]:
    """One writer process: ``steps`` steps (put + put_writes) on its own thread, once ``go`` exists."""
    if kind == "botwire":
        from botwire_stream.integrations.langgraph import BotWireSaver

        url, ns = where.split(" ")
        saver: Any = BotWireSaver(ns, url=url)
    else:
        import sqlite3

        from langgraph.checkpoint.sqlite import SqliteSaver

        conn = sqlite3.connect(where, check_same_thread=False, timeout=30)
        saver = SqliteSaver(conn)
        saver.setup()
    t = _Thread(thread)
    t.stored(saver.put(*t.next()))  # connected and warm
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.001)
    samples = []
    start = time.perf_counter()
    for i in range(steps):
        args = t.next()
        t0 = perf_counter_ns()
        config = saver.put(*args)
        saver.put_writes(config, [("messages", _messages(1)), ("step", i)], f"task-{i}")
        samples.append(perf_counter_ns() - t0)
        t.stored(config)
    return {"samples": samples, "seconds": time.perf_counter() - start}


def _run_writers(ctx: Context, kind: str, where: str, steps: int) -> tuple[list[int], float]:
    go = ctx.tmp / f"go-{kind}-{uuid.uuid4().hex[:6]}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.langgraph_checkpoints",
                kind,
                where,
                f"w{i}-{go.name}",
                str(steps),
                str(go),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for i in range(WRITERS)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {kind} writer did not start")
        t0 = time.perf_counter()
        go.touch()
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=300)
            outs.append(json.loads(out.strip().splitlines()[-1]))
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [x for o in outs for x in o["samples"]], WRITERS * steps / wall


@benchmark("langgraph-checkpoint-4-writers", "BotWireSaver vs SQLite with four processes writing checkpoints at once")
def writers(ctx: Context) -> list[Table]:
    steps = ctx.pick(100, 400)
    ns = "bench" + uuid.uuid4().hex[:8]
    results = {}
    for kind, where in (("sqlite", str(ctx.tmp / "writers.sqlite")), ("botwire", f"{ctx.nats_url} {ns}")):
        results[kind] = _run_writers(ctx, kind, where, steps)
    table = Table(
        f"LangGraph checkpoints: {WRITERS} processes, {steps} steps each (put + put_writes), at once",
        ["saver", "step p50 µs", "step p99 µs", "steps/s (all)", "vs sqlite", "target", RESULT],
    )
    lite_samples, lite_rate = results["sqlite"]
    ours_samples, ours_rate = results["botwire"]
    ls, os_ = Stats.of(lite_samples), Stats.of(ours_samples)
    table.add("SqliteSaver (one file, WAL)", ls.p50, ls.p99, lite_rate, None, "-", "")
    speedup = Ratio(ours_rate / lite_rate)
    table.add("BotWireSaver", os_.p50, os_.p99, ours_rate, speedup, "> 1.0x", "PASS" if speedup > 1 else "MISS")
    table.notes.append("vs sqlite: steps/s of ours over SQLite's (above 1: faster)")
    return [table]


if __name__ == "__main__":  # a writer process
    kind, where, thread, steps, go = sys.argv[1:]
    print(json.dumps(_writer(kind, where, thread, int(steps), go)))
    sys.stdout.flush()
