"""One ``httpx.AsyncClient`` per event loop and server (shared by every backend opened on it,
closed with its last user), error mapping, and a server-sent-events reader."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import msgspec

from .. import errors
from ..settings import ConnectOptions, redact

__all__ = ["Http", "acquire", "seg"]


def _codes() -> dict[str, type[errors.BotWireError]]:
    out: dict[str, type[errors.BotWireError]] = {}
    stack: list[type[errors.BotWireError]] = [errors.BotWireError]
    while stack:
        cls = stack.pop()
        out.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    return out


_CODES = _codes()


class _ErrorBody(msgspec.Struct):
    code: str
    message: str


class _Error(msgspec.Struct):
    error: _ErrorBody


# statuses the auth middleware answers without an error body
_REFUSALS: dict[int, type[errors.BotWireError]] = {401: errors.Unauthorized, 403: errors.Unauthorized, 429: errors.QuotaExceeded}


def seg(text: str) -> str:
    """``text`` as one path segment (every reserved character percent-encoded, ``/`` too)."""
    return quote(text, safe="")


def raise_for(response: httpx.Response) -> None:
    """Raise the error the server named (its ``code``), else ``ServerUnavailable``."""
    if response.status_code < 400:
        return
    try:
        body = msgspec.json.decode(response.content, type=_Error)
    except (msgspec.ValidationError, msgspec.DecodeError):
        # auth and quotas refuse in text/plain before any route (server.auth): as ServerUnavailable,
        # a wrong key or a spent quota looked like an outage worth retrying (QA-9)
        refused = _REFUSALS.get(response.status_code)
        if refused is not None:
            raise refused(f"the botwire server refused the request ({response.status_code}): {response.text[:200]}") from None
        raise errors.ServerUnavailable(
            f"the botwire server answered {response.status_code} without an error body: {response.text[:200]!r}"
        ) from None
    cls = _CODES.get(body.error.code)
    if cls is None:
        cls = errors.ServerUnavailable if response.status_code >= 500 else errors.BotWireError
    raise cls(body.error.message)


class Http:
    """Requests to one server through a shared client; transport failures become our errors:
    ``ServerUnavailable`` when nothing was sent, ``OutcomeUnknown`` for a write sent but not
    answered (``what`` names it)."""

    def __init__(self, base: str, client: httpx.AsyncClient, release: Any) -> None:
        self.base, self.client, self._release = base, client, release

    async def request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, content: bytes | None = None,
        what: str | None = None, ok404: bool = False, timeout: float | None = None,
    ) -> httpx.Response:
        headers = {"content-type": "application/json"} if content is not None else None
        try:
            response = await self.client.request(
                method, self.base + path, params=params, content=content, headers=headers,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise errors.ServerUnavailable(f"cannot reach the botwire HTTP server at {redact(self.base)}: {exc}") from exc
        except httpx.TransportError as exc:
            if what is not None:
                raise errors.OutcomeUnknown(
                    f"the {what} was sent to {redact(self.base)} but not answered ({exc!r}): it may or may not be stored; "
                    + ("repeating it is safe" if what == "set" else "read before repeating it")
                ) from exc
            raise errors.ServerUnavailable(f"the botwire server at {redact(self.base)} did not answer: {exc!r}") from exc
        if not (ok404 and response.status_code == 404):
            raise_for(response)
        return response

    async def events(self, path: str, params: dict[str, Any], last_id: str | None) -> AsyncIterator[tuple[str, bytes]]:
        """``(id, data)`` of each SSE event (``("", b"")`` once for the opening comment, which the
        server sends once subscribed); ends when the server ends the response."""
        headers = {"accept": "text/event-stream"}
        if last_id:
            headers["last-event-id"] = last_id
        try:
            async with self.client.stream(
                "GET", self.base + path, params=params, headers=headers, timeout=httpx.Timeout(10.0, read=None)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise_for(response)
                ident, data = "", b""
                async for line in response.aiter_lines():
                    if line.startswith(":"):
                        if line.startswith(": live"):
                            yield "", b""
                    elif line.startswith("id: "):
                        ident = line[4:]
                    elif line.startswith("data:"):
                        data = line[5:].encode()
                    elif line == "" and data:
                        yield ident, data
                        ident, data = "", b""
        except httpx.TransportError as exc:
            raise errors.ServerUnavailable(f"the live feed from {redact(self.base)} broke: {exc!r}") from exc

    async def close(self) -> None:
        await self._release()


# per event loop (weakly: a loop that ends without closing its backends takes its clients along)
_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str | None], tuple[httpx.AsyncClient, int]]] = (
    weakref.WeakKeyDictionary()
)


def acquire(opts: ConnectOptions, timeout: float) -> Http:
    """The shared client of this event loop for ``opts`` (``token`` sent as a bearer API key)."""
    assert opts.servers
    base = opts.servers[0].rstrip("/")
    _clients = _loops.setdefault(asyncio.get_running_loop(), {})
    key = (base, opts.token)
    entry = _clients.get(key)
    if entry is None or entry[0].is_closed:
        headers = {"authorization": f"Bearer {opts.token}"} if opts.token else {}
        # a timeout a little over the server's own NATS timeout, so that its answer (503) arrives first
        # (no pool timeout: a request waits for one of the 100 connections, then has its own timeout;
        # 1100 concurrent appends timed out in the pool otherwise)
        client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout + 5.0, pool=None))
        entry = (client, 0)
    _clients[key] = (entry[0], entry[1] + 1)

    async def release() -> None:
        client, refs = _clients.get(key, (entry[0], 1))
        if refs <= 1:
            _clients.pop(key, None)
            await client.aclose()
        else:
            _clients[key] = (client, refs - 1)

    return Http(base, entry[0], release)
