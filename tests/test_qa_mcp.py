"""QA of ``botwire mcp`` (issue 11) through the SDK's own stdio client: what a model's
malformed tool call does."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from botwire_stream import AsyncMemory

pytest.importorskip("mcp.client")
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from tests.test_mcp import _session, call, refused, serve_http, stdio  # noqa: E402


async def test_an_argument_a_tool_does_not_take_is_refused_and_writes_nothing(url: str, namespace: str) -> None:
    """A misspelt ``ttl`` (``ttl_seconds``) must not store a key that never expires: the SDK
    dropped unknown arguments silently, so the call succeeded without the expiry."""
    async with stdio(url, namespace) as client:
        text = await refused(client, "memory_set", key="k", value=1, ttl_seconds=5)
        assert text.startswith("invalid_argument: ") and "'ttl_seconds'" in text and "ttl" in text
        assert (await refused(client, "chat_append", session_id="s", message={"a": 1}, sesion="x")).startswith(
            "invalid_argument: "
        )
        assert (await refused(client, "memory_keys", namespace=namespace, limt=3)).startswith("invalid_argument: ")
        async with AsyncMemory(namespace, url=url) as mem:
            assert await mem.get("k", None) is None
        assert await call(client, "chat_read", session_id="s") == {"messages": []}
        # the arguments it does take still work, the namespace among them
        assert await call(client, "memory_set", key="k", value=1, ttl=60, namespace=namespace) == {"revision": 1}



def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_http_on_the_ipv6_loopback_in_brackets_serves_and_prints_a_usable_url(
    url: str, namespace: str, tmp_path: Path
) -> None:
    """``--host [::1]`` passes the loopback check; it used to die in uvicorn ("name not known"),
    and ``--host ::1`` printed ``http://::1:PORT/mcp``, which no client can parse."""
    args = ["--host", "[::1]", "--port", "0", "--url", url, "--namespace", namespace]
    with serve_http(args, tmp_path / "mcp.log") as endpoint:
        assert endpoint.startswith("http://[::1]:"), endpoint
        async with _session(streamable_http_client(endpoint)) as client:
            await call(client, "memory_set", key="over-v6", value=6)
        async with AsyncMemory(namespace, url=url) as mem:
            assert await mem.get("over-v6") == 6


async def test_true_or_false_for_a_number_is_refused_and_writes_nothing(url: str, namespace: str) -> None:
    """``limit=true`` was taken as 1 (a bool is an int in Python, and pydantic's lax mode takes
    it): a model's malformed call must be refused as invalid_argument, like any other."""
    async with stdio(url, namespace) as client:
        for name, args in [
            ("memory_keys", {"limit": True}),
            ("chat_sessions", {"limit": True}),
            ("chat_read", {"session_id": "s", "last": False}),
            ("memory_set", {"key": "k", "value": 1, "ttl": True}),
        ]:
            text = await refused(client, name, **args)
            assert text.startswith("invalid_argument: "), text
        async with AsyncMemory(namespace, url=url) as mem:
            assert await mem.get("k", None) is None
        assert await call(client, "memory_keys", limit=1) == {"keys": []}


@pytest.mark.parametrize("bad", ["my app", "my.app", "a>", "", "x" * 65, "a!b"])
def test_an_invalid_namespace_at_startup_is_a_cli_error(bad: str, url: str) -> None:
    """``botwire mcp --namespace 'my app'`` started a server that refused every call; it must
    stop at once with an error naming the namespace and a status != 0."""
    from click.testing import CliRunner

    from botwire_stream.cli import cli

    result = CliRunner().invoke(cli, ["mcp", "--url", url, "--namespace", "ok", "--namespace", bad], input="")
    assert result.exit_code not in (0, None) and not isinstance(result.exception, (AssertionError, TypeError))
    assert "--namespace" in result.output and repr(bad) in result.output, result.output
