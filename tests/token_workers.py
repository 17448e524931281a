"""Token stream workers run in their own OS process: ``python -m tests.token_workers <cmd> ...``.

``write URL PATH N``: create a text stream, append ``N`` numbered chunks, close it; prints the
offsets. ``follow URL PATH``: follow the stream from the start until it is closed; prints the data.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from botwire_stream import AsyncTokenStream


async def _write(url: str, path: str, n: int) -> Any:
    async with AsyncTokenStream(path, url=url) as s:
        await s.create(content_type="text/plain")
        offsets = []
        for i in range(n):
            offsets.append((await s.append(f"<{i}>")).next_offset)
            await asyncio.sleep(0.005)
        await s.close_stream()
        return offsets


async def _follow(url: str, path: str) -> Any:
    async with AsyncTokenStream(path, url=url) as s:
        print("ready", flush=True)
        parts = []
        async for got in s.follow():
            parts.append(got.data.decode())
        return "".join(parts)


def main(argv: list[str]) -> Any:
    cmd, url, path, *rest = argv
    if cmd == "write":
        return asyncio.run(_write(url, path, int(rest[0])))
    if cmd == "follow":
        return asyncio.run(_follow(url, path))
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
