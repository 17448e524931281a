"""Conversation-log work done in child OS processes, for tests of what several processes share.

Run as ``python -m tests.chat_workers <command> <url> <namespace> <session id> ...`` from the
repository root. Each command prints one JSON document on its last stdout line. Commands that take
a ``go`` file connect first, print ``ready``, and wait for that file, so that the parent can
release many writers at the same moment.

The parent side is ``run`` (one process, to completion), ``run_together`` (several processes
released at once) and ``take`` (bounded reads from a blocking iterator).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests import procs

WAIT = procs.WAIT


# -- parent side -----------------------------------------------------------------------------------
def run(*args: str, timeout: float = WAIT) -> Any:
    """Run one worker to completion and return the JSON it printed last."""
    return procs.run("tests.chat_workers", args, timeout)


def run_together(commands: Sequence[Sequence[str]], go: Path, timeout: float = WAIT) -> list[Any]:
    """Start one worker per command, release them at once through ``go``, return their outputs."""
    return procs.run_together("tests.chat_workers", commands, go, timeout)


take = procs.take


# -- child side ------------------------------------------------------------------------------------
_wait_for = procs.wait_for_go


async def _append(url: str, ns: str, sid: str, writer: str, n: int, tasks: int, go: str) -> list[list[Any]]:
    """``tasks`` concurrent writers ``<writer>.<t>``, each appending its ``i`` in order; [w, i, seq]."""
    from botwire_stream import AsyncChatHistory

    async with AsyncChatHistory(sid, namespace=ns, url=url) as chat:
        await asyncio.to_thread(_wait_for, go)

        async def lane(t: int) -> list[list[Any]]:
            w = f"{writer}.{t}"
            out: list[list[Any]] = []
            for i in range(n // tasks):
                out.append([w, i, await chat.append({"writer": w, "i": i})])
            return out

        lanes = await asyncio.wait_for(asyncio.gather(*(lane(t) for t in range(tasks))), WAIT)
    return [row for rows in lanes for row in rows]


async def _extend(
    url: str, ns: str, sid: str, writer: str, batches: int, size: int, tasks: int, go: str
) -> list[list[Any]]:
    """``tasks`` concurrent writers, each extending ``batches`` batches of ``size``; [w, [seqs]]."""
    from botwire_stream import AsyncChatHistory

    async with AsyncChatHistory(sid, namespace=ns, url=url) as chat:
        await asyncio.to_thread(_wait_for, go)

        async def lane(t: int) -> list[list[Any]]:
            w = f"{writer}.{t}"
            out: list[list[Any]] = []
            for b in range(batches // tasks):
                batch = [{"writer": w, "i": b * size + j} for j in range(size)]
                out.append([w, await chat.extend(batch)])
            return out

        lanes = await asyncio.wait_for(asyncio.gather(*(lane(t) for t in range(tasks))), WAIT)
    return [row for rows in lanes for row in rows]


def _write(url: str, ns: str, sid: str, messages: str) -> list[int]:
    """Append each message of the JSON list through the sync face; their sequences."""
    from botwire_stream import ChatHistory

    with ChatHistory(sid, namespace=ns, url=url) as chat:
        return [chat.append(m) for m in json.loads(messages)]


async def _touch(url: str, ns: str, conversations: int, started: str, stop: str) -> list[str]:
    """Append to random conversations ``c:0000``... until ``stop`` exists (bounded by WAIT); the
    ids written. ``started`` is created after the first append."""
    import random

    from botwire_stream import AsyncChatHistory

    chats = [AsyncChatHistory(f"c:{i:04d}", namespace=ns, url=url) for i in range(conversations)]
    touched: list[str] = []
    deadline = time.monotonic() + WAIT
    try:
        while not Path(stop).exists() and time.monotonic() < deadline:
            chat = random.choice(chats)
            touched.append(chat.session_id)  # before the append: it may land before it returns
            await chat.append({"touch": len(touched)})
            if len(touched) == 1:
                Path(started).touch()
            await asyncio.sleep(0.001)
    finally:
        await asyncio.gather(*(c.close() for c in chats))
    return touched


async def _churn(url: str, ns: str, sid: str, rounds: int, started: str, stop: str) -> int:
    """Up to ``rounds`` times (and within WAIT), until ``stop`` exists: extend the conversation by
    the pair ``{"r": i, "n": 0}``, ``{"r": i, "n": 1}`` (atomic), then clear it; the rounds done.
    ``started`` is created after the first round."""
    from botwire_stream import AsyncChatHistory

    done = 0
    deadline = time.monotonic() + WAIT
    async with AsyncChatHistory(sid, namespace=ns, url=url, timeout=10) as chat:
        while done < rounds and not Path(stop).exists() and time.monotonic() < deadline:
            await chat.extend([{"r": done, "n": 0}, {"r": done, "n": 1}])
            await chat.clear()
            done += 1
            if done == 1:
                Path(started).touch()
    return done


def main(argv: list[str]) -> Any:
    cmd, rest = argv[0], argv[1:]
    if cmd == "append":  # url ns sid writer n tasks go
        url, ns, sid, writer, n, tasks, go = rest
        return asyncio.run(_append(url, ns, sid, writer, int(n), int(tasks), go))
    if cmd == "extend":  # url ns sid writer batches size tasks go
        url, ns, sid, writer, batches, size, tasks, go = rest
        return asyncio.run(_extend(url, ns, sid, writer, int(batches), int(size), int(tasks), go))
    if cmd == "touch":  # url ns conversations started-file stop-file
        url, ns, conversations, started, stop = rest
        return asyncio.run(_touch(url, ns, int(conversations), started, stop))
    if cmd == "churn":  # url ns sid rounds started-file stop-file
        url, ns, sid, rounds, started, stop = rest
        return asyncio.run(_churn(url, ns, sid, int(rounds), started, stop))
    if cmd == "write":  # url ns sid json-list-of-messages
        url, ns, sid, messages = rest
        return _write(url, ns, sid, messages)
    raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
