"""``botwire mcp`` driven by the ``mcp`` SDK's own client: over stdio (a real subprocess, as a
desktop assistant runs it) and over streamable HTTP; its tools read and write what ``Memory``
and ``ChatHistory`` see, only in the configured namespaces, and bad input writes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import nats
import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory
from tests.procs import ROOT

mcp_client = pytest.importorskip("mcp.client")
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

TOOLS = {"memory_get", "memory_set", "memory_delete", "memory_keys", "chat_append", "chat_read", "chat_sessions"}


def _field(obj: Any, snake: str, camel: str) -> Any:
    """A result's field: mcp 1.x (what CI installs) spells them camelCase, 2.x snake_case."""
    return getattr(obj, snake) if hasattr(obj, snake) else getattr(obj, camel)


@asynccontextmanager
async def _session(transport: Any) -> AsyncIterator[ClientSession]:
    """The SDK's low-level client session (the same API in mcp 1.x and 2.x) over ``transport``."""
    async with transport as streams, ClientSession(streams[0], streams[1]) as client:
        await client.initialize()
        yield client


@asynccontextmanager
async def stdio(url: str, *globs: str) -> AsyncIterator[ClientSession]:
    args = ["-m", "botwire_stream", "mcp", "--url", url]
    for g in globs:
        args += ["--namespace", g]
    params = StdioServerParameters(command=sys.executable, args=args, cwd=str(ROOT), env=dict(os.environ))
    async with _session(stdio_client(params)) as client:
        yield client


async def call(client: ClientSession, name: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(name, arguments)
    assert not _field(result, "is_error", "isError"), result.content
    out: dict[str, Any] | None = _field(result, "structured_content", "structuredContent")
    assert out is not None
    return out


async def refused(client: ClientSession, name: str, **arguments: Any) -> str:
    result = await client.call_tool(name, arguments)
    assert _field(result, "is_error", "isError")
    text: str = result.content[0].text  # type: ignore[union-attr]
    return text.removeprefix(f"Error executing tool {name}: ")  # the SDK's prefix


async def tools_of(client: ClientSession) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """Each tool's description and input schema, by name."""
    return {t.name: (t.description, _field(t, "input_schema", "inputSchema")) for t in (await client.list_tools()).tools}


async def test_tools_read_and_write_what_memory_and_chat_history_see(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as mem, stdio(url, f"{namespace}*") as client:
        await mem.set("from-lib", {"n": 1})
        assert await call(client, "memory_get", namespace=namespace, key="from-lib") == {"found": True, "value": {"n": 1}}
        assert await call(client, "memory_get", namespace=namespace, key="nope") == {"found": False}
        await call(client, "memory_set", namespace=namespace, key="user:1:prefs", value={"theme": "dark"})
        await call(client, "memory_set", namespace=namespace, key="short", value="x", ttl=60)
        assert await mem.get("user:1:prefs") == {"theme": "dark"}
        assert await mem.get("short") == "x"
        nc = await nats.connect(url)
        try:  # stored with the server's per-message TTL
            stored = await nc.jetstream().get_last_msg(f"KV_botwire_{namespace}", f"$KV.botwire_{namespace}.short")
            assert (stored.headers or {}).get("Nats-TTL") == "60"
        finally:
            await nc.close()
        assert await call(client, "memory_keys", namespace=namespace, pattern="user:*") == {"keys": ["user:1:prefs"]}
        listed = await call(client, "memory_keys", namespace=namespace, limit=2)
        assert listed == {"keys": sorted(await mem.list_keys("*"))[:2]}
        assert await call(client, "memory_delete", namespace=namespace, key="from-lib") == {"deleted": True}
        assert await call(client, "memory_delete", namespace=namespace, key="from-lib") == {"deleted": False}
        assert await mem.get("from-lib") is None

        async with AsyncChatHistory("s1", namespace=namespace, url=url) as chat:
            await chat.append({"role": "user", "content": "hello"})
            await call(client, "chat_append", namespace=namespace, session_id="s1", message={"role": "ai", "content": "hi"})
            for i in range(5):
                await call(client, "chat_append", namespace=namespace, session_id="s2", message={"i": i})
            assert await chat.messages() == [{"role": "user", "content": "hello"}, {"role": "ai", "content": "hi"}]
        got = await call(client, "chat_read", namespace=namespace, session_id="s2", last=2)
        assert got == {"messages": [{"i": 3}, {"i": 4}]}
        assert len((await call(client, "chat_read", namespace=namespace, session_id="s2", last=None))["messages"]) == 5
        sessions = (await call(client, "chat_sessions", namespace=namespace))["sessions"]
        assert {(s["session_id"], s["message_count"]) for s in sessions} == {("s1", 2), ("s2", 5)}


async def test_tools_schemas_other_namespaces_and_bad_input(url: str, namespace: str) -> None:
    """Lists its tools with schemas; a namespace outside the globs and bad input are tool errors
    with the error code, and nothing is written."""
    other = namespace + "x"
    async with AsyncMemory(other, url=url) as victim, stdio(url, namespace) as client:
        tools = await tools_of(client)
        assert set(tools) == TOOLS
        for description, schema in tools.values():
            assert description and schema["type"] == "object"
        assert tools["memory_set"][1]["required"] == ["key", "value"]
        assert "ttl" in tools["memory_set"][1]["properties"]
        assert tools["chat_append"][1]["properties"]["message"]["type"] == "object"
        assert tools["chat_read"][1]["properties"]["last"]["anyOf"][0]["type"] == "integer"
        assert (await refused(client, "memory_set", key="k" * 2000, value=1)).startswith("invalid_key: ")
        assert (await refused(client, "memory_get", key="")).startswith("invalid_key: ")
        assert await refused(client, "memory_set", key="k", value=1, ttl=-5)  # the schema: ttl > 0
        assert await refused(client, "chat_append", session_id="s", message="not an object")
        assert (await refused(client, "chat_append", session_id="", message={"a": 1})).startswith("invalid_session_id: ")
        assert await refused(client, "memory_keys", limit=0)
        assert await call(client, "memory_keys") == {"keys": []}
        assert await AsyncChatHistory.sessions(namespace, url=url) == []
        await victim.set("k", "secret")
        calls: list[tuple[str, dict[str, Any]]] = [
            ("memory_get", {"key": "k"}),
            ("memory_set", {"key": "k", "value": "overwritten"}),
            ("memory_delete", {"key": "k"}),
            ("memory_keys", {}),
            ("chat_append", {"session_id": "s", "message": {"a": 1}}),
            ("chat_read", {"session_id": "s"}),
            ("chat_sessions", {}),
        ]
        for name, args in calls:
            text = await refused(client, name, namespace=other, **args)
            assert text.startswith("unauthorized: ") and "secret" not in text
        assert (await refused(client, "memory_get", namespace="../" + other, key="k")).startswith("invalid_namespace: ")
        assert await victim.get("k") == "secret" and len(await victim.revisions("k")) == 1
        assert await AsyncChatHistory.sessions(other, url=url) == []
        # one literal namespace configured: it is the default
        await call(client, "memory_set", key="k", value="mine")
        async with AsyncMemory(namespace, url=url) as mem:
            assert await mem.get("k") == "mine"


@contextmanager
def serve_http(args: list[str], log: Path) -> Iterator[str]:
    """``botwire mcp --http`` with ``args`` as a process of this test: its printed endpoint;
    stopped by PID (SIGTERM, then SIGKILL) at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "botwire_stream", "mcp", "--http", *args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out, stdin=subprocess.DEVNULL,
        )
    try:
        endpoint = None
        deadline = time.monotonic() + 30
        while endpoint is None and time.monotonic() < deadline and proc.poll() is None:
            for line in log.read_text().splitlines():
                if line.startswith("botwire mcp: http://"):
                    endpoint = line.split(": ", 1)[1]
            time.sleep(0.05)
        assert endpoint is not None, log.read_text()
        yield endpoint
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


@pytest.mark.slow
async def test_streamable_http(url: str, namespace: str, tmp_path: Path) -> None:
    with serve_http(["--port", "0", "--url", url, "--namespace", namespace], tmp_path / "mcp.log") as endpoint:
        assert endpoint.startswith("http://127.0.0.1:"), endpoint
        async with _session(streamable_http_client(endpoint)) as client:
            assert set(await tools_of(client)) == TOOLS
            await call(client, "memory_set", key="over-http", value=[1, 2])
            assert await call(client, "memory_get", key="over-http") == {"found": True, "value": [1, 2]}
            assert (await refused(client, "memory_get", namespace=namespace + "x", key="k")).startswith("unauthorized: ")
        async with AsyncMemory(namespace, url=url) as mem:
            assert await mem.get("over-http") == [1, 2]


@pytest.mark.slow
async def test_the_example_runs(url: str) -> None:
    env = {**os.environ, "BOTWIRE_URL": url}
    done = subprocess.run(
        [sys.executable, "examples/mcp_agent_memory.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "memory_get: {'found': True, 'value': {'tone': 'brief'}}" in done.stdout
    assert "another namespace: True unauthorized: " in done.stdout.replace("Error executing tool memory_get: ", "")
    async with AsyncMemory("my-agent", url=url) as mem:
        assert await mem.get("user:42:prefs") == {"tone": "brief"}
