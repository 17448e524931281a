"""``botwire mcp`` driven by the ``mcp`` SDK's own client: over stdio (a real subprocess, as a
desktop assistant runs it) and over streamable HTTP; its tools read and write what ``Memory``
and ``ChatHistory`` see, only in the configured namespaces, and bad input writes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory
from tests.procs import ROOT

mcp_client = pytest.importorskip("mcp.client")
from mcp.client import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

TOOLS = {"memory_get", "memory_set", "memory_delete", "memory_keys", "chat_append", "chat_read", "chat_sessions"}


@asynccontextmanager
async def stdio(url: str, *globs: str) -> AsyncIterator[Client]:
    args = ["-m", "botwire_stream", "mcp", "--url", url]
    for g in globs:
        args += ["--namespace", g]
    params = StdioServerParameters(command=sys.executable, args=args, cwd=str(ROOT), env=dict(os.environ))
    async with Client(params, read_timeout_seconds=30) as client:
        yield client


async def call(client: Client, name: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(name, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    out: dict[str, Any] = result.structured_content
    return out


async def refused(client: Client, name: str, **arguments: Any) -> str:
    result = await client.call_tool(name, arguments)
    assert result.is_error
    text: str = result.content[0].text  # type: ignore[union-attr]
    return text.removeprefix(f"Error executing tool {name}: ")  # the SDK's prefix


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
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.description and tool.input_schema["type"] == "object"
        assert tools["memory_set"].input_schema["required"] == ["key", "value"]
        assert "ttl" in tools["memory_set"].input_schema["properties"]
        assert tools["chat_append"].input_schema["properties"]["message"]["type"] == "object"
        assert tools["chat_read"].input_schema["properties"]["last"]["anyOf"][0]["type"] == "integer"
        assert (await refused(client, "memory_set", key="k" * 2000, value=1)).startswith("invalid_key: ")
        assert (await refused(client, "memory_get", key="")).startswith("invalid_key: ")
        assert await refused(client, "memory_set", key="k", value=1, ttl=-5)  # the schema: ttl > 0
        assert await refused(client, "chat_append", session_id="s", message="not an object")
        assert (await refused(client, "chat_append", session_id="", message={"a": 1})).startswith("invalid_session_id: ")
        assert await refused(client, "memory_keys", limit=0)
        assert await call(client, "memory_keys") == {"keys": []}
        assert await AsyncChatHistory.sessions(namespace, url=url) == []
        await victim.set("k", "secret")
        for name, args in [
            ("memory_get", {"key": "k"}),
            ("memory_set", {"key": "k", "value": "overwritten"}),
            ("memory_delete", {"key": "k"}),
            ("memory_keys", {}),
            ("chat_append", {"session_id": "s", "message": {"a": 1}}),
            ("chat_read", {"session_id": "s"}),
            ("chat_sessions", {}),
        ]:
            text = await refused(client, name, namespace=other, **args)
            assert text.startswith("unauthorized: ") and "secret" not in text
        assert (await refused(client, "memory_get", namespace="../" + other, key="k")).startswith("invalid_namespace: ")
        assert await victim.get("k") == "secret" and len(await victim.revisions("k")) == 1
        assert await AsyncChatHistory.sessions(other, url=url) == []
        # one literal namespace configured: it is the default
        await call(client, "memory_set", key="k", value="mine")
        async with AsyncMemory(namespace, url=url) as mem:
            assert await mem.get("k") == "mine"


@pytest.mark.slow
async def test_streamable_http(url: str, namespace: str, tmp_path: Path) -> None:
    log = tmp_path / "mcp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "botwire_stream", "mcp", "--http", "--port", "0", "--url", url, "--namespace", namespace],
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
        assert endpoint is not None and endpoint.startswith("http://127.0.0.1:"), log.read_text()
        async with Client(endpoint, read_timeout_seconds=30) as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            await call(client, "memory_set", key="over-http", value=[1, 2])
            assert await call(client, "memory_get", key="over-http") == {"found": True, "value": [1, 2]}
            assert (await refused(client, "memory_get", namespace=namespace + "x", key="k")).startswith("unauthorized: ")
        async with AsyncMemory(namespace, url=url) as mem:
            assert await mem.get("over-http") == [1, 2]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


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
