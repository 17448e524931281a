"""The ``/v1/ns/{namespace}/...`` dispatcher: parses the path (``rest.raw_segments``), checks
the namespace, hands keys to ``rest_keys`` and conversations to ``rest_chat``, and turns every
refusal into the JSON error body."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from .. import keys
from .rest import Namespaces, RestError, raw_segments, rest_error
from .rest_chat import ChatRoutes
from .rest_keys import KeyRoutes
from .rest_replay import ReplayRoutes

__all__ = ["PREFIX", "RestApi"]

PREFIX = b"/v1/ns/"


class RestApi:
    def __init__(self, spaces: Namespaces, sse_lifetime: float, stop: asyncio.Event) -> None:
        self.keys = KeyRoutes(spaces, sse_lifetime, stop)
        self.chats = ChatRoutes(spaces, sse_lifetime, stop)
        self.replay = ReplayRoutes(spaces)

    async def __call__(self, request: Request) -> Response:
        try:
            parts = raw_segments(request, PREFIX)
            namespace = keys.check_namespace(parts[0])
            rest = parts[1:]
            if rest and rest[0] in ("keys", "watch"):
                return await self.keys(request, namespace, rest)
            if rest and rest[0] == "chats":
                return await self.chats(request, namespace, rest)
            if rest and rest[0] in ("replay", "past"):
                return await self.replay(request, namespace, rest)
            raise RestError(404, "not_found", "no such route: see /openapi.json")
        except Exception as exc:  # noqa: BLE001 - rest_error re-raises what it does not map
            return rest_error(exc)
