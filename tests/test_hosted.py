"""The hosted product's client from PyPI (``botwire`` 0.2.1) pointed at ``botwire serve`` with
``BOTWIRE_URL``, used as its users do, in a subprocess (it reads ``BOTWIRE_URL`` at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from botwire_stream import AsyncMemory

_CLIENT = r'''
import json, sys
from botwire import Memory
mem = Memory(sys.argv[1])
out = {}
mem.set("name", "Ada")
mem.set("prefs", {"theme": "dark", "n": [1, 2]})
mem.set("count", 5)
out["name"] = mem.get("name")
out["prefs"] = mem.get("prefs")
out["count"] = mem.get("count")
out["missing"] = mem.get("missing", default="dflt")
out["in"] = ["name" in mem, "missing" in mem]
out["lib"] = mem.get("from-lib")
out["lib_str"] = mem.get("lib-str")
out["keys"] = mem.keys()
out["deleted"] = [mem.delete("count"), mem.delete("count")]
out["after_delete"] = mem.get("count")
print(json.dumps(out))
'''

_CHAT = r'''
import json, sys
from botwire.memory import BotWireChatHistory
from langchain_core.messages import AIMessage, HumanMessage
h = BotWireChatHistory(sys.argv[2], namespace=sys.argv[1])
h.add_message(HumanMessage("hello"))
h.add_message(AIMessage("hi there"))
first = [m.content for m in h.messages]
h2 = BotWireChatHistory(sys.argv[2], namespace=sys.argv[1])
h2.add_message(HumanMessage("again"))
second = [m.content for m in h.messages]
h.clear()
print(json.dumps({"first": first, "second": second, "cleared": h.messages}))
'''


def _run(code: str, base: str, *args: str) -> dict[str, object]:
    env = {**os.environ, "BOTWIRE_URL": base}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out: dict[str, object] = json.loads(done.stdout)
    return out


async def test_the_pypi_client_reads_and_writes_the_keys_of_memory(http_server: str, url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as mem:
        await mem.set("from-lib", {"written": "by botwire-stream"})
        await mem.set("lib-str", "plain")
        out = _run(_CLIENT, http_server, namespace)
        assert out["name"] == "Ada"
        assert out["prefs"] == {"theme": "dark", "n": [1, 2]}
        assert out["count"] == "5"  # as with the hosted service: every value is a string there
        assert out["missing"] == "dflt"
        assert out["in"] == [True, False]
        assert out["lib"] == {"written": "by botwire-stream"}
        assert out["lib_str"] == "plain"
        listed = out["keys"]
        assert isinstance(listed, list)
        assert sorted(k["key"] for k in listed) == ["count", "from-lib", "lib-str", "name", "prefs"]
        assert all(set(k) == {"key", "bytes", "updated_at"} for k in listed)
        times = [k["updated_at"] for k in listed]
        assert times == sorted(times, reverse=True)  # newest first
        assert out["deleted"] == [True, False]
        assert out["after_delete"] is None
        # what the client wrote, our Memory reads under the same keys
        assert await mem.get("name") == "Ada"
        assert json.loads(await mem.get("prefs")) == {"theme": "dark", "n": [1, 2]}
        assert await mem.get("count") is None


def test_its_langchain_chat_history(http_server: str, namespace: str) -> None:
    out = _run(_CHAT, http_server, namespace, "user-42")
    assert out == {"first": ["hello", "hi there"], "second": ["hello", "hi there", "again"], "cleared": []}


def test_the_wire_format_exactly(http_server: str, namespace: str) -> None:
    base = f"{http_server}/memory/{namespace}"
    r = httpx.put(f"{base}/k1", json={"value": "héllo"})
    assert r.json() == {"namespace": namespace, "key": "k1", "stored": True, "bytes": 6}
    got = httpx.get(f"{base}/k1").json()
    assert set(got) == {"namespace", "key", "value", "created_at", "updated_at"}
    assert got["value"] == "héllo" and got["created_at"] <= got["updated_at"]
    httpx.put(f"{base}/k1", json={"value": "again"})
    again = httpx.get(f"{base}/k1").json()
    assert again["created_at"] == got["created_at"] and again["updated_at"] >= got["updated_at"]
    httpx.put(f"{base}/k2", json={"value": "x"})
    listing = httpx.get(base, params={"limit": 1}).json()
    assert listing["namespace"] == namespace and listing["count"] == 1 and listing["keys"][0]["key"] == "k2"
    assert httpx.get(f"{base}/nope").status_code == 404 and "detail" in httpx.get(f"{base}/nope").json()
    assert httpx.delete(f"{base}/nope").status_code == 404
    assert httpx.put(f"{base}/big", json={"value": "x" * 100_001}).status_code == 400
    assert httpx.get(f"{base}/big").status_code == 404
    assert httpx.put(f"{http_server}/memory/bad.ns/k", json={"value": "x"}).status_code == 400
    assert httpx.delete(f"{base}/k1").json() == {"deleted": True, "namespace": namespace, "key": "k1"}


def test_a_crafted_hosted_path_never_reaches_another_namespace(http_server: str, url: str, namespace: str) -> None:
    import asyncio
    import uuid

    other = "o" + uuid.uuid4().hex[:12]

    async def seed() -> None:
        async with AsyncMemory(other, url=url) as victim:
            await victim.set("k", "secret")

    asyncio.run(seed())
    for path in (f"{namespace}%2F..%2F{other}/k", f"{namespace}%2F{other}/k", f"../{other}/k", f"{namespace}/..%2F{other}%2Fk", "*/k", ">/k", f"{other}%00/k"):
        got = httpx.get(httpx.URL(f"{http_server}/memory/{path}"))
        assert "secret" not in got.text
        put = httpx.put(httpx.URL(f"{http_server}/memory/{path}"), json={"value": "overwritten"})
        assert put.status_code >= 400 or put.json()["namespace"] == namespace, (path, put.text)

    async def check() -> None:
        async with AsyncMemory(other, url=url) as victim:
            assert await victim.get("k") == "secret"
            assert len(await victim.revisions("k")) == 1

    asyncio.run(check())
