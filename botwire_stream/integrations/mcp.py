"""A Model Context Protocol server over botwire memory: ``botwire mcp`` (extra ``[mcp]``).

Agents in desktop assistants and IDEs call its tools to read and write the same keys as
``Memory(namespace)`` and the same conversations as ``ChatHistory(session_id, namespace=...)``:
``memory_get``, ``memory_set`` (with ``ttl``), ``memory_delete``, ``memory_keys`` (glob, limit),
``chat_append``, ``chat_read`` (last N) and ``chat_sessions``. Built on the official ``mcp``
SDK (``FastMCP`` in 1.x, ``MCPServer`` in 2.x; both work), which derives each tool's input
schema from the signature and checks the arguments against it.

Only the namespaces matching the configured globs are reachable (``Unauthorized`` otherwise);
with one literal namespace configured, the ``namespace`` argument may be left out. Errors of the
library's tree come back as MCP tool errors (``is_error``) whose text starts with the error's
code (``invalid_key: ...``), and a refused call writes nothing (the library validates first);
an argument a tool does not take is refused too (``invalid_argument``), not ignored.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final, TypeVar

from pydantic import Field

from .. import errors, keys
from ..chat import AsyncChatHistory
from ..memory import AsyncMemory

try:  # mcp 1.x (what crewai's pin, mcp<2, leaves installed) names the server FastMCP; 2.x MCPServer
    from mcp.server.fastmcp import FastMCP as Server
    from mcp.server.fastmcp.exceptions import ToolError

    _HOST_AT_APP = False  # 1.x: the host (for its DNS-rebinding check) is given to the constructor
except ImportError:
    try:
        from mcp.server.mcpserver import MCPServer as Server  # type: ignore[no-redef, import-not-found, unused-ignore]
        from mcp.server.mcpserver.exceptions import ToolError  # type: ignore[no-redef, import-not-found, unused-ignore]

        _HOST_AT_APP = True  # 2.x: to streamable_http_app
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise errors.MissingDependency(
            "the MCP server needs the mcp SDK: pip install 'botwire-stream[mcp]'"
        ) from exc

__all__ = ["MemoryTools", "build_server", "check_globs", "run"]

T = TypeVar("T")

_MAX_LIMIT = 10_000  # keys or sessions one call lists at most
_MAX_LAST = 1_000  # messages one chat_read returns at most

Namespace = Annotated[
    str | None,
    Field(description="The namespace (1-64 of A-Z a-z 0-9 _ -); may be left out when the server has one."),
]
Key = Annotated[str, Field(description="The key, e.g. 'user:42:prefs' (':' separates levels).")]
SessionId = Annotated[str, Field(description="The conversation's id, e.g. 'user-42'.")]


# A namespace glob: namespace characters and fnmatch's * ? [ ] ! (a range's '-' is a namespace one).
_GLOB: Final = re.compile(r"[A-Za-z0-9_\-*?\[\]!]{1,64}")


def check_globs(globs: list[str]) -> None:
    """``InvalidNamespace`` unless each glob is a namespace or an fnmatch glob of namespaces: a
    typo such as ``my app`` or ``my.app`` would otherwise start a server that refuses every call."""
    if not globs:
        raise errors.InvalidArgument("configure at least one namespace glob")
    for glob in globs:
        if not isinstance(glob, str) or not _GLOB.fullmatch(glob):
            raise errors.InvalidNamespace(
                f"namespace {glob!r} is invalid: use 1-64 characters of A-Z, a-z, 0-9, '_' and '-' "
                "(and the glob characters * ? [ ] !)"
            )
        if not any(c in glob for c in "*?["):
            keys.check_namespace(glob)  # a literal: '!' or ']' outside a glob would match nothing


class MemoryTools:
    """The tools' implementation: one ``AsyncMemory`` per namespace (kept), a conversation
    opened per call; ``connect`` holds ``url``/``token``/``creds`` (None: the library's
    defaults, so the embedded server when nothing is configured)."""

    def __init__(self, namespaces: list[str], connect: dict[str, str | None]) -> None:
        check_globs(namespaces)
        self.globs = list(namespaces)
        self.connect = connect
        literal = [g for g in self.globs if not any(c in g for c in "*?[")]
        self.default = literal[0] if len(self.globs) == 1 and literal else None
        self._memories: dict[str, AsyncMemory] = {}

    def namespace(self, namespace: str | None) -> str:
        """The namespace a call addresses, checked: ``InvalidNamespace``, ``Unauthorized``."""
        if namespace is None:
            if self.default is None:
                raise errors.InvalidArgument(f"name a namespace (this server serves {', '.join(self.globs)})")
            return self.default
        keys.check_namespace(namespace)
        if not any(fnmatch.fnmatchcase(namespace, g) for g in self.globs):
            raise errors.Unauthorized(
                f"namespace {namespace!r} is not served here (this server serves {', '.join(self.globs)})"
            )
        return namespace

    def memory(self, namespace: str | None) -> AsyncMemory:
        ns = self.namespace(namespace)
        mem = self._memories.get(ns)
        if mem is None:
            mem = self._memories[ns] = AsyncMemory(ns, **self.connect)  # type: ignore[arg-type]
        return mem

    def chat(self, namespace: str | None, session_id: str) -> AsyncChatHistory:
        return AsyncChatHistory(session_id, namespace=self.namespace(namespace), **self.connect)  # type: ignore[arg-type]

    async def close(self) -> None:
        memories, self._memories = self._memories, {}
        for mem in memories.values():
            await mem.close()

    # -- the tools ------------------------------------------------------------------------------
    async def memory_get(self, key: Key, namespace: Namespace = None) -> dict[str, Any]:
        """Read the value stored under a key: {"found": false} when it has none."""
        mem = self.memory(namespace)
        missing = object()
        value = await mem.get(key, missing)
        return {"found": False} if value is missing else {"found": True, "value": value}

    async def memory_set(
        self,
        key: Key,
        value: Annotated[Any, Field(description="Any JSON value.")],
        ttl: Annotated[float | None, Field(description="Seconds until the key expires (none: never).", gt=0)] = None,
        namespace: Namespace = None,
    ) -> dict[str, Any]:
        """Store a JSON value under a key (replacing its value); returns its new revision."""
        return {"revision": await self.memory(namespace).set(key, value, ttl=ttl)}

    async def memory_delete(self, key: Key, namespace: Namespace = None) -> dict[str, Any]:
        """Delete a key; "deleted" tells whether it held a value."""
        return {"deleted": await self.memory(namespace).delete(key)}

    async def memory_keys(
        self,
        pattern: Annotated[str, Field(description="An fnmatch glob over keys ('*' spans ':' too), e.g. 'user:42:*'.")] = "*",
        limit: Annotated[int, Field(description="At most this many keys.", ge=1, le=_MAX_LIMIT)] = 100,
        namespace: Namespace = None,
    ) -> dict[str, Any]:
        """List the keys matching a glob, sorted."""
        return {"keys": await self.memory(namespace).list_keys(pattern, limit=limit)}

    async def chat_append(
        self,
        session_id: SessionId,
        message: Annotated[dict[str, Any], Field(description='A JSON object, e.g. {"role": "user", "content": "hi"}.')],
        namespace: Namespace = None,
    ) -> dict[str, Any]:
        """Append a message to a conversation; returns its sequence number."""
        async with self.chat(namespace, session_id) as chat:
            return {"seq": await chat.append(message)}

    async def chat_read(
        self,
        session_id: SessionId,
        last: Annotated[int | None, Field(description="Only the newest N messages (none: all).", ge=0, le=_MAX_LAST)] = 20,
        namespace: Namespace = None,
    ) -> dict[str, Any]:
        """Read a conversation's messages, oldest first."""
        async with self.chat(namespace, session_id) as chat:
            return {"messages": await chat.messages(last=last)}

    async def chat_sessions(
        self,
        pattern: Annotated[str, Field(description="A glob over session ids.")] = "*",
        limit: Annotated[int, Field(description="At most this many sessions.", ge=1, le=_MAX_LIMIT)] = 100,
        namespace: Namespace = None,
    ) -> dict[str, Any]:
        """List conversations, most recently active first, with their message counts."""
        found = await AsyncChatHistory.sessions(self.namespace(namespace), pattern, limit=limit, **self.connect)  # type: ignore[arg-type]
        return {
            "sessions": [
                {"session_id": s.session_id, "message_count": s.message_count, "last_activity": s.last_activity.isoformat()}
                for s in found
            ]
        }


_NUMBERS: Final = frozenset({"limit", "last", "ttl"})  # the tools' number arguments
_TOOLS = ("memory_get", "memory_set", "memory_delete", "memory_keys", "chat_append", "chat_read", "chat_sessions")


def _as_tool_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """``fn`` with the library's errors turned into MCP tool errors that name their code."""
    import functools

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except errors.BotWireError as exc:
            raise ToolError(f"{exc.code}: {exc}") from exc

    return call


class _StrictServer(Server):  # type: ignore[type-arg, misc, unused-ignore]
    """``Server`` refusing arguments a tool does not take: the SDK drops them silently, so a
    misspelt ``ttl_seconds=5`` would store a key that never expires (measured on mcp 1.x)."""

    async def call_tool(self, name: str, arguments: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if name in _TOOLS:
            import inspect

            known = set(inspect.signature(getattr(MemoryTools, name)).parameters) - {"self"}
            unknown = sorted(set(arguments or {}) - known)
            if unknown:
                raise ToolError(f"invalid_argument: {name} takes no argument {', '.join(map(repr, unknown))} "
                                f"(it takes {', '.join(sorted(known))})")
            # pydantic's lax mode takes true/false for the numbers 1/0 (a bool is an int in Python)
            flags = sorted(k for k in _NUMBERS & known if isinstance((arguments or {}).get(k), bool))
            if flags:
                raise ToolError(f"invalid_argument: {', '.join(flags)} of {name} is a number, not true/false")
        return await super().call_tool(name, arguments, *args, **kwargs)


def build_server(tools: MemoryTools, host: str = "127.0.0.1") -> Server[Any]:
    """The MCP server with ``tools``'s methods as its tools (``host``: where HTTP is served)."""
    at_init: dict[str, Any] = {} if _HOST_AT_APP else {"host": host}
    server: Server[Any] = _StrictServer(
        "botwire",
        instructions="Persistent memory: keys with JSON values, and conversation logs, in the namespaces "
        f"{', '.join(tools.globs)}.",
        log_level="WARNING",
        **at_init,
    )
    for name in _TOOLS:
        server.add_tool(_as_tool_errors(getattr(tools, name)), name=name, structured_output=True)
    return server


def run(
    namespaces: list[str],
    connect: dict[str, str | None],
    *,
    http: bool = False,
    host: str = "127.0.0.1",
    port: int = 8765,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until stdin closes (stdio) or SIGINT/SIGTERM (``http``: streamable HTTP at
    ``http://host:port/mcp``; ``ready`` is called with that URL once it answers, with the port
    the system chose for ``port=0``)."""
    import anyio

    tools = MemoryTools(namespaces, connect)
    server = build_server(tools, host)

    async def main() -> None:
        try:
            if not http:
                await server.run_stdio_async()
                return
            await _serve_http(server, host, port, ready)
        finally:
            with contextlib.suppress(errors.BotWireError):
                await tools.close()

    anyio.run(main)


async def _serve_http(server: Server[Any], host: str, port: int, ready: Callable[[str], None] | None) -> None:
    import anyio
    import uvicorn

    app = server.streamable_http_app(**({"host": host} if _HOST_AT_APP else {}))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    web = uvicorn.Server(config)

    async def announce() -> None:
        while not web.started:
            if web.should_exit:
                return
            await anyio.sleep(0.01)
        sockets = [s for srv in web.servers for s in srv.sockets]
        bound = sockets[0].getsockname()[1] if sockets else port
        if ready is not None:
            ready(f"http://{f'[{host}]' if ':' in host else host}:{bound}/mcp")  # IPv6 in brackets

    async with anyio.create_task_group() as tg:
        tg.start_soon(announce)
        await web.serve()
        tg.cancel_scope.cancel()

