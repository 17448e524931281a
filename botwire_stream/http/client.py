"""One ``httpx.AsyncClient`` per event loop and server (shared by every backend opened on it,
closed with its last user), error mapping, a server-sent-events reader, and the resuming live
feed built on it (``SseFeed``)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from .. import errors
from ..settings import ConnectOptions, redact

__all__ = ["Http", "SseFeed", "acquire", "seg"]

R = TypeVar("R")


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

    async def lines(self, path: str, params: dict[str, Any]) -> AsyncIterator[bytes]:
        """Each line of a streamed NDJSON answer, read as it arrives (memory bounded by a line)."""
        try:
            async with self.client.stream(
                "GET", self.base + path, params=params, timeout=httpx.Timeout(10.0, read=60.0)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise_for(response)
                async for line in response.aiter_lines():
                    if line:
                        yield line.encode()
        except httpx.TransportError as exc:
            raise errors.ServerUnavailable(f"the stream from {redact(self.base)} broke: {exc!r}") from exc

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


class SseFeed(Generic[R]):
    """Live items over SSE from ``path``: a response that ends (the server's SSE lifetime, a
    restart) is reopened with ``Last-Event-ID`` = the position of the last item delivered, so
    nothing is skipped or repeated; ``ServerUnavailable`` (raised by the reader) when it cannot
    reopen. ``start`` returns once the server has subscribed. Subclasses decode one event."""

    def __init__(self, http: Http, path: str, params: dict[str, Any], after: int | None) -> None:
        self._http, self._path, self._params, self._last = http, path, params, after
        self._queue: asyncio.Queue[R | BaseException | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Future[None] | None = None

    def _decode(self, data: bytes) -> tuple[int, R]:
        """One event's ``data``: its position (what a reopen resumes after) and the item."""
        raise NotImplementedError

    async def start(self) -> object:
        if self._task is None:
            self._subscribed = asyncio.get_running_loop().create_future()
            self._task = asyncio.ensure_future(self._run())
        assert self._subscribed is not None
        await asyncio.shield(self._subscribed)
        return self

    async def _run(self) -> None:
        assert self._subscribed is not None
        try:
            while True:
                last = None if self._last is None else str(self._last)
                async for _, data in self._http.events(self._path, self._params, last):
                    if not data:
                        if not self._subscribed.done():
                            self._subscribed.set_result(None)
                        continue
                    self._last, item = self._decode(data)
                    self._queue.put_nowait(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            if not self._subscribed.done():
                self._subscribed.set_exception(exc)
                self._subscribed.exception()  # seen by start
            if not isinstance(exc, asyncio.CancelledError):
                self._queue.put_nowait(exc)

    def __aiter__(self) -> SseFeed[R]:
        return self

    async def __anext__(self) -> R:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._queue.put_nowait(None)


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
