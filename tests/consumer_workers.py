"""Writers for tests/test_consumers.py, run as ``python -m tests.consumer_workers write URL NS ROUNDS SID...``:
each round appends one message to every conversation named, so that the conversations interleave
in the namespace's stream; prints {"written": n}."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from botwire_stream import AsyncChatHistory


async def write(url: str, namespace: str, rounds: int, sessions: list[str]) -> int:
    histories = [AsyncChatHistory(s, namespace=namespace, url=url) for s in sessions]
    pid = os.getpid()
    n = 0
    try:
        for k in range(rounds):
            for h in histories:
                role = "user" if k % 2 == 0 else "assistant"
                if k % 10 == 9:  # now and then an atomic batch
                    await h.extend(
                        [{"role": role, "content": f"{pid}-{k}-a"}, {"role": role, "content": f"{pid}-{k}-b"}]
                    )
                    n += 2
                else:
                    await h.append({"role": role, "content": f"{pid}-{k}"})
                    n += 1
    finally:
        for h in histories:
            await h.close()
    return n


def main() -> None:
    cmd, url, namespace, rounds, *sessions = sys.argv[1:]
    assert cmd == "write"
    print(json.dumps({"written": asyncio.run(write(url, namespace, int(rounds), sessions))}))


if __name__ == "__main__":
    main()
