"""What a process holds, for the tests of leaks: its open sockets and its live event loops."""

from __future__ import annotations

import asyncio
import gc
import os


def open_sockets() -> int:
    """How many sockets this process has open (Linux: /proc/self/fd)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # closed while listing
    return count


def live_event_loops() -> int:
    """How many event loop objects are still alive (not freed by the garbage collector)."""
    return sum(isinstance(o, asyncio.AbstractEventLoop) for o in gc.get_objects())
