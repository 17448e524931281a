"""A loopback TCP proxy between a client and a server that stalls or cuts connections on demand:
network faults without root (no iptables, no tc), and lost replies for the tests.

``stall()`` stops forwarding in both directions (bytes wait in the proxy, as in a congested or
partitioned link: the TCP connections stay open, so the client notices nothing but silence);
``resume()`` forwards what waited, in order. ``cut()`` aborts every connection (a reset link);
new connections are proxied normally, unless ``refuse`` is set (the server looks down).
"""

from __future__ import annotations

import asyncio
import re

__all__ = ["Proxy"]


class Proxy:
    """Proxies 127.0.0.1:<port> to 127.0.0.1:<upstream>; runs on the caller's event loop."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self.refuse = False
        # Lost replies (tests/test_faults.py): with ``drop`` set, what the server sends is
        # swallowed (the server still stores what the client sends); ``trigger`` sets ``drop`` once
        # the client sends bytes containing it; ``cut_at``: when the client sends bytes containing
        # it, only what precedes it reaches the server, then every connection is cut;
        # ``undrop``: clears ``drop`` once the client sends bytes it matches (replies flow again).
        self.drop = False
        self.trigger: bytes | None = None
        self.undrop: re.Pattern[bytes] | None = None
        self.cut_at: bytes | None = None
        self.connections = 0  # how many client connections were proxied (reconnects show here)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stall(self) -> None:
        """Stop forwarding (both ways) until ``resume``."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Abort every proxied connection now."""
        writers, self._writers = self._writers, []
        for w in writers:
            w.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:  # the server is down: the client sees its connection closed
            writer.transport.abort()
            return
        self.connections += 1
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_server: bool) -> None:
            try:
                while data := await src.read(65536):
                    await self._flowing.wait()
                    if not from_server and self.cut_at is not None and (i := data.find(self.cut_at)) >= 0:
                        self.cut_at = None
                        dst.write(data[:i])
                        await dst.drain()
                        self.cut()
                        return
                    if not from_server and self.trigger is not None and self.trigger in data:
                        self.trigger, self.drop = None, True  # swallow the reply to this one
                    elif not from_server and self.drop and self.undrop is not None and self.undrop.search(data):
                        self.undrop, self.drop = None, False  # the reply to this one gets through
                    if from_server and self.drop:
                        continue
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))
        except asyncio.CancelledError:  # close(): asyncio's stream callback would log a cancelled task
            writer.transport.abort()
            up_writer.transport.abort()

    async def close(self) -> None:
        self.resume()
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
