"""Operations: ``/healthz`` (the process answers), ``/readyz`` (NATS answers), Prometheus
``/metrics`` and structured access logs (``Observed``, wrapping the whole app)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .. import errors
from .rest import Namespaces, json_response

__all__ = ["Observed", "Ops", "route_of"]

_access = logging.getLogger("botwire.access")

# readyz lists one key of this namespace: a round trip to NATS through the connection that
# requests use (the namespace's bucket is created on the first probe, and stays empty).
_PROBE = "botwire-readyz"


class Ops:
    def __init__(self, spaces: Namespaces, timeout: float = 2.0) -> None:
        self.spaces, self.timeout = spaces, timeout

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self.spaces.memory(_PROBE).list_keys("*", limit=1), self.timeout)
        except (errors.BotWireError, TimeoutError) as exc:
            return json_response({"status": "unavailable", "error": str(exc) or "NATS did not answer in time"}, 503)
        return json_response({"status": "ready"})


def route_of(path: str) -> str:
    """A bounded label for a path (never a key, session or stream name: label cardinality)."""
    if path.startswith("/v1/stream/"):
        return "/v1/stream/chat" if path.startswith("/v1/stream/chat/") else "/v1/stream"
    if path.startswith("/v1/ns/"):
        parts = path.split("/")
        kind = parts[4] if len(parts) > 4 else ""
        if kind == "chats":
            action = parts[6] if len(parts) > 6 else ""
            return "/v1/ns/chats/" + action if action in ("messages", "count", "fork", "events") else "/v1/ns/chats"
        return "/v1/ns/" + kind if kind in ("keys", "watch") else "/v1/ns"
    if path.startswith("/memory/"):
        return "/memory"
    if path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        return path
    return "other"


class Observed:
    """ASGI wrapper of the whole app: Prometheus metrics of every request (``/v1/stream/`` too)
    and one structured (JSON) access-log line per request on the ``botwire.access`` logger."""

    def __init__(self, app: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.app = app
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "botwire_http_requests", "HTTP requests by route, method and status", ["route", "method", "status"], registry=self.registry
        )
        self.errors = Counter(
            "botwire_http_errors", "HTTP responses with a status of 400 or more (429: quota rejections)", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "botwire_http_request_duration_seconds", "Time to the end of the response (SSE: its whole life)", ["route", "method"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        size = 0

        async def sending(message: Any) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            elapsed = time.perf_counter() - start
            route, method = route_of(scope["path"]), scope["method"]
            self.requests.labels(route, method, str(status)).inc()
            if status >= 400:
                self.errors.labels(route, str(status)).inc()
            self.latency.labels(route, method).observe(elapsed)
            if _access.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("", 0)
                _access.info(json.dumps({
                    "ts": round(time.time(), 3), "method": method, "path": scope["path"], "route": route,
                    "status": status, "ms": round(elapsed * 1000, 3), "bytes": size, "client": client[0],
                }))

    def metrics(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
