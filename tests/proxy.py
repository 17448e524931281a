"""A loopback TCP relay between a client and a real nats-server, for tests of lost replies.

With ``drop`` set it swallows what the server sends (the server still receives and stores what
the client sends); ``trigger`` sets ``drop`` once the client sends bytes containing it (the write
whose reply must be lost, after the reads that precede it); ``cut()`` then aborts every relayed
connection, so that the client reconnects (through the relay again) without ever having seen the
acknowledgement: exactly what a crash between storing a write and acknowledging it looks like to a
client, but deterministic.
"""

from __future__ import annotations

import asyncio


class Relay:
    """Relays 127.0.0.1:<port> to 127.0.0.1:<upstream>; run it on the test's event loop."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.drop = False
        self.trigger: bytes | None = None
        # When the client sends bytes containing this, only what precedes it reaches the server,
        # then every connection is cut (a write cut in the middle, e.g. between a batch's messages).
        self.cut_at: bytes | None = None
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:  # the server is down: the client sees a closed connection
            writer.transport.abort()
            return
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_server: bool) -> None:
            try:
                while data := await src.read(65536):
                    if not from_server and self.cut_at is not None and (i := data.find(self.cut_at)) >= 0:
                        self.cut_at = None
                        dst.write(data[:i])
                        await dst.drain()
                        self.cut()
                        return
                    if not from_server and self.trigger is not None and self.trigger in data:
                        self.trigger, self.drop = None, True  # swallow the reply to this one
                    if from_server and self.drop:
                        continue
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))

    def cut(self) -> None:
        """Abort every relayed connection (new ones are relayed normally unless ``drop``)."""
        writers, self._writers = self._writers, []
        for w in writers:
            w.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
