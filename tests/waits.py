"""Bounded waits for a condition that the code under test makes true eventually."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def until(check: Callable[[], Awaitable[bool]], what: str, bound: float = 10.0, every: float = 0.02) -> None:
    """Wait until ``check()`` holds, polling every ``every`` s; ``AssertionError`` after ``bound`` s."""
    deadline = time.monotonic() + bound
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {bound} s")
        await asyncio.sleep(every)
