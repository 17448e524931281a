"""Running the app on uvicorn; SIGTERM/SIGINT first end open long-polls and SSE (they answer at
once), then uvicorn finishes the requests in flight and stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import FrameType

import uvicorn

from .app import create_app
from .auth import AuthMiddleware, Policy

__all__ = ["serve"]

_KEEP_ALIVE = 30  # seconds an idle kept-alive HTTP connection stays open (see serve)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, stop: asyncio.Event) -> None:
        super().__init__(config)
        self._stop = stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._stop.set)
        super().handle_exit(sig, frame)
        # uvicorn (0.29+) raises the signal again once shut down, so the process would end
        # "killed by SIGTERM" (-15) after a clean shutdown; `botwire serve` exits 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    url: str | None = None,
    long_poll_timeout: float = 20.0,
    sse_lifetime: float = 60.0,
    log_level: str = "warning",
    ready: Callable[[str], None] | None = None,
    policy: Policy | None = None,
    access_log: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT (on uvloop and httptools when installed: the ``server`` extra
    brings them; uvicorn picks them by itself); ``ready`` is called with the server's base URL once
    it answers (with ``port=0``, the port the system chose); ``policy``: auth and quotas
    (``auth.Policy``); ``access_log``: one JSON line per request on stderr (``server.ops.Observed``)."""
    if access_log:
        logger = logging.getLogger("botwire.access")
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    stop = asyncio.Event()  # bound to the server's loop on first use
    app = create_app(url=url, long_poll_timeout=long_poll_timeout, sse_lifetime=sse_lifetime, stop=stop)
    if policy is not None and policy.active:
        policy.connect = {"url": url, **policy.connect}
        active = policy  # inside the metrics: quota rejections and auth refusals are counted
        app.guard(lambda inner: AuthMiddleware(inner, active))
    asgi = app
    # An idle kept-alive connection stays open longer than clients keep theirs (Node's fetch: 4 s,
    # uvicorn's default: 5 s): a client reusing one the server was closing at that moment met
    # "other side closed" on a POST, which it does not retry (the Durable Streams suite's 10 MiB
    # POST, once on a loaded machine).
    config = uvicorn.Config(
        asgi,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=_KEEP_ALIVE,
        lifespan="on",
        access_log=False,
    )
    server = _Server(config, stop)

    async def main() -> None:
        if ready is None:
            await server.serve()
            return

        async def announce() -> None:
            while not server.started:
                if server.should_exit:
                    return
                await asyncio.sleep(0.01)
            sockets = [s for srv in server.servers for s in srv.sockets]
            ready(f"http://{host}:{sockets[0].getsockname()[1] if sockets else port}/")

        told = asyncio.ensure_future(announce())
        try:
            await server.serve()
        finally:
            told.cancel()

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())
