"""QA-9: attacks on the HTTP API (issue 9) with a real nats-server and real ``botwire serve``."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, ChatHistory, Memory, errors
from tests import procs
from tests.http_serve import Serve, Serves
from tests.test_auth import bearer, new_key, raw_request, server
from tests.test_quota import pair
from tests.waits import sigstop

__all__ = ["pair", "server"]  # module-scoped serve processes of tests/test_auth.py and tests/test_quota.py


def test_a_percent_encoded_route_prefix_never_reaches_a_namespace_auth_did_not_check(
    server: Serve, url: str, namespace: str
) -> None:
    """Auth reads the decoded path, the dispatchers the raw one: with the prefix itself encoded
    (``/v1/%6Es/keys/k`` decodes to ``/v1/ns/keys/k``, namespace ``keys``) the raw path cut at
    the prefix's length named another namespace (``s``), which a key for ``keys`` then wrote."""
    victim = "s"  # the namespace the raw cut lands in; must stay untouched
    key = new_key(url, "keys", scope="write")
    text = {"content-type": "application/json"}
    crafted = [
        (b"PUT", b"/v1/%6Es/keys/" + namespace.encode(), b'{"value": "EVIL"}'),
        (b"GET", b"/v1/%6Es/keys/" + namespace.encode(), b""),
        (b"PUT", b"/memor%79/" + namespace.encode(), b'{"value": "EVIL"}'),
        (b"GET", b"/memor%79/" + namespace.encode(), b""),
    ]
    for method, target, body in crafted:
        status, response = raw_request(server, target, method, {**bearer(key), **text}, body)
        assert status < 500, (target, response)
        assert b"EVIL" not in response

    async def stored() -> tuple[object, object]:
        async with AsyncMemory(namespace=victim, url=url) as m1, AsyncMemory(namespace="9", url=url) as m2:
            return await m1.get(namespace), await m2.get(namespace)

    assert asyncio.run(stored()) == (None, None)
    # the honest spelling of the same routes still works for the key's own namespace
    r = httpx.put(server.base + f"/v1/ns/keys/keys/{namespace}", json={"value": "ok"}, headers=bearer(key))
    assert r.status_code < 300, r.text


def test_the_http_transport_raises_unauthorized_for_a_refused_key_not_server_unavailable(
    server: Serve, url: str, namespace: str
) -> None:
    """The auth middleware refuses in text/plain before any route: the client turned those 401/403
    into ``ServerUnavailable`` ("answered 401 without an error body"), which callers retry forever."""
    other = new_key(url, "other-" + namespace, scope="write")
    reader = new_key(url, namespace, scope="read")
    for token in ("bwk_not_a_key", str(other["key"]), str(reader["key"])):
        with Memory(namespace, url=server.base, token=token) as mem, pytest.raises(errors.Unauthorized) as caught:
            mem.set("k", "EVIL")
        assert not isinstance(caught.value, errors.ServerUnavailable)
    with Memory(namespace, url=server.base, token=str(reader["key"])) as mem:
        assert mem.get("k") is None  # the reader reaches it: nothing was written
    with Memory(namespace, url=server.base) as anonymous, pytest.raises(errors.Unauthorized):
        anonymous.get("k")


def test_quota_refusals_reach_the_http_transport_as_quota_exceeded_and_the_limit_holds_under_a_race(
    pair: tuple[Serve, Serve], namespace: str
) -> None:
    """Twenty writes at once over two serve processes to a namespace allowed 5 a day: exactly 5
    admitted and stored; the library over HTTP then gets ``QuotaExceeded`` (not ``ServerUnavailable``)."""
    one, two = pair
    ns = f"q-{namespace}"

    async def race() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            got = await asyncio.gather(
                *(client.put(f"{(one, two)[i % 2].base}/v1/ns/{ns}/keys/k{i}", json={"value": i}) for i in range(20))
            )
        return [r.status_code for r in got]

    statuses = asyncio.run(race())
    assert sorted(statuses) == [200] * 5 + [429] * 15, statuses
    with Memory(ns, url=one.base) as mem:
        assert len(mem.list_keys("*")) == 5
        with pytest.raises(errors.QuotaExceeded):
            mem.set("late", 1)
        assert mem.get("late") is None


def test_a_namespace_over_its_bytes_limit_can_still_delete_to_make_room(
    pair: tuple[Serve, Serve], url: str, namespace: str
) -> None:
    """The 429 says "delete keys or conversations to write again", but a DELETE is a write to the
    quota check, and the bytes check refused it too: a full namespace could never be emptied."""
    one, two = pair
    ns = f"b-{namespace}"
    with Memory(ns, url=url) as memory:
        memory.set("big", "x" * 30_000)  # over the 20 kB limit
        memory.set("other", "y" * 30_000)
    for serve, path in ((one, f"/v1/ns/{ns}/keys/big"), (two, f"/memory/{ns}/other")):
        deadline = time.monotonic() + 10  # each server re-reads a namespace's size at most once a second
        while (got := httpx.put(serve.base + f"/v1/ns/{ns}/keys/new", json={"value": 1})).status_code != 429:
            assert got.status_code == 200 and time.monotonic() < deadline, got.text
            httpx.delete(serve.base + f"/v1/ns/{ns}/keys/new")
            time.sleep(0.2)
        gone = httpx.delete(serve.base + path)
        assert gone.status_code == 200, gone.text
    with Memory(ns, url=url) as memory:
        assert memory.get("big") is None and memory.get("other") is None


REST_CRAFTED = [
    b"/v1/ns/{b}/keys",
    b"/v1/ns/{b}/watch",
    b"/v1/ns/{b}/keys/secret/revisions",
    b"/v1/ns/{a}/keys/..%2F..%2F{b}%2Fkeys%2Fsecret",
    b"/v1/ns/{a}%2F..%2F{b}/keys/secret",
    b"/v1/ns/{a}/../{b}/keys/secret",
    b"/v1/ns/{a}/keys/%2A",
    b"/v1/ns/{a}/keys/%3E",
    b"/v1/ns/{a}/keys/a%00b",
    b"/v1/ns/{a}/keys/%FF%FE",
    b"/v1/ns/{a}/keys/" + b"k" * 5000,
    b"/v1/ns/{b}/chats",
    b"/v1/ns/{b}/chats/s/messages",
    b"/v1/ns/{a}/chats/..%2F..%2F{b}%2Fchats%2Fs/messages",
    b"/v1/ns/{a}%2F..%2F{b}/chats/s/messages",
    b"/memory/{b}",
    b"/memory/{b}?limit=1000",
    b"/memory/{a}/..%2F{b}%2Fsecret",
    b"/memory/{a}/%2E%2E/{b}",
    b"/v1/chat/{b}?user=u",
    b"/v1/chat/{b}/s/messages",
    b"/v1/chat/{a}%2F..%2F{b}/s/messages",
    b"/v1/chat/{a}/..%2F{b}%2Fs/messages",
    b"/v1/n%73/{b}/keys/secret",
    b"/v1/ns/\xef\xbd\x81/keys/secret",  # a fullwidth letter: NFKC would make it 'a'
]


def test_crafted_rest_hosted_and_chat_paths_with_a_key_of_one_namespace_never_reach_another(
    server: Serve, url: str, namespace: str
) -> None:
    """The REST, hosted and chat routes (tests/test_auth.py crafts /v1/stream/ and three of
    these): a key of namespace a, with every method, never sees or changes namespace b."""
    a, b = namespace + "a", namespace + "b"
    key_a = new_key(url, a, scope="admin")

    async def seed() -> None:
        async with AsyncMemory(namespace=b, url=url) as mem:
            await mem.set("secret", "B-SECRET")
        async with AsyncChatHistory("s", namespace=b, url=url) as chat:
            await chat.append({"role": "user", "content": "B-SECRET"})

    asyncio.run(seed())
    json_ct = {"content-type": "application/json"}
    for pattern in REST_CRAFTED:
        target = pattern.replace(b"{a}", a.encode()).replace(b"{b}", b.encode())
        for method, body in (
            (b"GET", b""),
            (b"HEAD", b""),
            (b"PUT", b'{"value": "EVIL"}'),
            (b"POST", b'{"content": "EVIL", "role": "user"}'),
            (b"DELETE", b""),
        ):
            status, response = raw_request(server, target, method, {**bearer(key_a), **json_ct}, body)
            assert 0 < status < 500, (target, method, response[:300])
            assert b"B-SECRET" not in response, (target, method)

    async def check() -> tuple[object, list[str], int]:
        async with AsyncMemory(namespace=b, url=url) as mem, AsyncChatHistory("s", namespace=b, url=url) as chat:
            return await mem.get("secret"), await mem.list_keys("*"), len(await chat.messages())

    assert asyncio.run(check()) == ("B-SECRET", ["secret"], 1)


def test_update_from_two_processes_through_two_serve_processes_loses_no_increment(
    pair: tuple[Serve, Serve], namespace: str, tmp_path: Path
) -> None:
    """Two OS processes, each on its own serve process, ``update(+1)`` one key 15 times each at
    once: every conditional write that lost a race (409 over HTTP) is retried, none is lost."""
    one, two = pair
    ns, go = f"h-{namespace}", tmp_path / "go"
    outs = procs.run_together("tests.workers", [["incr", s.base, ns, "n", "15", str(go)] for s in (one, two)], go)
    assert sorted(v for out in outs for v in out) == list(range(1, 31))
    with Memory(ns, url=two.base) as mem:
        assert mem.get("n") == 30


@pytest.mark.slow
def test_the_http_transport_with_its_serve_process_stopped_or_killed_raises_within_a_bound(
    url: str, namespace: str, serves: Serves
) -> None:
    """A serve process SIGSTOPped mid-call: a ``set`` raises ``OutcomeUnknown`` (stored once or not
    at all), a ``get`` ``ServerUnavailable``, each within a bound;
    SIGKILLed: ``ServerUnavailable`` at once for reads and writes, nothing half-written."""
    serve = serves.start(url)
    with Memory(namespace, url=serve.base, timeout=1.0) as mem:
        mem.set("k", "before")
        sigstop(serve.proc.pid)
        try:
            for call, expected in (
                (lambda: mem.set("k", "during"), errors.OutcomeUnknown),
                (lambda: mem.get("k"), errors.ServerUnavailable),
            ):
                start = time.monotonic()
                with pytest.raises(expected):
                    call()
                assert time.monotonic() - start < 3 * (1.0 + 5.0)  # does not hang
        finally:
            serve.proc.send_signal(signal.SIGCONT)
        assert mem.get("k") in ("before", "during")  # served again once it goes on
        with Memory(namespace, url=url) as direct:  # the unanswered set: stored once or not at all
            stored = [r.value for r in direct.revisions("k")]
            assert stored in (["before"], ["before", "during"]), stored
        serve.kill()
        for call in (lambda: mem.set("k", "after"), lambda: mem.get("k")):
            with pytest.raises(errors.ServerUnavailable):
                call()
    with Memory(namespace, url=url) as direct:
        assert [r.value for r in direct.revisions("k")] == stored  # nothing written after the kill


def test_a_revision_past_the_sequence_range_is_refused_not_written_nor_a_500(
    pair: tuple[Serve, Serve], namespace: str
) -> None:
    """``{"revision": 2**64}`` went to NATS as an expected sequence it cannot parse, which it took
    as "no message yet": a write conditional on a revision the key never had was stored. A watch
    ``after`` past 2**64 came back as a 500 naming NATS's JSON error."""
    one, _ = pair
    base = f"{one.base}/v1/ns/h-{namespace}"
    for revision in (2**64, 2**70):
        r = httpx.put(f"{base}/keys/fresh", json={"value": "EVIL", "revision": revision})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_argument", r.text
    assert httpx.put(f"{base}/keys/held", json={"value": "kept"}).status_code == 200
    r = httpx.put(f"{base}/keys/held", json={"value": "EVIL", "revision": 2**64 + 1})
    assert r.status_code in (400, 409), r.text
    with httpx.stream("GET", f"{base}/watch", params={"after": str(2**64)}, timeout=10) as r:
        r.read()
        assert r.status_code == 400 and b"NATS" not in r.content, r.content
    with Memory(f"h-{namespace}", url=one.base) as mem:
        assert mem.get("fresh") is None and mem.get("held") == "kept"


def test_a_hosted_value_of_the_full_100000_characters_is_taken_however_its_json_escapes_them(
    pair: tuple[Serve, Serve], namespace: str
) -> None:
    """The hosted API takes a value of up to 100,000 characters; the body limit assumed 4 bytes
    a character, but JSON written with ASCII escapes (Python's ``json.dumps``, ``requests``)
    spends 6 bytes on each non-ASCII or control character and 12 on one outside the BMP: a
    valid value was refused with 413."""
    one, two = pair
    ns = f"h-{namespace}"
    values = {"cjk": "\u6f22" * 100_000, "emoji": "\U0001f600" * 100_000, "ctl": "\x01" * 100_000}
    for key, value in values.items():
        body = json.dumps({"value": value})  # ensure_ascii: \\uXXXX escapes
        r = httpx.put(
            f"{one.base}/memory/{ns}/{key}", content=body, headers={"content-type": "application/json"}, timeout=30
        )
        assert r.status_code == 200, (key, r.status_code, r.text[:200])
        assert httpx.get(f"{two.base}/memory/{ns}/{key}", timeout=30).json()["value"] == value
    over = json.dumps({"value": "\u6f22" * 100_001})
    r = httpx.put(f"{one.base}/memory/{ns}/over", content=over, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "100000 characters" in r.text
    with Memory(ns, url=one.base) as mem:
        assert mem.get("cjk") == values["cjk"] and mem.get("over") is None


def test_rest_json_bodies_sent_as_a_form_or_text_are_refused_with_415_and_nothing_written(
    pair: tuple[Serve, Serve], namespace: str
) -> None:
    """What the chat API refuses (tests/test_demo_chat.py): JSON sent as text/plain or a form, or
    with no content type, is what any web page can POST cross-site without a preflight (to a
    loopback serve without auth, or to ``--public`` namespaces). REST's conversation append and
    fork took it and wrote."""
    one, _ = pair
    ns = f"h-{namespace}"
    base = f"{one.base}/v1/ns/{ns}"
    posts = [
        (f"{base}/chats/s/messages", b'{"message": {"role": "user", "content": "EVIL"}}'),
        (f"{base}/chats/s/fork", b'{"session_id": "t"}'),
        (f"{base}/keys/k", b'{"value": "EVIL"}'),
    ]
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": ctype} if ctype else {}
        for target, body in posts:
            method = "PUT" if "/keys/" in target else "POST"
            r = httpx.request(method, target, content=body, headers=headers)
            assert r.status_code == 415, (ctype, target, r.status_code, r.text)
            assert r.json()["error"]["code"] == "unsupported_media_type"
    with Memory(ns, url=one.base) as mem:
        assert mem.get("k") is None
    with ChatHistory("s", namespace=ns, url=one.base) as chat:
        assert chat.messages() == []
    # sent as JSON (with parameters, or a +json type) it is taken
    ok = httpx.post(posts[0][0], content=posts[0][1], headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code < 300, ok.text
    ok = httpx.put(posts[2][0], content=posts[2][1], headers={"content-type": "application/merge-patch+json"})
    assert ok.status_code < 300, ok.text


def test_an_idempotency_key_reused_in_another_conversation_or_namespace_gets_its_own_answer(
    url: str, namespace: str, serves: Serves
) -> None:
    """The same ``Idempotency-Key`` and message in two conversations of one namespace and in a
    conversation of another: each is a question of its own (never the other's answer URL);
    odd keys (over 255, spaces, non-ASCII, empty) are 400 and write nothing."""
    serve = serves.chat(url, {"BOTWIRE_FAKE_PACE": "0", "BOTWIRE_FAKE_TOKENS": "3"})
    with httpx.Client(base_url=serve.base, timeout=20) as client:
        places = []
        for ns in (namespace, namespace, namespace + "-b"):
            r = client.post(f"/v1/chat/{ns}", json={"user": "ada"})
            places.append((ns, r.json()["session"]))
        answers = []
        for ns, session in places:
            r = client.post(
                f"/v1/chat/{ns}/{session}/messages", json={"content": "same"}, headers={"Idempotency-Key": "k"}
            )
            assert r.status_code == 202, r.text
            answers.append(r.json()["answer"])
            assert f"/answers/{ns}/" in answers[-1]
        assert len(set(answers)) == 3
        ns, session = places[0]
        for bad in ("x" * 256, "a b", "\u00e9", ""):
            r = client.post(
                f"/v1/chat/{ns}/{session}/messages",
                json={"content": "odd", "idempotency_key": bad},
            )
            assert r.status_code == 400, (bad, r.text)
    for ns, session in places:
        with ChatHistory(session, namespace=ns, url=url) as chat:
            assert [m["content"] for m in chat.messages() if m["role"] == "user"] == ["same"]
