"""The ASGI app: ``create_app(url=...)`` opens ``TokenStreams`` on start and routes
``/v1/stream/...`` to token streams, or to conversations under ``chat/``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..tokens import open_token_streams
from . import NATS_TIMEOUT
from .chat import CHAT_PREFIX, Conversations
from .chatapi import ChatService
from .hosted import Hosted
from .model import ChatModel, model_from_env
from .openapi import docs_page, document
from .ops import Observed, Ops
from .protocol import ProtocolError, stream_path
from .rest import Namespaces, json_response
from .rest_api import RestApi
from .streams import Streams, error_response, respond

__all__ = ["App", "create_app"]

_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]


def create_app(
    *,
    url: str | None = None,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    long_poll_timeout: float = 20.0,
    sse_lifetime: float = 60.0,
    stop: asyncio.Event | None = None,
    model: ChatModel | None = None,
    lease_ttl: int = 5,
) -> App:
    """The app. ``long_poll_timeout``: how long a long-poll (and an idle SSE) waits before an
    empty answer; ``sse_lifetime``: SSE connections end after this (clients reconnect from their
    offset); ``stop``: set it to end open long-polls and SSE at once (graceful shutdown);
    ``model``: the chat endpoint's model (default: ``model_from_env()``); ``lease_ttl``: seconds
    after which an answer whose producer died is closed as incomplete (see ``chatapi``)."""
    connect = {"url": url, "token": token, "user": user, "password": password, "creds": creds}
    handlers: dict[str, object] = {}
    service = ChatService(connect, model if model is not None else model_from_env(), lease_ttl=lease_ttl)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ending = stop if stop is not None else asyncio.Event()
        store, client = await open_token_streams(
            url=url, token=token, user=user, password=password, creds=creds, timeout=NATS_TIMEOUT
        )
        max_body = store._b.max_chunk
        handlers["streams"] = Streams(store, max_body, long_poll_timeout, sse_lifetime, ending)
        handlers["chat"] = Conversations(connect, long_poll_timeout, sse_lifetime, ending)
        spaces = Namespaces(connect)
        handlers["rest"] = RestApi(spaces, sse_lifetime, ending)
        handlers["hosted"] = Hosted(spaces)
        handlers["ops"] = Ops(spaces)
        await service.start(store)
        try:
            yield
        finally:
            ending.set()
            await service.close()
            await spaces.close()
            await client.close()

    async def endpoint(request: Request) -> Response:
        streams = handlers["streams"]
        assert isinstance(streams, Streams)
        raw = request.scope.get("raw_path") or request.url.path.encode()
        # on the decoded path: /v1/stream/chat%2Fns%2Fs names the conversation chat/ns/s too
        # (matched on the raw bytes, a PUT there created a token stream by that name)
        if unquote_to_bytes(raw).startswith(b"/v1/stream/" + CHAT_PREFIX.encode()):
            try:
                name = stream_path(raw)
            except ProtocolError as exc:
                return error_response(exc)
            chat = handlers["chat"]
            assert isinstance(chat, Conversations)
            return await chat(request, name)
        return await streams(request)

    async def not_found(request: Request) -> Response:
        return respond(404, b"not found", {"content-type": "text/plain"})

    def handler(name: str, attr: str | None = None) -> Callable[[Request], Awaitable[Response]]:
        async def call(request: Request) -> Response:
            target: Any = handlers[name]
            fn = getattr(target, attr) if attr else target
            result: Response = await fn(request)
            return result

        return call

    async def openapi(request: Request) -> Response:
        return json_response(document())

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_page())

    async def metrics(request: Request) -> Response:
        return Response(app.observed.metrics(), 200, {"content-type": "text/plain; version=0.0.4; charset=utf-8"})

    # REST (/v1/ns/), the hosted wire format (/memory/) and operations go through Starlette, so
    # middleware added to ``App.starlette`` (auth, quotas, metrics) covers them.
    star = Starlette(
        routes=[
            Route("/v1/stream/{path:path}", endpoint, methods=_METHODS),
            Route("/v1/ns/{path:path}", handler("rest"), methods=_METHODS),
            Route("/memory/{path:path}", handler("hosted"), methods=_METHODS),
            Route("/openapi.json", openapi),
            Route("/docs", docs),
            Route("/healthz", handler("ops", "healthz")),
            Route("/readyz", handler("ops", "readyz")),
            Route("/metrics", metrics),
            *service.routes(),
            Route("/{rest:path}", not_found),
        ],
        lifespan=lifespan,
    )
    app = App(star, endpoint, handlers)
    return app


class App:
    """The ASGI app: requests under ``/v1/stream/`` go straight to their endpoint (Starlette's
    middleware and router cost ~0.1 ms of a ~1.2 ms append over HTTP, measured); everything else
    (lifespan, other routes added to ``starlette``) goes through the Starlette app."""

    def __init__(self, starlette: Starlette, endpoint: Callable[[Request], Awaitable[Response]], handlers: dict[str, object]) -> None:
        self.starlette = starlette
        self._endpoint = endpoint
        self._handlers = handlers
        self.observed = Observed(self._dispatch)  # metrics and access logs of every request

    def guard(self, wrap: Callable[[ASGIApp], ASGIApp]) -> None:
        """Put a middleware (auth and quotas) inside the metrics and access logs, so that its
        refusals (401, 403, 429) are counted and logged like every other response."""
        self.observed.app = wrap(self.observed.app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.observed(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/stream/") and self._handlers:
            response = await self._endpoint(Request(scope, receive))
            await response(scope, receive, send)
            return
        await self.starlette(scope, receive, send)

