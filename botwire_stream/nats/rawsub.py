"""Raw deliveries for bulk reads: a core subscription whose messages skip nats-py's ``Msg``.

nats-py turns every message into a ``Msg`` after parsing its headers in Python, queues it and
hands it to a task; for a bulk read (a replay, a materialiser's batch pull) that is most of the
time per message (measured: ~25 µs of header parsing alone, replay 4.6k events/s vs the socket's
far higher rate). A raw subscription gets ``(subject, reply, data, headers)`` as the parser
produced them, synchronously, and reads only the headers it needs (``header``).

One dispatch per client (``route``): the first use replaces the client's ``_process_msg`` once
with a lookup by sid in a table of raw sinks, falling back to nats-py's own for every sid not in
it. Both bulk reads (``RawSubscription``) and the shared reply inbox (``replies.route_replies``)
register there, so neither hook wraps or clobbers the other, and every other subscription goes
through nats-py unchanged. A reconnect keeps the sid, so a raw subscription survives it like any
other. Header blocks that need a full parse go through ``replies.parse_headers``; ``header``
finds one name without parsing the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from nats.aio.client import Client

__all__ = ["RawSubscription", "Sink", "header", "route", "status", "unroute"]

# subject, reply, data, raw header block (None: no headers)
Sink = Callable[[bytes, bytes, bytes, "bytes | None"], None]
_ATTR: Final = "_botwire_raw_sinks"
_HDR_LINE: Final = len(b"NATS/1.0")


def _sinks(nc: Client) -> dict[int, Sink]:
    """The client's sid -> sink table, its ``_process_msg`` replaced on first use (once)."""
    sinks: dict[int, Sink] | None = getattr(nc, _ATTR, None)
    if sinks is None:
        table: dict[int, Sink] = {}
        original: Any = nc._process_msg  # (sid, subject, reply, data, headers or None), nats-py 2.x
        stats = nc.stats

        async def process(sid: int, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
            sink = table.get(sid)
            if sink is None:
                await original(sid, subject, reply, data, hdr)
                return
            stats["in_msgs"] += 1  # as nats-py counts the messages it processes itself
            stats["in_bytes"] += len(data)
            sink(subject, reply, data, hdr)

        process.botwire_routes = True  # type: ignore[attr-defined]
        nc._process_msg = process  # type: ignore[method-assign,assignment]
        setattr(nc, _ATTR, table)
        sinks = table
    return sinks


def route(nc: Client, sid: int, sink: Sink) -> None:
    """Hand every message of subscription ``sid`` on ``nc`` to ``sink``, raw, from the reader
    (no ``Msg``, no queue, no task). The sink must not block: it runs inside nats-py's parser."""
    _sinks(nc)[sid] = sink


def unroute(nc: Client, sid: int) -> None:
    """Give subscription ``sid`` back to nats-py."""
    _sinks(nc).pop(sid, None)


class RawSubscription:
    """A core subscription to ``subject`` whose messages go to ``sink`` as raw bytes."""

    def __init__(self, nc: Client, subject: str, sink: Sink) -> None:
        self.nc = nc
        self.subject = subject
        self.sink = sink
        self._sub: Any = None

    async def start(self) -> RawSubscription:
        # No callback: nats-py starts no task for it; its messages never reach nats-py's queue.
        self._sub = await self.nc.subscribe(self.subject)
        route(self.nc, self._sub._id, self.sink)
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            unroute(self.nc, self._sub._id)
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
