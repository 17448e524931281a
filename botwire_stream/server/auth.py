"""Auth and quotas for ``botwire serve``: a pure ASGI middleware in front of the whole app.

Every request is mapped to the namespace it addresses and the scope it needs (``resolve``), then:

- with auth on (``--auth``, implied by ``--public``): ``Authorization: Bearer <key>`` must name a
  live key (else 401 with ``WWW-Authenticate``) whose globs reach the namespace and whose scope
  (read < write < admin) covers the request (else 403). Without a key, only namespaces the
  operator opened with ``--public GLOB`` are served, for reads and writes, never admin.
- quotas (per key, per ``--public`` namespace, per ``--quota`` namespace rule): past a limit the
  request gets 429 with ``Retry-After`` and nothing reaches the app, so nothing is written.
  Counted requests carry the IETF draft's ``RateLimit-Limit/-Remaining/-Reset`` headers.

Pure ASGI rather than ``BaseHTTPMiddleware``: that one copies every body through a task and a
memory stream, which would tax token streaming and SSE.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import nats.errors
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import BotWireError
from ..nats.jetstream import Connection
from .headers import COMMON
from .keystore import ApiKey, KeyStore, allows
from .protocol import PREFIX, ProtocolError, source_path, stream_path
from .quota import Counted, Counters, Limits, Rule

__all__ = ["OPEN_PATHS", "ROUTES", "AuthMiddleware", "Policy", "Refusal", "Target", "resolve"]

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs"})  # no namespace, no key
_READS = frozenset({"GET", "HEAD"})
_REALM = 'Bearer realm="botwire"'


class Refusal(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Target:
    """What a request addresses: ``namespace`` None is server-wide (an admin key for '*')."""

    namespace: str | None
    need: str  # read, write or admin
    reads: tuple[str, ...] = ()  # other namespaces the request reads (a fork's source)
    deletes: bool = False  # a DELETE: it frees bytes, so a namespace over its bytes limit takes it

    @property
    def writes(self) -> bool:
        return self.need != "read"


def _checked(namespace: str) -> str:
    if namespace in ("", ".", ".."):
        raise Refusal(400, "the path names no namespace")
    return namespace


def _need(method: str) -> str:
    return "read" if method in _READS else "write"


def _stream_target(scope: Scope) -> Target:
    """``/v1/stream/chat/<ns>/<session>`` (a conversation) and ``/v1/stream/answers/<ns>/<id>`` (a
    chat answer): namespace ``ns``; any other ``/v1/stream/<path>``: the path's first segment.
    Decided on the decoded path, as the handlers route (``chat%2Fns%2Fs`` is the conversation
    ``ns/s``), so the namespace checked is the one served."""
    raw = scope.get("raw_path") or scope["path"].encode()
    try:
        name = stream_path(raw)
    except ProtocolError as exc:
        raise Refusal(exc.status, exc.message) from None
    reads: tuple[str, ...] = ()
    source = next((v for k, v in scope["headers"] if k == b"stream-forked-from"), None)
    if source is not None and scope["method"] == "PUT":  # a fork copies its source: it reads there
        try:
            reads = (_namespace_of(source_path(source.decode("latin-1"))),)
        except ProtocolError as exc:
            raise Refusal(exc.status, exc.message) from None
    return Target(_namespace_of(name), _need(scope["method"]), reads, scope["method"] == "DELETE")


_SCOPED = ("chat/", "answers/")  # stream paths whose second segment is the namespace


def _namespace_of(name: str) -> str:
    """The namespace a decoded stream path belongs to."""
    for reserved in _SCOPED:
        if name.startswith(reserved):
            name = name[len(reserved) :]
            break
    return _checked(name.partition("/")[0])


def _prefixed(prefix: str) -> Callable[[Scope], Target]:
    """``<prefix><ns>[/...]`` (the REST and hosted routes, matched by Starlette on the decoded
    path): namespace ``ns``; a DELETE of the whole namespace needs admin."""

    def target(scope: Scope) -> Target:
        ns, _, rest = scope["path"][len(prefix) :].partition("/")
        method = scope["method"]
        need = "admin" if method == "DELETE" and not rest else _need(method)
        return Target(_checked(ns), need, deletes=method == "DELETE")

    return target


# Route prefix -> how to find its namespace; the first matching prefix wins. A path matching
# none (and not in OPEN_PATHS) is server-wide: only an admin key for every namespace passes.
ROUTES: list[tuple[str, Callable[[Scope], Target]]] = [
    (PREFIX, _stream_target),
    ("/v1/ns/", _prefixed("/v1/ns/")),
    ("/memory/", _prefixed("/memory/")),
    ("/v1/chat/", _prefixed("/v1/chat/")),
]


def resolve(scope: Scope) -> Target | None:
    """The request's target, None for the open paths; ``Refusal`` for a path naming no namespace."""
    path: str = scope["path"]
    if path in OPEN_PATHS or path == "/" or path.startswith("/static/"):  # the chat page holds no data
        return None
    for prefix, target in ROUTES:
        if path.startswith(prefix):
            return target(scope)
    return Target(None, "admin")


@dataclass
class Policy:
    """The operator's settings: ``auth`` (keys required), ``public`` (anonymous namespaces and
    their limits), ``quotas`` (limits per namespace for every caller), and how to reach NATS."""

    auth: bool = False
    public: list[Rule] = field(default_factory=list)
    quotas: list[Rule] = field(default_factory=list)
    connect: dict[str, str | None] = field(default_factory=dict)
    _conn: Connection | None = None
    _keys: KeyStore | None = None
    _counters: Counters | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def active(self) -> bool:
        return self.auth or bool(self.public) or bool(self.quotas)

    async def _open(self) -> tuple[KeyStore, Counters]:
        if self._keys is None or self._counters is None:
            async with self._lock:
                if self._keys is None or self._counters is None:
                    from ..nats.pool import open_connection
                    from ..settings import resolve as resolve_settings

                    self._conn = await open_connection(resolve_settings(**self.connect))
                    self._counters = Counters(self._conn)
                    self._keys = await KeyStore.open(self._conn)
        return self._keys, self._counters

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def caller(self, scope: Scope, target: Target) -> tuple[ApiKey | None, Rule | None]:
        """The key (or, anonymous, the ``--public`` rule) that admits the request; ``Refusal``."""
        keys, _ = await self._open()
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if header is None:
            public = None
            if target.namespace is not None and target.need != "admin":
                public = next((r for r in self.public if r.matches(target.namespace)), None)
                if public is not None and not all(any(r.matches(ns) for r in self.public) for ns in target.reads):
                    public = None
            if public is None:
                raise Refusal(401, "an API key is required: Authorization: Bearer <key>", {"www-authenticate": _REALM})
            return None, public
        scheme, _, token = header.decode("latin-1").partition(" ")
        key = await keys.verify(token.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise Refusal(
                401,
                "the API key is not valid (unknown, malformed or revoked)",
                {"www-authenticate": _REALM + ', error="invalid_token"'},
            )
        reaches = "*" in key.namespaces if target.namespace is None else key.reaches(target.namespace)
        reaches = reaches and all(key.reaches(ns) for ns in target.reads)
        if not reaches:
            raise Refusal(403, "this API key does not reach this namespace")
        if not allows(key.scope, target.need):
            raise Refusal(403, f"this API key's scope ({key.scope}) does not allow this request (needs {target.need})")
        task = asyncio.ensure_future(keys.touch(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return key, None

    def limits(self, target: Target, key: ApiKey | None, public: Rule | None) -> list[tuple[str, Limits]]:
        """The limits that apply, each with the name its counters are kept under."""
        found: list[tuple[str, Limits]] = []
        if key is not None and (key.writes_per_day is not None or key.requests_per_second is not None):
            found.append(("key:" + key.id, Limits(key.writes_per_day, key.requests_per_second)))
        if target.namespace is not None:
            if public is not None:
                found.append(("public:" + target.namespace, public.limits))
            rule = next((r for r in self.quotas if r.matches(target.namespace)), None)
            if rule is not None:
                found.append(("ns:" + target.namespace, rule.limits))
        return found

    async def count(self, target: Target, limits: list[tuple[str, Limits]]) -> tuple[list[Counted], list[Counted]]:
        """Take one unit from every window that applies: (all taken, write windows taken)."""
        _, counters = await self._open()
        jobs = []
        for who, lim in limits:
            if lim.requests_per_second is not None:
                jobs.append(("sec", who, lim.requests_per_second))
            if target.writes and lim.writes_per_day is not None:
                jobs.append(("day", who, lim.writes_per_day))
        if target.writes and not target.deletes and target.namespace is not None:
            # a DELETE passes: refused, a namespace over its bytes could never be emptied (QA-9)
            cap = min((lim.max_bytes for _, lim in limits if lim.max_bytes is not None), default=None)
            if cap is not None and (size := await counters.namespace_bytes(target.namespace)) >= cap:
                raise Refusal(
                    429,
                    f"the namespace holds {size} bytes, at or over its limit of {cap}; delete keys or conversations to write again",
                    {"retry-after": "60"},
                )
        if not jobs:
            return [], []
        taken = await asyncio.gather(*(counters.take(kind, who, n) for kind, who, n in jobs))
        return list(taken), [c for c, (kind, _, _) in zip(taken, jobs) if kind == "day"]


def _rate_headers(c: Counted) -> list[tuple[bytes, bytes]]:
    return [
        (b"ratelimit-limit", str(c.limit).encode()),
        (b"ratelimit-remaining", str(c.remaining).encode()),
        (b"ratelimit-reset", str(c.reset).encode()),
    ]


async def _reply(send: Send, status: int, message: str, headers: dict[str, str] | list[tuple[bytes, bytes]]) -> None:
    body = message.encode()
    out = [(k.encode(), v.encode()) for k, v in COMMON.items()]
    out += [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    out += [(k.encode(), v.encode()) for k, v in headers.items()] if isinstance(headers, dict) else list(headers)
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Wraps the app (``AuthMiddleware(app, policy)``); see the module docstring."""

    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._closing(receive), send)
            return
        if scope["type"] != "http" or scope["method"] == "OPTIONS":  # CORS preflights carry no key
            await self.app(scope, receive, send)
            return
        policy = self.policy
        try:
            target = resolve(scope)
            if target is None:
                await self.app(scope, receive, send)
                return
            key, public = (await policy.caller(scope, target)) if policy.auth else (None, None)
            taken, writes = await policy.count(target, policy.limits(target, key, public))
        except Refusal as exc:
            await _reply(send, exc.status, exc.message, exc.headers)
            return
        except (BotWireError, nats.errors.Error, OSError, RuntimeError) as exc:
            # NATS unreachable or slow while checking: refuse (nothing reaches the app, nothing is written)
            await _reply(
                send,
                503,
                "cannot check the API key or quota now: " + str(exc).split("\n", 1)[0][:200],
                {"retry-after": "1"},
            )
            return
        over = [c for c in taken if c.exceeded]
        if over:
            for c in taken:
                if not c.exceeded:
                    await policy._counters.give_back(c)  # type: ignore[union-attr]
            worst = max(over, key=lambda c: c.reset)
            await _reply(
                send,
                429,
                "quota exceeded; retry after the Retry-After seconds",
                [(b"retry-after", str(worst.reset).encode()), *_rate_headers(worst)],
            )
            return
        if not taken:
            await self.app(scope, receive, send)
            return
        tightest = min(taken, key=lambda c: c.remaining)
        status = 0

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *_rate_headers(tightest)]}
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            if writes and 400 <= status < 500:
                # refused as bad input, not found or conflict: nothing was written, the write is not spent
                for c in writes:
                    with contextlib.suppress(Exception):
                        await policy._counters.give_back(c)  # type: ignore[union-attr]

    def _closing(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.policy.close()
            return message

        return wrapped
