"""The cost of the embedded server's loopback TLS: the same calls over TLS and in clear.

- ``embedded-tls``: ``AsyncMemory.set``/``get`` and ``AsyncChatHistory.append`` against the embedded
  server (TLS from the first byte, pinned certificate, token) and against the suite's plain
  nats-server on the same machine, interleaved in the same run; the ratio is TLS p50 / plain p50.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from botwire_stream import AsyncChatHistory, AsyncMemory
from botwire_stream.nats import embedded

from ._registry import Context, benchmark
from ._report import Ratio, Table
from ._timing import Stats, interleave, time_async
from .kv import VALUE, message

COLUMNS = ["operation", "p50 µs", "p99 µs", "ops/s", "TLS vs plain"]


@benchmark("embedded-tls", "set/get/append p50: the embedded server over loopback TLS vs a plain server")
def embedded_tls(ctx: Context) -> list[Table]:
    rounds, n, warm = ctx.pick((3, 200, 100), (8, 500, 300))
    home = ctx.tmp / "tls-home"
    saved = os.environ.get("BOTWIRE_HOME")
    os.environ["BOTWIRE_HOME"] = str(home)
    try:
        tls_mem = ctx.run(AsyncMemory("bench_tls").open())
        tls_chat = ctx.run(AsyncChatHistory("bench-tls", namespace="bench_tls").open())
    finally:
        if saved is None:
            os.environ.pop("BOTWIRE_HOME", None)
        else:
            os.environ["BOTWIRE_HOME"] = saved
    plain_mem = ctx.run(AsyncMemory("bench_plain", url=ctx.nats_url).open())
    plain_chat = ctx.run(AsyncChatHistory("bench-plain", namespace="bench_plain", url=ctx.nats_url).open())
    try:
        ops: dict[str, dict[str, Callable[[], Awaitable[object]]]] = {
            "set": {"plain": lambda: plain_mem.set("k", VALUE), "tls": lambda: tls_mem.set("k", VALUE)},
            "get": {"plain": lambda: plain_mem.get("k"), "tls": lambda: tls_mem.get("k")},
            "append": {"plain": lambda: plain_chat.append(message(1)), "tls": lambda: tls_chat.append(message(1))},
        }
        table = Table("embedded-tls: the same call over loopback TLS and in clear", COLUMNS)
        for op, contenders in ops.items():
            for fn in contenders.values():
                ctx.run(time_async(fn, warm))
            samples = interleave(
                rounds,
                {name: (lambda fn=fn: ctx.run(time_async(fn, n))) for name, fn in contenders.items()},
            )
            stats = {name: Stats.of(v) for name, v in samples.items()}
            for name, st in stats.items():
                label = f"{op}  {'embedded server, TLS' if name == 'tls' else 'plain nats-server (baseline)'}"
                ratio = Ratio(st.p50 / stats["plain"].p50) if name == "tls" else None
                table.add(label, st.p50, st.p99, st.ops_per_s, ratio)
        table.notes.append(
            f"{rounds} interleaved rounds x {n} ops after {warm} warm-up ops; both servers are nats-server "
            "on 127.0.0.1 with JetStream on the same disk (the embedded one also checks a token)."
        )
        return [table]
    finally:
        for closing in (tls_mem.close(), tls_chat.close(), plain_mem.close(), plain_chat.close()):
            ctx.run(closing)
        embedded.stop(home)
