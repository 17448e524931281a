"""Writers for tests/test_qa_10c_materialiser.py, run as
``python -m tests.qa10c_workers write URL NS ROUNDS HOT COLD``: each round appends one message to
each of the HOT conversations ``h0..`` and to one of the COLD ones ``c00..`` (in turn), the
round's appends concurrent, so that the conversations interleave in the namespace's stream and
the hot ones fill a chunk long before the cold ones; prints {"written": n}."""

from __future__ import annotations

import asyncio
import json
import sys

from botwire_stream import AsyncChatHistory


async def write(url: str, namespace: str, rounds: int, hot: int, cold: int) -> int:
    hots = [AsyncChatHistory(f"h{i}", namespace=namespace, url=url) for i in range(hot)]
    colds = [AsyncChatHistory(f"c{i:02d}", namespace=namespace, url=url) for i in range(cold)]
    n = 0
    try:
        sent = {h.session_id: 0 for h in hots + colds}
        for k in range(rounds):
            targets = hots + ([colds[k % cold]] if cold else [])
            await asyncio.gather(*(h.append(_message(h.session_id, sent[h.session_id], k)) for h in targets))
            for h in targets:
                sent[h.session_id] += 1
            n += len(targets)
    finally:
        for h in hots + colds:
            await h.close()
    return n


def _message(session_id: str, i: int, k: int) -> dict[str, str]:
    """The conversation's ``i``-th message (user first, then turns), written in round ``k``."""
    return {"role": "user" if i % 2 == 0 else "assistant", "content": f"{session_id} {k}"}


def main() -> None:
    cmd, url, namespace, rounds, hot, cold = sys.argv[1:]
    assert cmd == "write"
    print(json.dumps({"written": asyncio.run(write(url, namespace, int(rounds), int(hot), int(cold)))}))


if __name__ == "__main__":
    main()
