"""Raw deliveries for bulk reads: a core subscription whose messages skip nats-py's ``Msg``.

nats-py turns every message into a ``Msg`` after parsing its headers in Python, queues it and
hands it to a task; for a bulk read (a replay, a materialiser's batch pull) that is most of the
time per message (measured: ~25 µs of header parsing alone, replay 4.6k events/s vs the socket's
far higher rate). A raw subscription gets ``(subject, reply, data, headers)`` as the parser
produced them, synchronously, and parses only the headers it needs (``headers``).

It hooks the client's ``_process_msg`` once per client, for the subscriptions registered here
only: every other subscription goes through nats-py unchanged. A reconnect keeps the sid, so a
raw subscription survives it like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from nats.aio.client import Client

__all__ = ["RawSubscription", "Sink", "header", "headers", "status"]

# subject, reply, data, raw header block (None: no headers)
Sink = Callable[[bytes, bytes, bytes, "bytes | None"], None]
_ATTR: Final = "_botwire_raw_sinks"
_HDR_LINE: Final = len(b"NATS/1.0")


def _sinks(nc: Client) -> dict[int, Sink]:
    sinks: dict[int, Sink] | None = getattr(nc, _ATTR, None)
    if sinks is None:
        table: dict[int, Sink] = {}
        original: Any = nc._process_msg  # (sid, subject, reply, data, headers or None), nats-py 2.x

        async def process(sid: int, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
            sink = table.get(sid)
            if sink is None:
                await original(sid, subject, reply, data, hdr)
                return
            sink(subject, reply, data, hdr)

        nc._process_msg = process  # type: ignore[method-assign,assignment]
        setattr(nc, _ATTR, table)
        sinks = table
    return sinks


class RawSubscription:
    """A core subscription to ``subject`` whose messages go to ``sink`` as raw bytes."""

    def __init__(self, nc: Client, subject: str, sink: Sink) -> None:
        self.nc = nc
        self.subject = subject
        self.sink = sink
        self._sub: Any = None

    async def start(self) -> RawSubscription:
        sinks = _sinks(self.nc)
        # No callback: nats-py starts no task for it; its messages never reach nats-py's queue.
        self._sub = await self.nc.subscribe(self.subject)
        sinks[self._sub._id] = self.sink
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            _sinks(self.nc).pop(self._sub._id, None)
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection is closing or closed: nothing left to undo
                pass
            self._sub = None


def status(hdr: bytes | None, data: bytes) -> int:
    """The inline status of a server message (404 no messages, 408 request expired, 409, 100 a
    heartbeat), 0 for a message of the stream."""
    if hdr is None or data or len(hdr) < _HDR_LINE + 4 or hdr[_HDR_LINE] != 0x20:
        return 0
    code = hdr[_HDR_LINE + 1 : _HDR_LINE + 4]
    return int(code) if code.isdigit() else 0


def headers(hdr: bytes | None) -> dict[str, str]:
    """The header block as a dict (the last value of a repeated name), names as sent. A plain
    split: a few µs for the two or three headers a write carries."""
    if not hdr:
        return {}
    out: dict[str, str] = {}
    for line in hdr.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.decode()] = value.strip().decode()
    return out


def header(hdr: bytes | None, name: bytes) -> str | None:
    """One header's value (the first, names as sent), found without parsing the rest: a bulk
    read wants two or three names of each message (measured: a third of the per-event time of a
    replay went to ``headers``)."""
    if not hdr:
        return None
    i = hdr.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    i += len(name) + 3
    j = hdr.find(b"\r\n", i)
    return hdr[i : j if j >= 0 else len(hdr)].strip().decode()
