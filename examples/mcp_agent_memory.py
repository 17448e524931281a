"""``botwire mcp`` as an agent's host runs it: start it over stdio with the official ``mcp``
SDK's client, list its tools, and call them (what a desktop assistant does for its model).

    pip install 'botwire-stream[mcp]'
    python examples/mcp_agent_memory.py            # the embedded server (no setup)
    BOTWIRE_URL=nats://127.0.0.1:4222 python examples/mcp_agent_memory.py

Then ``Memory("my-agent").get("user:42:prefs")`` reads what the tools wrote.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main() -> None:
    args = ["-m", "botwire_stream", "mcp", "--namespace", "my-agent"]
    if os.environ.get("BOTWIRE_URL"):
        args += ["--url", os.environ["BOTWIRE_URL"]]
    server = StdioServerParameters(command=sys.executable, args=args, env=dict(os.environ))
    async with stdio_client(server) as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        print("tools:", ", ".join(t.name for t in (await client.list_tools()).tools))
        await client.call_tool("memory_set", {"key": "user:42:prefs", "value": {"tone": "brief"}})
        got = await client.call_tool("memory_get", {"key": "user:42:prefs"})
        print("memory_get:", structured(got))
        await client.call_tool("chat_append", {"session_id": "user-42", "message": {"role": "user", "content": "hi"}})
        read_back = await client.call_tool("chat_read", {"session_id": "user-42", "last": 5})
        print("chat_read:", structured(read_back))
        refused = await client.call_tool("memory_get", {"namespace": "someone-else", "key": "k"})
        is_error = getattr(refused, "is_error", None) or getattr(refused, "isError", False)
        print("another namespace:", is_error, refused.content[0].text)  # type: ignore[union-attr]


def structured(result: Any) -> Any:
    """A tool result's JSON (the mcp SDK spells the field structuredContent in 1.x, structured_content in 2.x)."""
    return getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)

if __name__ == "__main__":
    asyncio.run(main())
