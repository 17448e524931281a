"""Operations endpoints: ``/healthz`` (the process answers) and ``/readyz`` (NATS answers)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from .. import errors
from .rest import Namespaces, json_response

__all__ = ["Ops"]

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
