"""A chat turn: read the recent context, append the user's message, append the answer (issue 17).

- ``chat-turn``: 100 conversations (50 under ``--quick``) take turns at once from one process,
  each turn ``messages(last=20)`` + two ``append``, their messages interleaved in one namespace,
  conversations growing from 0 to 200 messages (80) over rounds of 10 turns each. Against Redis
  lists in the same run (``LRANGE key -20 -1`` + two ``RPUSH``, ``appendonly yes``,
  ``appendfsync everysec``), rounds alternating: turns/s and p50/p99 per round.
- ``chat-last``: ``messages(last=20)`` p50 against ``append`` p50, for conversations of 40 and
  10,000 messages spread among 100 other conversations' messages.
"""

from __future__ import annotations

import asyncio
import json
import time
from time import perf_counter_ns
from typing import Any

from botwire_stream import AsyncChatHistory
from botwire_stream.nats import chatlog

from ._registry import Context, benchmark
from ._report import RESULT, Ratio, Table
from ._timing import Stats, interleave, time_async
from .chat import _load_read_stream, chat_message

TURN_TARGET = 1.0  # our turns/s / Redis lists' turns/s, in every round: at least
LAST_TARGET = 2.0  # messages(last=20) p50 / append p50: under
CONTEXT = 20  # messages read per turn
TURNS_PER_ROUND = 10  # two messages each: a round grows every conversation by 20 messages


async def _our_round(chats: list[AsyncChatHistory], turns: int, first: int) -> tuple[list[int], int]:
    """``turns`` turns of every conversation at once; (each turn's ns, the round's wall ns)."""

    async def conversation(chat: AsyncChatHistory) -> list[int]:
        out = []
        for t in range(first, first + turns):
            t0 = perf_counter_ns()
            context = await chat.messages(last=CONTEXT)
            if len(context) != min(CONTEXT, 2 * t):
                raise RuntimeError(f"{chat.session_id}: read {len(context)} messages at turn {t}")
            await chat.append(chat_message(2 * t))
            await chat.append(chat_message(2 * t + 1))
            out.append(perf_counter_ns() - t0)
        return out

    t0 = perf_counter_ns()
    lanes = await asyncio.gather(*(conversation(c) for c in chats))
    return [s for lane in lanes for s in lane], perf_counter_ns() - t0


async def _redis_round(client: Any, keys: list[str], turns: int, first: int) -> tuple[list[int], int]:
    """The same turns on Redis lists: LRANGE -20 -1 (decoded as the app would), two RPUSH."""

    async def conversation(key: str) -> list[int]:
        out = []
        for t in range(first, first + turns):
            t0 = perf_counter_ns()
            context = [json.loads(m) for m in await client.lrange(key, -CONTEXT, -1)]
            if len(context) != min(CONTEXT, 2 * t):
                raise RuntimeError(f"{key}: read {len(context)} messages at turn {t}")
            await client.rpush(key, json.dumps(chat_message(2 * t)))
            await client.rpush(key, json.dumps(chat_message(2 * t + 1)))
            out.append(perf_counter_ns() - t0)
        return out

    t0 = perf_counter_ns()
    lanes = await asyncio.gather(*(conversation(k) for k in keys))
    return [s for lane in lanes for s in lane], perf_counter_ns() - t0


def _aof_everysec(sync_client: Any) -> None:
    """Turn on the append-only file (fsync every second) and wait for its initial rewrite."""
    sync_client.config_set("appendonly", "yes")
    sync_client.config_set("appendfsync", "everysec")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = sync_client.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
            return
        time.sleep(0.05)
    raise RuntimeError("redis did not finish its AOF rewrite within 30 s")


@benchmark(
    "chat-turn", "a chat turn (last 20 + two appends), 100 conversations at once, 0-200 messages, vs Redis lists"
)
def chat_turn(ctx: Context) -> list[Table]:
    url = ctx.nats_url
    n_conv, rounds = ctx.pick((50, 4), (100, 10))
    ns = "bench_turn"
    chats = [ctx.run(AsyncChatHistory(f"turn-{i:03d}", namespace=ns, url=url).open()) for i in range(n_conv)]
    sync_redis = ctx.redis()
    client: Any = None
    keys = [f"bench:turn:{i:03d}" for i in range(n_conv)]
    if sync_redis is not None:
        import redis.asyncio

        sync_redis.delete(*keys)
        _aof_everysec(sync_redis)
        kw = sync_redis.connection_pool.connection_kwargs
        client = redis.asyncio.Redis(host=kw["host"], port=kw["port"], max_connections=n_conv)
    ours: list[tuple[list[int], int]] = []
    theirs: list[tuple[list[int], int]] = []
    try:
        for r in range(rounds):
            first = r * TURNS_PER_ROUND
            run_ours = lambda: ours.append(ctx.run(_our_round(chats, TURNS_PER_ROUND, first)))  # noqa: E731
            run_theirs = lambda: theirs.append(ctx.run(_redis_round(client, keys, TURNS_PER_ROUND, first)))  # noqa: E731
            order = [run_ours, run_theirs] if client is not None else [run_ours]
            for step in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
                step()
    finally:
        for chat in chats:
            ctx.run(chat.close())
        if client is not None:
            ctx.run(client.aclose())
        if sync_redis is not None:
            sync_redis.config_set("appendonly", "no")
            sync_redis.delete(*keys)
            sync_redis.close()
    table = Table(
        f"chat-turn: {n_conv} conversations at once, each turn messages(last={CONTEXT}) + 2 appends",
        [
            "messages before",
            "turns/s",
            "p50 µs",
            "p99 µs",
            "redis turns/s",
            "redis p50",
            "redis p99",
            "vs redis",
            "target",
            RESULT,
        ],
    )
    for r, (samples, wall) in enumerate(ours):
        st = Stats.of(samples)
        rate = len(samples) / (wall / 1e9)
        lo, hi = 2 * r * TURNS_PER_ROUND, 2 * (r + 1) * TURNS_PER_ROUND
        if theirs:
            rs, rwall = theirs[r]
            rst = Stats.of(rs)
            rrate = len(rs) / (rwall / 1e9)
            ratio = Ratio(rate / rrate)
            # higher is better here: a MISS below the target
            table.add(
                f"{lo}-{hi}",
                rate,
                st.p50,
                st.p99,
                rrate,
                rst.p50,
                rst.p99,
                ratio,
                f">= {TURN_TARGET:.1f}x",
                "PASS" if ratio >= TURN_TARGET else "MISS",
            )
        else:
            table.add(f"{lo}-{hi}", rate, st.p50, st.p99, None, None, None, None, "-", "")
    table.notes.append(
        f"{rounds} rounds of {TURNS_PER_ROUND} turns per conversation; ours and Redis alternate who goes first. "
        f"A turn: read the last {CONTEXT} messages (decoded), append two ~150 B JSON messages (one after the other)."
    )
    table.notes.append(
        "Redis: redis-py asyncio, a pool of one connection per conversation, stdlib json, appendonly yes + "
        "appendfsync everysec. Ours: one AsyncChatHistory per conversation sharing one connection "
        "(nats-server default: written to the OS before the ack, fsync every 2 min)."
    )
    if ctx.redis_skip:
        table.notes.append(f"redis: skipped ({ctx.redis_skip})")
    return [table]


@benchmark("chat-last", "messages(last=20) p50 vs append p50 at 40 and 10,000 messages among 100 other conversations")
def chat_last(ctx: Context) -> list[Table]:
    url = ctx.nats_url
    rounds, n, warm = ctx.pick((3, 100, 50), (8, 300, 200))
    ns = "bench_last"
    others = ctx.pick(10_000, 100_000)  # over 100 other conversations
    sizes = {"40": 40, "10k": 10_000}
    ctx.run(_load_read_stream(url, ns, others, {f"spread-{k}": v for k, v in sizes.items()}, {}))
    chats = {k: ctx.run(AsyncChatHistory(f"spread-{k}", namespace=ns, url=url).open()) for k in sizes}
    writer = ctx.run(AsyncChatHistory("appender", namespace=ns, url=url).open())
    msg = chat_message(1)
    try:

        async def cold(chat: AsyncChatHistory) -> object:
            chatlog._forget_all()  # as the first read of a process that never saw the conversation
            return await chat.messages(last=CONTEXT)

        contenders = {
            "append": lambda: writer.append(msg),
            **{f"last-{k}": (lambda c=c: c.messages(last=CONTEXT)) for k, c in chats.items()},
            **{f"cold-{k}": (lambda c=c: cold(c)) for k, c in chats.items()},
        }
        for op in contenders.values():
            ctx.run(time_async(op, warm))
        samples = interleave(
            rounds, {name: (lambda op=op: ctx.run(time_async(op, n))) for name, op in contenders.items()}
        )
        for k, chat in chats.items():  # still exactly the newest 20
            got = ctx.run(chat.messages(last=CONTEXT))
            want = [chat_message(j) for j in range(sizes[k] - CONTEXT, sizes[k])]
            if got != want:
                raise RuntimeError(f"messages(last=20) of spread-{k} returned other messages")
    finally:
        for chat in [*chats.values(), writer]:
            ctx.run(chat.close())
    stats = {name: Stats.of(v) for name, v in samples.items()}
    base = stats["append"]
    table = Table(
        f"chat-last: messages(last={CONTEXT}) vs append, conversations spread among {others:,} messages "
        "of 100 other conversations",
        ["operation", "p50 µs", "p99 µs", "p50 vs append", "target", RESULT],
    )
    table.add("append (baseline)", base.p50, base.p99, None, "-", "")
    for k, size in sizes.items():
        st = stats[f"last-{k}"]
        ratio = Ratio(st.p50 / base.p50)
        table.add(
            f"messages(last=20) of {size:,}",
            st.p50,
            st.p99,
            ratio,
            f"< {LAST_TARGET:.1f}x",
            "PASS" if ratio < LAST_TARGET else "MISS",
        )
    for k, size in sizes.items():
        st = stats[f"cold-{k}"]
        table.add(f"  first read in a process, {size:,}", st.p50, st.p99, Ratio(st.p50 / base.p50), "info", "")
    table.notes.append(
        f"{rounds} interleaved rounds x {n} calls after {warm} warm-up calls. The conversations were written by "
        "another client, so this process learns where their newest messages are on its first read: "
        "'first read in a process' forgets that before every call."
    )
    return [table]
