"""QA of ``botwire mcp`` (issue 11) through the SDK's own stdio client: what a model's
malformed tool call does."""

from __future__ import annotations

import pytest

from botwire_stream import AsyncMemory

pytest.importorskip("mcp.client")
from tests.test_mcp import call, refused, stdio  # noqa: E402


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
