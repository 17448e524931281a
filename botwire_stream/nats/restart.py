"""The embedded server's recovery, as the hook ``RetryingConnection`` is given (``ServerRestart``).

Only a connection to the embedded server gets one; a connection to any other server has no
restart code path at all (nats-py reconnects by itself, and a call just waits out its deadline).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.aio.client import Client as NATS

from ..errors import StorageFull
from . import embedded
from .connect import _connect_embedded

__all__ = ["EmbeddedRestart"]


class EmbeddedRestart:
    """Checks and restarts the embedded server of ``home`` (see ``retry.ServerRestart``)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._full_pid = 0  # the embedded server seen with a full disk (its streams then stay wedged)

    async def revive(self, nc: NATS) -> NATS | None:
        """Start the server again if it died or hangs; a new client when ``nc`` cannot get back to
        it (None: ``nc`` reconnected by itself)."""
        state, _token = await asyncio.to_thread(embedded.ensure, self.home, verify=True)
        url = nc.connected_url
        same = url is not None and url.port == state.port and not nc.is_closed
        if same:
            for _ in range(200):  # nats-py reconnects by itself to the same port
                if nc.is_connected:
                    return None
                await asyncio.sleep(0.025)
            if nc.is_connected:
                return None
        return await _connect_embedded(state)

    async def hung(self) -> bool:
        """Whether the server does not greet a new connection (stopped, frozen)."""
        return await asyncio.to_thread(embedded.hung, self.home)

    async def restart(self, pid: int) -> None:
        """Stop server ``pid`` and start a new one (the connection then needs ``revive``)."""
        await asyncio.to_thread(embedded.restart, self.home, pid)
        self._full_pid = 0

    async def disk_wedged(self) -> int:
        """Whether the server (which greets new connections: it is not hung) met a full disk and
        space is back. nats-server 2.15 then keeps failing writes to the streams it could not
        write, without a reply, until it restarts (measured); such a write was not stored.
        Returns that server's pid, or 0."""
        state = await asyncio.to_thread(embedded.status, self.home)
        if state is None:
            return 0
        free = await asyncio.to_thread(embedded.free_bytes, self.home)
        if free < embedded.MIN_FREE:
            self._full_pid = state.pid
            return 0  # still full: the call ends in StorageFull at its deadline
        if self._full_pid == state.pid or await asyncio.to_thread(embedded.log_says_disk_full, self.home, state.pid):
            return state.pid
        return 0

    async def limit_grew(self) -> int:
        """After the server refused a write for its storage limit: the pid of the server to
        restart when freed space allows a higher limit, or 0. nats-server fixes the limit at
        start, so without a restart the space freed since would never be used."""
        state = await asyncio.to_thread(embedded.status, self.home)
        if state is None or not await asyncio.to_thread(embedded.store_limit_grew, self.home):
            return 0
        return state.pid

    def limit_error(self) -> StorageFull:
        return StorageFull(
            f"disk full: the embedded server keeps a quarter of the disk holding {self.home} free, and "
            "its data fills the rest; this write was not stored; free space (delete keys or conversations, "
            "or other files), and writes work again by themselves"
        )

    async def disk_full(self) -> StorageFull | None:
        """At a call's deadline: ``StorageFull`` when the server's disk is full."""
        try:
            free = await asyncio.to_thread(embedded.free_bytes, self.home)
        except OSError:
            return None
        if free >= embedded.MIN_FREE:
            return None
        state = await asyncio.to_thread(embedded.status, self.home)
        if state is not None:
            self._full_pid = state.pid
        return embedded.disk_full_error(self.home, free)

    async def store_full(self) -> StorageFull | None:
        """When creating a stream failed (10049): ``StorageFull`` if the disk is full."""
        free = await asyncio.to_thread(embedded.free_bytes, self.home)
        if free < embedded.MIN_FREE:
            return embedded.disk_full_error(self.home, free)
        return None
