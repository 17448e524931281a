"""The REST API of ``botwire serve`` under ``/v1/ns/``: real serve process, real nats-server,
and the library's own ``AsyncMemory``/``AsyncChatHistory`` reading what HTTP wrote."""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory
from tests.http_serve import Serves
from tests.sse import sse_events
from tests.waits import sigstop


def _err(r: httpx.Response) -> str:
    body: dict[str, Any] = r.json()
    code: str = body["error"]["code"]
    assert body["error"]["message"]
    return code


async def test_keys_round_trip_with_the_library(http_server: str, url: str, namespace: str) -> None:
    base = f"{http_server}/v1/ns/{namespace}/keys"
    async with httpx.AsyncClient() as http, AsyncMemory(namespace, url=url) as mem:
        r = await http.put(f"{base}/user:42", json={"value": {"name": "Ada", "n": [1, 2.5, None]}})
        assert r.status_code == 200, r.text
        rev = r.json()["revision"]
        assert await mem.get("user:42") == {"name": "Ada", "n": [1, 2.5, None]}
        await mem.set("from-lib", ["x", 1])
        r = await http.get(f"{base}/from-lib")
        assert r.json() == {"key": "from-lib", "value": ["x", 1], "revision": r.json()["revision"]}
        assert (await http.get(f"{base}/user:42")).json()["revision"] == rev
        # a key holding "/" is one percent-encoded segment
        assert (await http.put(f"{base}/a%2Fb", json={"value": "slash"})).status_code == 200
        assert await mem.get("a/b") == "slash"
        r = await http.get(f"{base}/missing")
        assert r.status_code == 404 and _err(r) == "not_found"
        r = await http.delete(f"{base}/user:42")
        assert r.json() == {"key": "user:42", "deleted": True}
        assert await mem.get("user:42") is None
        assert (await http.delete(f"{base}/user:42")).json()["deleted"] is False
        revs = (await http.get(f"{base}/user:42/revisions")).json()["revisions"]
        assert [r["op"] for r in revs] == ["set", "delete"] and revs[0]["value"]["name"] == "Ada"


async def test_conditional_writes_by_revision(http_server: str, url: str, namespace: str) -> None:
    base = f"{http_server}/v1/ns/{namespace}/keys/k"
    async with httpx.AsyncClient() as http, AsyncMemory(namespace, url=url) as mem:
        r = await http.put(base, json={"value": 1, "revision": 0})
        assert r.status_code == 200
        first = r.json()["revision"]
        r = await http.put(base, json={"value": 2, "revision": 0})  # exists already
        assert r.status_code == 409 and _err(r) == "conflict"
        assert (await http.put(base, json={"value": 3, "revision": first})).status_code == 200
        r = await http.put(base, json={"value": 4, "revision": first})  # stale
        assert r.status_code == 409 and _err(r) == "conflict"
        assert await mem.get("k") == 3


async def test_ttl_expires_the_key(http_server: str, url: str, namespace: str) -> None:
    async with httpx.AsyncClient() as http, AsyncMemory(namespace, url=url) as mem:
        r = await http.put(f"{http_server}/v1/ns/{namespace}/keys/short", json={"value": "v", "ttl": 1})
        assert r.status_code == 200
        assert await mem.get("short") == "v"
        deadline = time.monotonic() + 15  # generous bound: NATS expires per-message TTLs about on time
        while await mem.get("short") is not None:
            assert time.monotonic() < deadline, "the key did not expire"
            await __import__("asyncio").sleep(0.2)


async def test_list_by_glob_with_pagination(http_server: str, url: str, namespace: str) -> None:
    async with httpx.AsyncClient() as http, AsyncMemory(namespace, url=url) as mem:
        for i in range(5):
            await mem.set(f"user:{i}", i)
        await mem.set("other", 0)
        page = (await http.get(f"{http_server}/v1/ns/{namespace}/keys", params={"pattern": "user:*", "limit": 2})).json()
        seen = list(page["keys"])
        while page["next"] is not None:
            page = (await http.get(f"{http_server}/v1/ns/{namespace}/keys", params={"pattern": "user:*", "limit": 2, "after": page["next"]})).json()
            seen += page["keys"]
        assert seen == [f"user:{i}" for i in range(5)]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("PUT", "keys/k", b"not json", 400, "invalid_argument"),
        ("PUT", "keys/k", b'{"value": 1, "extra": 2}', 400, "invalid_argument"),
        ("PUT", "keys/k", b'{"value": 1, "ttl": -5}', 400, "invalid_ttl"),
        ("PUT", "keys/k", b'{"value": 1, "revision": -1}', 400, "invalid_argument"),
        ("PUT", "keys/k", b'{"value": "x", "ttl": "soon"}', 400, "invalid_argument"),
        ("PUT", "keys/%FF%FE", b'{"value": 1}', 400, "invalid_argument"),
        ("PUT", "keys/k", b'{"value": 1e999}', 400, "invalid_value"),
        ("PUT", "keys/k", b'{"value": "\xff"}', 400, "invalid_value"),
        ("PUT", "keys/" + "x" * 1025, b'{"value": 1}', 400, "invalid_key"),
        ("GET", "keys?limit=0", b"", 400, "invalid_argument"),
        ("GET", "keys?pattern=", b"", 400, "invalid_key"),
        ("POST", "chats/s/messages", b'{"message": [1]}', 400, "invalid_argument"),
        ("POST", "chats/s/messages", b"{}", 400, "invalid_message"),
        ("GET", "chats/s/messages?last=-1", b"", 400, "invalid_argument"),
        ("GET", "nothing", b"", 404, "not_found"),
    ],
)
async def test_bad_input_gets_its_error_and_writes_nothing(
    http_server: str, url: str, namespace: str, method: str, path: str, body: bytes, status: int, code: str
) -> None:
    async with httpx.AsyncClient() as http, AsyncMemory(namespace, url=url) as mem:
        r = await http.request(method, f"{http_server}/v1/ns/{namespace}/{path}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert _err(r) == code
        assert await mem.list_keys("*") == []
        assert await AsyncChatHistory.sessions(namespace, url=url) == []


@pytest.mark.parametrize(
    "path",
    ["../{other}/keys/k", "%2E%2E/{other}/keys/k", "{ns}%2F..%2F{other}/keys/k", "{ns}%2F{other}/keys/k", "*/keys/k", ">/keys/k", "{ns}.{other}/keys/k"],
)
async def test_a_crafted_path_never_reaches_another_namespace(http_server: str, url: str, namespace: str, path: str) -> None:
    other = "o" + uuid.uuid4().hex[:12]
    async with httpx.AsyncClient() as http, AsyncMemory(other, url=url) as victim:
        await victim.set("k", "secret")
        target = f"{http_server}/v1/ns/" + path.format(ns=namespace, other=other)
        got = await http.request("GET", httpx.URL(target))
        assert "secret" not in got.text
        put = await http.request("PUT", httpx.URL(target), json={"value": "overwritten"})
        assert 400 <= put.status_code < 500, put.text
        assert await victim.get("k") == "secret"
        assert await victim.revisions("k") and len(await victim.revisions("k")) == 1


async def test_conversations(http_server: str, url: str, namespace: str) -> None:
    base = f"{http_server}/v1/ns/{namespace}/chats"
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{base}/s1/messages", json={"message": {"role": "user", "content": "hi"}})
        assert r.status_code == 200 and r.json() == {"seqs": [1]}
        r = await http.post(f"{base}/s1/messages", json={"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]})
        assert r.json()["seqs"] == [2, 3]
        chat = AsyncChatHistory("s1", namespace=namespace, url=url)
        async with chat:
            assert [m["content"] for m in await chat.messages()] == ["hi", "a", "b"]
            await chat.append({"role": "assistant", "content": "c"})
        msgs = (await http.get(f"{base}/s1/messages", params={"last": 2})).json()["messages"]
        assert [(m["seq"], m["message"]["content"]) for m in msgs] == [(3, "b"), (4, "c")]
        msgs = (await http.get(f"{base}/s1/messages", params={"after": 3})).json()["messages"]
        assert [m["message"]["content"] for m in msgs] == ["c"]
        assert (await http.get(f"{base}/s1/count")).json() == {"count": 4}
        r = await http.post(f"{base}/s1/fork", json={"session_id": "s2", "upto": 2})
        assert r.status_code == 201
        r = await http.post(f"{base}/s1/fork", json={"session_id": "s2"})
        assert r.status_code == 409 and _err(r) == "conflict"
        async with AsyncChatHistory("s2", namespace=namespace, url=url) as fork:
            assert [m["content"] for m in await fork.messages()] == ["hi", "a"]
        sessions = (await http.get(base)).json()["sessions"]
        assert sorted(s["session_id"] for s in sessions) == ["s1", "s2"]
        assert (await http.delete(f"{base}/s1/messages")).status_code == 200
        assert (await http.get(f"{base}/s1/count")).json() == {"count": 0}


def _read_events(url: str, headers: dict[str, str], want: int, out: list[tuple[str, str, dict[str, Any]]], ready: threading.Event) -> None:
    with httpx.stream("GET", url, headers=headers, timeout=20) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(lines)  # the feed answers once subscribed (": live")
        ready.set()
        for event in sse_events(itertools.chain([first], lines)):
            out.append((event.get("id", ""), event.get("event", ""), json.loads(event["data"])))
            if len(out) >= want:
                return


def test_sse_of_a_conversation_resumes_with_last_event_id(http_server: str, namespace: str) -> None:
    base = f"{http_server}/v1/ns/{namespace}/chats/live"
    for i in range(3):
        httpx.post(f"{base}/messages", json={"message": {"i": i}}).raise_for_status()
    out: list[tuple[str, str, dict[str, Any]]] = []
    ready = threading.Event()
    t = threading.Thread(target=_read_events, args=(f"{base}/events", {"Last-Event-ID": "1"}, 3, out, ready))
    t.start()
    assert ready.wait(10)
    httpx.post(f"{base}/messages", json={"message": {"i": 3}}).raise_for_status()
    t.join(20)
    assert not t.is_alive()
    assert [(i, k, d["message"]["i"]) for i, k, d in out] == [("2", "message", 1), ("3", "message", 2), ("4", "message", 3)]


def test_sse_of_a_key_pattern(http_server: str, namespace: str) -> None:
    base = f"{http_server}/v1/ns/{namespace}"
    out: list[tuple[str, str, dict[str, Any]]] = []
    ready = threading.Event()
    t = threading.Thread(target=_read_events, args=(f"{base}/watch?pattern=user:*", {}, 2, out, ready))
    t.start()
    assert ready.wait(10)  # the first line (": live") comes once subscribed
    httpx.put(f"{base}/keys/other", json={"value": 0}).raise_for_status()
    httpx.put(f"{base}/keys/user:1", json={"value": {"a": 1}}).raise_for_status()
    httpx.delete(f"{base}/keys/user:1").raise_for_status()
    t.join(20)
    assert not t.is_alive()
    assert [(k, d["key"], d["op"], d["value"]) for _, k, d in out] == [("change", "user:1", "set", {"a": 1}), ("change", "user:1", "delete", None)]
    assert out[0][0] == str(out[0][2]["revision"])


def test_openapi_and_docs(http_server: str) -> None:
    doc = httpx.get(f"{http_server}/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert "/v1/ns/{namespace}/keys/{key}" in doc["paths"] and "/memory/{namespace}/{key}" in doc["paths"]
    assert set(doc["components"]["schemas"]["SetKey"]["properties"]) == {"value", "ttl", "revision"}
    page = httpx.get(f"{http_server}/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text


def test_healthz_and_readyz(http_server: str) -> None:
    assert httpx.get(f"{http_server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{http_server}/readyz").json() == {"status": "ready"}


def test_metrics_count_requests_by_route_and_status(http_server: str, namespace: str) -> None:
    def count(text: str, route: str, status: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith("botwire_http_requests_total{") and f'route="{route}"' in line and f'status="{status}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    before = httpx.get(f"{http_server}/metrics").text
    for _ in range(3):
        httpx.get(f"{http_server}/v1/ns/{namespace}/keys/missing")
    httpx.put(f"{http_server}/memory/{namespace}/k", json={"value": "v"})
    after = httpx.get(f"{http_server}/metrics").text
    assert count(after, "/v1/ns/keys", "404") - count(before, "/v1/ns/keys", "404") == 3
    assert count(after, "/memory", "200") - count(before, "/memory", "200") == 1
    assert "botwire_http_request_duration_seconds_bucket" in after
    assert "botwire_http_errors_total" in after
    assert "missing" not in after  # no key, session or stream name in a label


def test_access_log_is_one_json_line_per_request(url: str, serves: Serves) -> None:
    serve = serves.start(url, extra=["--access-log"])
    httpx.get(f"{serve.base}/v1/ns/ns1/keys/nope")
    serve.stop()  # its log is complete
    lines = [json.loads(line) for line in serve.log.read_text().splitlines() if line.startswith("{")]
    hit = [x for x in lines if x["path"] == "/v1/ns/ns1/keys/nope"]
    assert len(hit) == 1 and hit[0]["status"] == 404 and hit[0]["method"] == "GET" and hit[0]["ms"] > 0


@pytest.mark.slow
def test_readyz_fails_while_nats_is_stopped_and_healthz_does_not(own_server: Any, tmp_path: Any) -> None:
    import os
    import signal

    from tests.http_serve import serving

    with serving(own_server.url, tmp_path / "serve.log") as serve:
        assert httpx.get(f"{serve.base}/readyz", timeout=10).status_code == 200
        sigstop(own_server.pid)
        try:
            t0 = time.monotonic()
            r = httpx.get(f"{serve.base}/readyz", timeout=30)
            assert r.status_code == 503 and r.json()["status"] == "unavailable"
            assert time.monotonic() - t0 < 15  # bounded: readyz gives NATS 2 s
            assert httpx.get(f"{serve.base}/healthz", timeout=10).status_code == 200
        finally:
            os.kill(own_server.pid, signal.SIGCONT)
        assert httpx.get(f"{serve.base}/readyz", timeout=10).status_code == 200


def test_sse_of_a_key_pattern_resumes_with_last_event_id(http_server: str, namespace: str) -> None:
    base = f"{http_server}/v1/ns/{namespace}"
    revs = [httpx.put(f"{base}/keys/user:{i}", json={"value": i}).json()["revision"] for i in range(3)]
    httpx.put(f"{base}/keys/other", json={"value": "x"}).raise_for_status()
    out: list[tuple[str, str, dict[str, Any]]] = []
    ready = threading.Event()
    t = threading.Thread(target=_read_events, args=(f"{base}/watch?pattern=user:*", {"Last-Event-ID": str(revs[0])}, 3, out, ready))
    t.start()
    assert ready.wait(10)
    httpx.put(f"{base}/keys/user:9", json={"value": 9}).raise_for_status()
    t.join(20)
    assert not t.is_alive()
    assert [(d["key"], d["value"]) for _, _, d in out] == [("user:1", 1), ("user:2", 2), ("user:9", 9)]
    assert [i for i, _, _ in out][:2] == [str(revs[1]), str(revs[2])]
