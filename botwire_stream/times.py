"""Times and TTLs as the server keeps them: pure functions, no I/O.

A TTL is whole seconds (the server's ``Nats-TTL`` and message schedules count whole seconds),
rounded up so that nothing expires early, and bounded by what the server's clock arithmetic holds.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Final

import msgspec

from .errors import InvalidTTL

__all__ = ["MAX_TTL_SECONDS", "parse_time", "ttl_seconds"]

_time_decoder = msgspec.json.Decoder(datetime)

# The longest TTL: 100 years. nats-server keeps a message's expiry as int64 nanoseconds since 1970
# (now + ttl), which overflows for ttl above about 7.44e9 s (235 years) from 2026; such a key was
# measured to vanish within half a second instead of living long. A chat schedule's ``@at`` time
# must also stay below that year 2262 limit. 100 years keeps a margin of more than a century.
MAX_TTL_SECONDS: Final = 36525 * 86400  # 100 years of 365.25 days: 3,155,760,000 s


def ttl_seconds(ttl: float | timedelta | None) -> int | None:
    """Whole seconds, rounded up (the server counts whole seconds); None means forever.

    ``InvalidTTL`` for anything but a positive number or timedelta of at most ``MAX_TTL_SECONDS``.
    """
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, int) and not isinstance(ttl, bool):
        seconds = float(max(-1, min(ttl, MAX_TTL_SECONDS + 1)))  # float(±10**400) would overflow
    elif isinstance(ttl, float):
        seconds = ttl
    else:
        raise InvalidTTL(f"ttl must be seconds (int or float) or a timedelta, not {type(ttl).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidTTL(f"ttl must be a positive number of seconds, not {ttl!r}")
    whole = math.ceil(seconds)
    if whole > MAX_TTL_SECONDS:
        raise InvalidTTL(
            f"ttl must be at most {MAX_TTL_SECONDS} seconds (100 years), not {ttl!r}; use ttl=None to keep it forever"
        )
    return whole


def parse_time(value: str) -> datetime:
    """An RFC 3339 time from a NATS header (nanoseconds rounded to the nearest microsecond, as msgspec does)."""
    return _time_decoder.decode(b'"' + value.encode() + b'"')
