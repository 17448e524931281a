"""What the REST API (``/v1/ns/...``) and the hosted wire format (``/memory/...``) share.

Paths are split on ``/`` before they are percent-decoded, and each segment is decoded as strict
UTF-8: ``%2F`` stays inside its segment (a key or session id may hold ``/``), so no crafted key
or session id can move a request into another namespace; the namespace segment is then checked
like the library's (``keys.check_namespace``). Errors of the library's tree go out with their
``http_status`` and ``{"error": {"code", "message"}}``; nothing is written before a request
is fully validated (the cores validate before their first storage call).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from .. import errors
from ..chat import AsyncChatHistory
from ..memory import AsyncMemory
from . import NATS_TIMEOUT
from .headers import COMMON

__all__ = ["Namespaces", "RestError", "decode_body", "json_response", "raw_segments", "rest_error"]

T = TypeVar("T")
_JSON = {"content-type": "application/json"}
# The largest body a REST request may carry: one 64 MiB value (the library's limit) and its JSON.
MAX_BODY = 64 * 1024 * 1024 + 4096


class RestError(Exception):
    """A refusal of the REST layer itself (no such route, method not allowed): status and code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ErrorBody(msgspec.Struct):
    code: str
    message: str


class ErrorResponse(msgspec.Struct):
    """Every refusal: ``code`` names the error class (``invalid_key``, ``conflict``...)."""

    error: ErrorBody


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status, {**COMMON, **_JSON, **(headers or {})})


def rest_error(exc: BaseException, headers: dict[str, str] | None = None) -> Response:
    """The JSON refusal for ``exc``: a ``RestError``, a ``BotWireError`` (its ``http_status``
    and ``code``) or a body msgspec refused (400 ``invalid_argument``); anything else is raised."""
    if isinstance(exc, RestError):
        status, code, message = exc.status, exc.code, exc.message
    elif isinstance(exc, errors.BotWireError):
        status, code, message = exc.http_status, exc.code, str(exc)
    elif isinstance(exc, (msgspec.ValidationError, msgspec.DecodeError)):
        status, code, message = 400, errors.InvalidArgument.code, f"invalid body: {exc}"
    else:
        raise exc
    return json_response(ErrorResponse(ErrorBody(code, message[:1000])), status, headers)


def raw_segments(request: Request, prefix: bytes) -> list[str]:
    """The path after ``prefix`` as percent-decoded segments (``InvalidArgument`` for invalid UTF-8)."""
    raw: bytes = request.scope.get("raw_path") or request.url.path.encode()
    if not raw.startswith(prefix):
        # auth decides the namespace on the decoded path: an encoded prefix (/v1/%6Es/...) cut
        # at the prefix's length here named another namespace than the one auth checked (QA-9)
        raise errors.InvalidArgument("the route prefix must not be percent-encoded")
    rest = raw[len(prefix) :]
    out = []
    for part in rest.split(b"/"):
        try:
            out.append(unquote_to_bytes(part).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise errors.InvalidArgument("the path holds a percent-encoded sequence that is not UTF-8") from exc
    return out


async def read_body(request: Request, limit: int = MAX_BODY) -> bytearray:
    """The body, at most ``limit`` bytes (``ValueTooLarge`` as soon as it is more), in one buffer
    grown in place: a list of chunks joined at the end held the body twice (a 64 MiB PUT's peak
    memory was 4 bodies, measured; tests/test_serve_review_attack.py)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise errors.ValueTooLarge(f"the body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise errors.ValueTooLarge(f"the body is larger than {limit} bytes")
        body += chunk
    return body


async def decode_body(request: Request, kind: type[T], limit: int = MAX_BODY) -> T:
    """The request's JSON body as ``kind`` (msgspec validates it: 400 on any mismatch); a body not
    sent as ``application/json`` (or ``+json``) is 415: a form or text/plain POST is what any web
    page may send cross-site without a preflight, and it appended to conversations (QA-9)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise RestError(415, "unsupported_media_type", f"send the body as application/json, not {media or 'no content type'}")
    return msgspec.json.decode(await read_body(request, limit), type=kind)


class Namespaces:
    """One ``AsyncMemory`` per namespace, opened on first use and kept (each holds the namespace's
    bucket handle over the server's one shared NATS connection), and conversations per request.

    At most ``max_open`` are kept, the least recently used dropped first: a server addressed with
    many namespaces (one per tenant or user) would otherwise grow without bound. A dropped one is
    closed ``grace`` seconds later, so that a request (or an SSE watch, at most ``grace`` long)
    still using it finishes; the namespace is opened again on its next request."""

    def __init__(self, connect: dict[str, str | None], *, max_open: int = 1024, grace: float = 180.0) -> None:
        self.connect = connect
        self.max_open, self.grace = max_open, grace
        self._memories: OrderedDict[str, AsyncMemory] = OrderedDict()
        self._retiring: dict[asyncio.Task[None], AsyncMemory] = {}
        self._lock = asyncio.Lock()

    def memory(self, namespace: str) -> AsyncMemory:
        """The namespace's memory (``InvalidNamespace`` for a bad name, before anything opens)."""
        mem = self._memories.get(namespace)
        if mem is None:
            mem = AsyncMemory(namespace, timeout=NATS_TIMEOUT, **self.connect)  # type: ignore[arg-type]
            self._memories[namespace] = mem
            while len(self._memories) > self.max_open:
                self._retire(self._memories.popitem(last=False)[1])
        else:
            self._memories.move_to_end(namespace)
        return mem

    def _retire(self, mem: AsyncMemory) -> None:
        async def later() -> None:
            await asyncio.sleep(self.grace)
            await mem.close()

        task = asyncio.ensure_future(later())
        self._retiring[task] = mem
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    def chat(self, namespace: str, session_id: str, ttl: float | None = None) -> AsyncChatHistory:
        return AsyncChatHistory(session_id, namespace=namespace, ttl=ttl, timeout=NATS_TIMEOUT, **self.connect)  # type: ignore[arg-type]

    async def close(self) -> None:
        memories, self._memories = self._memories, OrderedDict()
        retiring, self._retiring = self._retiring, {}
        for task in retiring:
            task.cancel()
        for mem in [*memories.values(), *retiring.values()]:
            await mem.close()


Handler = Callable[[Request], Any]
