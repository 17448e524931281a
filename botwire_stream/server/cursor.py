"""``Stream-Cursor``: the count of 20 s intervals since 2024-10-09T00:00:00Z, kept strictly above
a client's own cursor (with 1-3600 s of random jitter) so that CDN-cached live responses are
never served back to the client that produced them."""

from __future__ import annotations

import random
import time

__all__ = ["next_cursor"]

_EPOCH = 1728432000  # 2024-10-09T00:00:00Z
_INTERVAL = 20


def next_cursor(client: str | None) -> str:
    current = int((time.time() - _EPOCH) // _INTERVAL)
    if client is None or not client.isdigit() or int(client) < current:
        return str(current)
    return str(int(client) + max(1, random.randint(1, 3600) // _INTERVAL))
