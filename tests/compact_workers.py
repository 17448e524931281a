"""Deterministic summarisers for the compaction consumer's tests (``tests.compact_workers:NAME``).

The summary is every message's content joined by ``|``, the previous summary's content first:
so a summary names exactly the messages up to its ``upto``, and a range summarised twice (or
skipped) shows as a repeated (or missing) item.
"""

from __future__ import annotations

from typing import Any


def summarise(messages: list[dict[str, Any]]) -> str:
    return "|".join(m["content"] for m in messages)


async def asummarise(messages: list[dict[str, Any]]) -> str:
    return summarise(messages)
