"""Auth of ``botwire serve --auth``: API keys made with ``botwire keys``, checked by real serve
processes on a real nats-server; refused requests see no data of another namespace and write nothing."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from botwire_stream import AsyncChatHistory
from tests.http_serve import Serve, serving
from tests.procs import ROOT
from tests.servers import NatsServer


def botwire(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "botwire_stream", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def new_key(url: str, *namespaces: str, scope: str = "write", extra: tuple[str, ...] = ()) -> dict[str, object]:
    globs = [a for ns in namespaces for a in ("--namespace", ns)]
    out: dict[str, object] = json.loads(
        botwire("keys", "create", "--url", url, *globs, "--scope", scope, *extra, "--json").stdout
    )
    return out


def bearer(key: dict[str, object]) -> dict[str, str]:
    return {"authorization": f"Bearer {key['key']}"}


@pytest.fixture(scope="module")
def server(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving(nats_server.url, log, extra=["--auth", "--public", "pub-*"]) as serve:
        yield serve


def raw_request(
    serve: Serve, target: bytes, method: bytes = b"GET", headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, bytes]:
    """One request with the path sent byte for byte (httpx would normalise '..' and encodings)."""
    head = b"%s %s HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: %d\r\n" % (
        method,
        target,
        len(body),
    )
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n".encode()
    with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as s:
        s.sendall(head + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


def test_keys_are_shown_once_stored_hashed_listed_and_revoked(url: str, namespace: str) -> None:
    key = new_key(url, namespace + "*", scope="read")
    secret = str(key["key"])
    assert secret.startswith("bwk_") and key["scope"] == "read" and key["namespaces"] == [namespace + "*"]

    async def stored() -> bytes:
        import nats

        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().key_value("botwire_apikeys")
            return (await kv.get(str(key["id"]))).value or b""
        finally:
            await nc.close()

    record = asyncio.run(stored())
    assert str(key["id"]).encode() in record
    assert secret.encode() not in record and secret.split("_", 2)[2].encode() not in record  # only a hash
    listed = {k["id"]: k for k in json.loads(botwire("keys", "list", "--url", url, "--json").stdout)}
    assert listed[key["id"]]["revoked"] is None and "digest" not in listed[key["id"]]
    assert secret not in botwire("keys", "list", "--url", url).stdout
    assert botwire("keys", "revoke", str(key["id"]), "--url", url).returncode == 0
    listed = {k["id"]: k for k in json.loads(botwire("keys", "list", "--url", url, "--json").stdout)}
    assert listed[key["id"]]["revoked"] is not None
    assert botwire("keys", "revoke", str(key["id"]), "--url", url, check=False).returncode == 1  # already revoked


def test_memory_keys_listing_still_works_beside_the_api_key_commands(url: str, namespace: str) -> None:
    botwire("set", "k1", "1", "--url", url, "-n", namespace)
    botwire("set", "list", "1", "--url", url, "-n", namespace)
    assert botwire("keys", "--url", url, "-n", namespace).stdout.split() == ["k1", "list"]
    assert botwire("keys", "[l]ist", "--url", url, "-n", namespace).stdout.split() == ["list"]


def test_no_key_a_wrong_key_and_a_revoked_key_get_401_and_write_nothing(
    server: Serve, url: str, namespace: str
) -> None:
    key = new_key(url, namespace)
    stream = server.stream(f"{namespace}/s")
    body = {"content": b"x", "headers": {"content-type": "text/plain"}}
    tampered = str(key["key"])[:-4] + ("AAAA" if not str(key["key"]).endswith("AAAA") else "BBBB")
    for headers in (
        {},
        {"authorization": "Bearer nope"},
        {"authorization": f"Bearer {tampered}"},
        {"authorization": f"Basic {key['key']}"},
    ):
        got = httpx.put(stream, **body | {"headers": {**body["headers"], **headers}})  # type: ignore[operator]
        assert got.status_code == 401, (headers, got.text)
        assert got.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(stream, headers=headers).status_code == 401
    assert httpx.head(stream, headers=bearer(key)).status_code == 404  # nothing was created
    assert httpx.put(stream, content=b"x", headers={"content-type": "text/plain", **bearer(key)}).status_code == 201
    assert httpx.get(stream, headers=bearer(key)).content == b"x"
    for _ in range(50):  # the use is recorded in the background, once a minute per key at most
        listed = {k["id"]: k for k in json.loads(botwire("keys", "list", "--url", url, "--json").stdout)}
        if listed[key["id"]]["last_used"] is not None:
            break
        time.sleep(0.1)
    assert listed[key["id"]]["last_used"] >= key["created"]
    botwire("keys", "revoke", str(key["id"]), "--url", url)
    time.sleep(1.1)  # a serve process reuses a verified key for up to 1 s (documented)
    assert httpx.post(stream, content=b"y", headers={"content-type": "text/plain", **bearer(key)}).status_code == 401
    assert httpx.get(stream, headers=bearer(key)).status_code == 401
    owner = new_key(url, namespace, scope="read")
    assert httpx.get(stream, headers=bearer(owner)).content == b"x"  # the refused append wrote nothing


def test_a_key_reaches_only_its_namespaces_and_its_scope(server: Serve, url: str, namespace: str) -> None:
    a, b = namespace + "a", namespace + "b"
    key_a, key_b = new_key(url, a), new_key(url, b)
    reader = new_key(url, a, scope="read")
    text = {"content-type": "text/plain"}
    assert httpx.put(server.stream(f"{a}/x"), content=b"A", headers={**text, **bearer(key_a)}).status_code == 201
    assert httpx.put(server.stream(f"{b}/y"), content=b"B", headers={**text, **bearer(key_b)}).status_code == 201
    for method in ("GET", "HEAD", "DELETE"):
        assert httpx.request(method, server.stream(f"{b}/y"), headers=bearer(key_a)).status_code == 403
    assert httpx.post(server.stream(f"{b}/y"), content=b"!", headers={**text, **bearer(key_a)}).status_code == 403
    assert httpx.post(server.stream(f"{a}/x"), content=b"!", headers={**text, **bearer(reader)}).status_code == 403
    assert httpx.delete(server.stream(f"{a}/x"), headers=bearer(reader)).status_code == 403
    assert httpx.get(server.stream(f"{a}/x"), headers=bearer(reader)).content == b"A"
    assert httpx.get(server.stream(f"{b}/y"), headers=bearer(key_b)).content == b"B"  # untouched
    for source in (f"{b}/y", f"/v1/stream/{b}/y"):  # a fork copies its source: it needs to reach it
        fork = httpx.put(server.stream(f"{a}/fork"), headers={"stream-forked-from": source, **bearer(key_a)})
        assert fork.status_code == 403
    assert httpx.head(server.stream(f"{a}/fork"), headers=bearer(key_a)).status_code == 404
    both = new_key(url, a, b)
    assert (
        httpx.put(server.stream(f"{a}/fork"), headers={"stream-forked-from": f"{b}/y", **bearer(both)}).status_code
        == 201
    )
    assert httpx.get(server.stream(f"{a}/fork"), headers=bearer(key_a)).content == b"B"

    async def chat() -> None:
        c = AsyncChatHistory("s", namespace=b, url=url)
        await c.append({"role": "user", "content": "B-SECRET"})
        await c.close()

    asyncio.run(chat())
    assert httpx.get(server.stream(f"chat/{b}/s"), headers=bearer(key_a)).status_code == 403
    assert "B-SECRET" in httpx.get(server.stream(f"chat/{b}/s"), headers=bearer(key_b)).text
    # the handlers route on the decoded path: an encoded 'chat/<ns>/' is that conversation, and
    # is checked against <ns> (not against a namespace called 'chat')
    key_chat = new_key(url, "chat")
    for target in (f"/v1/stream/chat%2F{b}%2Fs", f"/v1/stream/chat%2f{b}%2fs"):
        status, data = raw_request(server, target.encode(), headers=bearer(key_chat))
        assert status == 403 and b"B-SECRET" not in data
    # a chat answer's stream (answers/<ns>/<id>) and the chat API belong to <ns>
    assert httpx.put(server.stream(f"answers/{b}/z"), content=b"Z", headers={**text, **bearer(key_b)}).status_code == 201
    assert httpx.get(server.stream(f"answers/{b}/z"), headers=bearer(key_a)).status_code == 403
    assert httpx.get(server.stream(f"answers/{b}/z"), headers=bearer(key_b)).content == b"Z"
    assert httpx.get(f"{server.base}/v1/chat/{b}?user=u", headers=bearer(key_a)).status_code == 403
    assert httpx.get(f"{server.base}/v1/chat/{b}?user=u", headers=bearer(key_b)).status_code == 200
    assert httpx.get(f"{server.base}/").status_code == 200  # the page itself holds no data
    # a path that names no namespace is server-wide: only an admin key for every namespace
    assert httpx.get(f"{server.base}/metrics", headers=bearer(key_a)).status_code == 403
    assert httpx.get(f"{server.base}/metrics").status_code == 401
    admin = new_key(url, "*", scope="admin")
    metrics = httpx.get(f"{server.base}/metrics", headers=bearer(admin))
    assert metrics.status_code == 200 and b"# TYPE" in metrics.content


def test_public_namespaces_are_served_without_a_key_and_no_others(server: Serve, namespace: str) -> None:
    ns = "pub-" + namespace
    text = {"content-type": "text/plain"}
    assert httpx.put(server.stream(f"{ns}/s"), content=b"hi", headers=text).status_code == 201
    assert httpx.get(server.stream(f"{ns}/s")).content == b"hi"
    assert httpx.put(server.stream(f"{namespace}/s"), content=b"hi", headers=text).status_code == 401
    assert httpx.delete(f"{server.base}/memory/{ns}").status_code == 401  # deleting a namespace needs admin
    assert httpx.get(f"{server.base}/metrics").status_code == 401


CRAFTED = [
    b"/v1/stream/{a}/../{b}/secret",
    b"/v1/stream/{a}/%2e%2e/{b}/secret",
    b"/v1/stream/{a}%2F..%2F{b}/secret",
    b"/v1/stream/{a}/..%2F..%2F{b}%2Fsecret",
    b"/v1/stream/../{b}/secret",
    b"/v1/stream/%2e%2e/{b}/secret",
    b"/v1/stream/./{b}/secret",
    b"/v1/stream//{b}/secret",
    b"/v1/stream/*/secret",
    b"/v1/stream/%2A/secret",
    b"/v1/stream/>/secret",
    b"/v1/stream/{a}*/secret",
    b"/v1/stream/{b}%00/secret",
    b"/v1/stream/{a}/%FF%FE/secret",
    b"/v1/stream/{a}/\xff\xfe",
    b"/v1/stream/{a}/" + b"x" * 5000,
    b"/v1/stream%2F{b}/secret",
    b"/v1%2Fstream/{b}/secret",
    b"/v1/stream%2Fchat/{b}/s",
    b"/v1/stream/chat/{a}/..%2F..%2F{b}%2Fs",
    b"/v1/stream/chat/{a}%2F..%2F{b}/s",
    b"/v1/stream/chat/../{b}/s",
    b"/v1/stream/chat/*/s",
    b"/v1/stream/chat/%2A/s",
    b"/memory/{b}/secret",
    b"/memory/{a}/../{b}/secret",
    b"/memory/{a}%2F..%2F{b}/secret",
    b"/v1/ns/{b}/keys/secret",
]


def test_crafted_paths_never_reach_another_namespace_and_write_nothing_there(
    server: Serve, url: str, namespace: str
) -> None:
    a, b = namespace + "a", namespace + "b"
    key_a, key_b = new_key(url, a, scope="admin"), new_key(url, b)
    text = {"content-type": "text/plain"}
    assert (
        httpx.put(server.stream(f"{b}/secret"), content=b"B-SECRET", headers={**text, **bearer(key_b)}).status_code
        == 201
    )

    async def chat(op: str) -> int:
        c = AsyncChatHistory("s", namespace=b, url=url)
        try:
            if op == "write":
                await c.append({"role": "user", "content": "B-SECRET"})
            return len(await c.messages())
        finally:
            await c.close()

    asyncio.run(chat("write"))
    seen: list[tuple[bytes, bytes, int]] = []
    for pattern in CRAFTED:
        target = pattern.replace(b"{a}", a.encode()).replace(b"{b}", b.encode())
        for method, body in ((b"GET", b""), (b"HEAD", b""), (b"PUT", b"EVIL"), (b"POST", b"EVIL"), (b"DELETE", b"")):
            status, response = raw_request(server, target, method, {**bearer(key_a), **text}, body)
            assert b"B-SECRET" not in response, (target, method)
            seen.append((target, method, status))
            assert status != 0, (target, method)
    assert httpx.get(server.stream(f"{b}/secret"), headers=bearer(key_b)).content == b"B-SECRET"
    assert asyncio.run(chat("read")) == 1
    # the refusals are refusals, not 5xx
    assert all(status < 500 for _, _, status in seen), [s for s in seen if s[2] >= 500]


def test_a_server_without_auth_listens_on_loopback_only(url: str, tmp_path: Path) -> None:
    done = botwire("serve", "--host", "0.0.0.0", "--port", "1", "--url", url, check=False)
    assert done.returncode == 2 and "without auth" in done.stderr and "--auth" in done.stderr
    log = tmp_path / "serve.log"
    with serving(url, log) as serve:
        assert "no auth" in log.read_text() and "loopback only" in log.read_text()
        stream = serve.stream(f"{uuid.uuid4().hex}/s")  # and requests need no key, as before
        assert httpx.put(stream, content=b"x", headers={"content-type": "text/plain"}).status_code == 201
