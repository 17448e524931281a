"""Other processes for tests/test_qa_11c_*.py (BotWireSaver racing other processes).

Run as ``python -m tests.qa11c_workers <command> <url> <namespace> ...`` from the repository root:

- ``saver``: one JSON command a line on stdin (``op``: put, writes, delete, prune, delete_runs,
  copy, bulk), ``ok`` (or ``error <type>: <message>``) on stdout once the call has returned.
- ``chain <thread> <stop> <max> <writes>``: a chain of checkpoints (each the child of the one
  before, with a task of ``writes`` pending writes) until the file ``stop`` exists or ``max`` are
  stored; ``ready`` after the first, then one JSON document: the ids whose put returned.
- ``resume <thread> <decision> <go>``: ``tests.langgraph_workers``' approval graph (its sender
  sends what the state decided), resumed with ``decision`` once the file ``go`` exists; one JSON
  document: the returned messages and the calls of its drafter and sender.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any


def _cfg(thread: str, checkpoint_id: str | None = None, ns: str = "") -> Any:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def _checkpoint(checkpoint_id: str | None, n: Any) -> Any:
    from langgraph.checkpoint.base import empty_checkpoint

    cp = empty_checkpoint()
    if checkpoint_id:
        cp["id"] = checkpoint_id
    cp["channel_values"] = {"n": n}
    cp["channel_versions"] = {"n": 1}
    return cp


async def saver(url: str, namespace: str) -> None:
    from botwire_stream.integrations.langgraph import BotWireSaver

    s = BotWireSaver(namespace, url=url, timeout=2.0)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "put":
                await s.aput(
                    _cfg(cmd["thread"], cmd.get("parent")),
                    _checkpoint(cmd["id"], cmd["n"]),
                    {"step": cmd.get("step", 0), "run_id": cmd.get("run")},
                    {},
                )
            elif op == "writes":
                await s.aput_writes(_cfg(cmd["thread"], cmd["id"]), [tuple(w) for w in cmd["writes"]], cmd["task"])
            elif op == "delete":
                await s.adelete_thread(cmd["thread"])
            elif op == "prune":
                await s.aprune(cmd["threads"], strategy=cmd["strategy"])
            elif op == "delete_runs":
                await s.adelete_for_runs(cmd["runs"])
            elif op == "copy":
                await s.acopy_thread(cmd["src"], cmd["dst"])
            elif op == "bulk":  # a checkpoint ids[j] in thread <prefix>j, from j = start on, 64 at once
                ids, n = cmd["ids"], cmd["n"]
                for i in range(cmd.get("start", 0), len(ids), 64):
                    await asyncio.gather(
                        *(
                            s.aput(_cfg(f"{cmd['prefix']}{j}"), _checkpoint(ids[j], n), {}, {})
                            for j in range(i, min(i + 64, len(ids)))
                        )
                    )
            print("ok", flush=True)
        except Exception as exc:
            print(f"error {type(exc).__name__}: {exc}", flush=True)
    await s.aclose()


async def chain(url: str, namespace: str, thread: str, stop: str, most: str, writes: str) -> list[str]:
    from botwire_stream.integrations.langgraph import BotWireSaver

    done: list[str] = []
    async with BotWireSaver(namespace, url=url, timeout=5.0) as s:
        parent: str | None = None
        for n in range(int(most)):
            if Path(stop).exists():
                break
            stored = await s.aput(_cfg(thread, parent), _checkpoint(None, n), {"step": n}, {})
            await s.aput_writes(stored, [(f"c{i}", n) for i in range(int(writes))], f"task{n}")
            parent = stored["configurable"]["checkpoint_id"]
            done.append(parent)
            if n == 0:
                print("ready", flush=True)
    return done


async def resume(url: str, namespace: str, thread: str, decision: str, go: str) -> Any:
    from langgraph.types import Command

    from tests.langgraph_workers import Counting, Sending, build

    drafter, sender = Counting(["never asked"]), Sending()
    graph = build(url, namespace, drafter, sender)
    config = {"configurable": {"thread_id": thread}}
    await graph.aget_state(config)  # connected before the race starts
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not Path(go).exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    out = await graph.ainvoke(Command(resume=decision), config)
    return {"messages": [[m.type, m.content] for m in out["messages"]], "calls": [drafter.calls, sender.calls]}


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "saver":
        asyncio.run(saver(*args))
        return
    if command == "chain":
        out: Any = asyncio.run(chain(*args))
    elif command == "resume":
        out = asyncio.run(resume(*args))
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
