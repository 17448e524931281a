"""Bounded waits for a condition that the code under test makes true eventually."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path


async def until(check: Callable[[], Awaitable[bool]], what: str, bound: float = 10.0, every: float = 0.02) -> None:
    """Wait until ``check()`` holds, polling every ``every`` s; ``AssertionError`` after ``bound`` s."""
    deadline = time.monotonic() + bound
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {bound} s")
        await asyncio.sleep(every)


def sigstop(pid: int, bound: float = 2.0) -> None:
    """SIGSTOP ``pid`` (a process the test started) and wait until every one of its threads is
    stopped: kill() returns once the stop is queued, and under load a server thread was seen still
    running (state R) right after it, long enough to answer the next request."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                continue
        if states and all(st in "Tt" for st in states):
            return
        time.sleep(0.002)
