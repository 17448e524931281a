"""Quotas and rate limits for ``botwire serve``, counted in NATS so that they hold across any
number of serve processes.

Each window is a JetStream counter (nats-server 2.12 ``allow_msg_counter``): one publish with
``Nats-Incr: +1`` returns the new total atomically, so a check costs one round trip and never
retries under contention (a KV compare-and-set would retry). A request that takes the total past
its limit gives the unit back (``-1``) and gets 429: the total can overshoot for an instant but
never admits more than the limit. Writes per day count in ``botwire_quota_day`` (UTC days,
counters kept 2 days); requests per second in ``botwire_quota_sec`` (kept 10 s). Reads are
counted only where a requests-per-second limit applies, so unlimited reads cost nothing.
"""

from __future__ import annotations

import base64
import fnmatch
import math
import re
import time
from dataclasses import dataclass

import nats.js.errors
from nats.js.api import Header, StorageType, StreamConfig

from ..errors import InvalidArgument
from ..nats.jetstream import Connection

__all__ = ["HOSTED", "Counted", "Counters", "Limits", "Rule", "parse_limits", "parse_rule"]

DAY_STREAM, SEC_STREAM = "botwire_quota_day", "botwire_quota_sec"
_DAY, _SEC = "botwire.quota.day", "botwire.quota.sec"


@dataclass(frozen=True)
class Limits:
    """What one namespace (or key) may do; None: unlimited."""

    writes_per_day: int | None = None
    requests_per_second: int | None = None
    max_bytes: int | None = None  # the namespace's memory, blobs and conversations, as NATS stores them


_MB = 1_000_000
HOSTED = Limits(writes_per_day=1000, max_bytes=50 * _MB)  # the hosted free tier; reads unlimited
_PRESETS = {"hosted": HOSTED, "unlimited": Limits()}
_ITEM = re.compile(r"(writes|rps)=(\d+)(/day|/d|/s)?")
_BYTES = re.compile(r"bytes=(\d+)(kb|mb|gb)?", re.IGNORECASE)
_UNIT = {"": 1, "kb": 1000, "mb": _MB, "gb": 1000 * _MB}
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SIZE_TTL = 1.0  # seconds a namespace's size is reused: a write costs no stream-info requests


def parse_limits(text: str) -> Limits:
    """``hosted``, ``unlimited``, or comma-separated ``writes=N/day``, ``rps=N``, ``bytes=N[KB|MB|GB]``."""
    text = text.strip()
    if text in _PRESETS:
        return _PRESETS[text]
    values: dict[str, int] = {}
    for item in text.split(","):
        size = _BYTES.fullmatch(item.strip())
        if size is not None:
            values["max_bytes"] = int(size.group(1)) * _UNIT[(size.group(2) or "").lower()]
            continue
        m = _ITEM.fullmatch(item.strip())
        if (
            m is None
            or (m.group(1) == "writes" and m.group(3) == "/s")
            or (m.group(1) == "rps" and m.group(3) in ("/day", "/d"))
        ):
            raise InvalidArgument(
                f"limit {item.strip()!r}: use writes=N/day, rps=N, bytes=N[KB|MB|GB], or a preset (hosted, unlimited)"
            )
        values["writes_per_day" if m.group(1) == "writes" else "requests_per_second"] = int(m.group(2))
    return Limits(**values)


@dataclass(frozen=True)
class Rule:
    """Namespaces matching ``glob`` get ``limits``."""

    glob: str
    limits: Limits

    def matches(self, namespace: str) -> bool:
        return fnmatch.fnmatchcase(namespace, self.glob)


def parse_rule(text: str, default: Limits | None = None) -> Rule:
    """``GLOB=LIMITS`` (or ``GLOB`` alone when ``default`` is given)."""
    glob, sep, limits = text.partition("=")
    if not glob:
        raise InvalidArgument(f"{text!r}: give GLOB=LIMITS, e.g. 'demo-*=writes=1000/day,rps=20'")
    if not sep:
        if default is None:
            raise InvalidArgument(f"{text!r}: give GLOB=LIMITS, e.g. 'demo-*=writes=1000/day,rps=20'")
        return Rule(glob, default)
    return Rule(glob, parse_limits(limits))


def _token(text: str) -> str:
    # a subject token for any namespace or key id: '.', '*', '>' and spaces cannot reach the subject
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=") or "_"


@dataclass
class Counted:
    """The tightest window of one request: for the ``RateLimit-*`` headers and ``Retry-After``."""

    limit: int
    remaining: int
    reset: int  # seconds until the window ends
    exceeded: bool
    subject: str  # the counter, to give the unit back


class Counters:
    """The counter streams on one connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._ready = False
        self._sizes: dict[str, tuple[float, int]] = {}

    async def namespace_bytes(self, namespace: str) -> int:
        """What the namespace occupies in NATS: its KV bucket, its chunked values and its
        conversations (three stream-info requests, reused for a second per process)."""
        if not _NAMESPACE.fullmatch(namespace):
            return 0  # not a memory namespace: it holds nothing in those streams
        now = time.monotonic()
        cached = self._sizes.get(namespace)
        if cached is not None and now - cached[0] < _SIZE_TTL:
            return cached[1]
        total = 0
        for stream in (f"KV_botwire_{namespace}", f"BOTWIRE_BLOBS_{namespace}", f"BOTWIRE_CHAT_{namespace}"):
            try:
                total += (await self.conn.js.stream_info(stream)).state.bytes
            except nats.js.errors.NotFoundError:
                pass
        self._sizes[namespace] = (now, total)
        return total

    async def _ensure(self) -> None:
        if self._ready:
            return
        for name, subject, age in ((DAY_STREAM, _DAY, 2 * 86400.0), (SEC_STREAM, _SEC, 10.0)):
            await self.conn.ensure_stream(
                StreamConfig(
                    name=name, subjects=[subject + ".>"], storage=StorageType.FILE, max_age=age, allow_msg_counter=True
                )
            )
        self._ready = True

    async def _incr(self, subject: str, by: int) -> int:
        ack = await self.conn.js.publish(subject, b"", headers={Header.INCR: f"{by:+d}"})
        if ack.val is None:  # a stream without counters (created by hand): refuse rather than guess
            raise RuntimeError(f"{subject}: the quota stream does not count (allow_msg_counter is off)")
        return int(ack.val)

    async def take(self, kind: str, who: str, limit: int) -> Counted:
        """Count one unit of ``kind`` (``day`` writes or ``sec`` requests) for ``who``; when that
        passes ``limit`` the unit is given back and ``exceeded`` is set."""
        await self._ensure()
        now = time.time()
        if kind == "day":
            window, length, base = int(now // 86400), 86400, _DAY
        else:
            window, length, base = int(now), 1, _SEC
        subject = f"{base}.{_token(who)}.{window}"
        total = await self._incr(subject, 1)
        reset = max(1, math.ceil((window + 1) * length - now))
        if total > limit:
            await self._incr(subject, -1)
            return Counted(limit, 0, reset, True, subject)
        return Counted(limit, limit - total, reset, False, subject)

    async def give_back(self, counted: Counted) -> None:
        """Return the unit of a request that wrote nothing."""
        await self._incr(counted.subject, -1)
