"""QA of r1 (``botwire serve``'s chat API): Idempotency-Key retries across faults (a lost
acknowledgement, a cancelled request), /openapi.json against what the chat routes accept and
refuse, path parameters over their limits, and the page's limits against the server's.

The fault tests run the chat service in this process, over a loopback relay to a real
nats-server (``tests/proxy.py``), so that a reply can be lost at the exact write under test."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
from starlette.applications import Starlette

from botwire_stream import AsyncChatHistory, AsyncMemory
from botwire_stream.server.chatapi import MAX_MESSAGE_CHARS, ChatService
from botwire_stream.server.model import FakeModel
from botwire_stream.server.openapi import document
from botwire_stream.tokens import open_token_streams
from tests.proxy import Relay
from tests.servers import NatsServer
from tests.waits import until


@contextlib.asynccontextmanager
async def _service(
    nats_server: NatsServer, relay: Relay | None = None, lease_ttl: int = 1
) -> AsyncIterator[tuple[httpx.AsyncClient, ChatService]]:
    """The chat routes of one serve process whose NATS calls (1 s timeout) go through ``relay``."""
    store, client = await open_token_streams(url=nats_server.url)
    url = nats_server.url if relay is None else relay.url
    service = ChatService({"url": url, "timeout": 1.0}, FakeModel(pace=0, tokens=3), lease_ttl=lease_ttl)  # type: ignore[dict-item]
    await service.start(store)
    app = Starlette(routes=service.routes())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as http:
            yield http, service
    finally:
        await service.close()
        await client.close()


@contextlib.asynccontextmanager
async def _relayed(nats_server: NatsServer, lease_ttl: int = 1) -> AsyncIterator[tuple[httpx.AsyncClient, Relay]]:
    """``_service`` over a ``Relay`` to ``nats_server`` (closed afterwards): the HTTP client and the relay."""
    relay = await Relay(nats_server.port).start()
    try:
        async with _service(nats_server, relay, lease_ttl) as (http, _):
            yield http, relay
    finally:
        await relay.close()


async def _conversation(http: httpx.AsyncClient, namespace: str) -> tuple[str, str, dict[str, str]]:
    """A new conversation of ``namespace``: its id, the URL of its messages, and a header with a
    fresh Idempotency-Key."""
    r = await http.post(f"/v1/chat/{namespace}", json={"user": "ada"})
    assert r.status_code == 201, r.text
    session = r.json()["session"]
    return session, f"/v1/chat/{namespace}/{session}/messages", {"Idempotency-Key": "k-" + uuid.uuid4().hex}


async def _closed_within(nats_server: NatsServer, path: str, bound: float) -> bool:
    """Whether the answer stream at ``path`` is closed within ``bound`` seconds (polled)."""
    store, client = await open_token_streams(url=nats_server.url)
    try:
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            if (await store.read(path, "-1")).closed:
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await client.close()


async def _one_question_and_its_answer_ends(
    nats_server: NatsServer, namespace: str, session: str, retry: httpx.Response
) -> None:
    """The conversation holds the question once, under the retry's answer stream, which ends."""
    chat = AsyncChatHistory(session, namespace=namespace, url=nats_server.url)
    try:
        questions = [m for m in await chat.messages() if m["role"] == "user"]
    finally:
        await chat.close()
    assert [q["content"] for q in questions] == ["hello"]
    assert questions[0]["meta"]["stream"] == retry.json()["stream"]
    assert await _closed_within(nats_server, retry.json()["stream"], 20.0)


@pytest.mark.slow
async def test_a_retry_after_the_questions_ack_was_lost_gets_an_answer_stream_that_ends(
    nats_server: NatsServer, namespace: str
) -> None:
    """The question is stored but its acknowledgement never reaches serve (OutcomeUnknown): the
    client's retry with the same Idempotency-Key must get the stored question's 202 (one
    question stored) and an answer stream that ends. It got a stream nobody would ever close:
    serve had forgotten that answer (its record deleted as if the question was not stored), and
    dropped the key's hold, so a retry after the 120 s duplicate window would store it twice."""
    async with _relayed(nats_server) as (http, relay):
        session, url, key = await _conversation(http, namespace)
        relay.trigger = b"botwire-idem-"  # the question's Nats-Msg-Id: its ack (and all after) lost
        lost = await asyncio.wait_for(http.post(url, json={"content": "hello"}, headers=key), 30)
        assert lost.status_code >= 500, lost.text  # not known to be stored: the client retries
        relay.drop = False
        retry = await asyncio.wait_for(http.post(url, json={"content": "hello"}, headers=key), 30)
        assert retry.status_code == 202, retry.text
        await _one_question_and_its_answer_ends(nats_server, namespace, session, retry)


@pytest.mark.slow
async def test_a_question_whose_ack_was_lost_in_a_short_stall_is_neither_orphaned_nor_forgotten(
    nats_server: NatsServer, namespace: str
) -> None:
    """As above, but the replies come back right after the question's append gave up (a stall
    just longer than the timeout), so serve's clean-up reached the server: it deleted the
    answer's record and the key's hold as if the question had not been stored. The retry then
    got (through the duplicate window) the stored question's 202 with an answer stream that
    nobody would ever close (no record, so no lease watcher); and without the hold, a retry after
    that window would store the question again. A write of unknown outcome must keep both."""
    async with _relayed(nats_server, lease_ttl=3) as (http, relay):
        session, url, key = await _conversation(http, namespace)
        relay.trigger = b"botwire-idem-"  # the question's Nats-Msg-Id: its ack is lost
        # ... and replies flow again from serve's next look at an answer's record (a clean-up)
        relay.undrop = re.compile(rb"answer\.[0-9a-f]")
        lost = await asyncio.wait_for(http.post(url, json={"content": "hello"}, headers=key), 30)
        assert lost.status_code >= 500, lost.text
        relay.drop, relay.undrop = False, None
        retry = await asyncio.wait_for(http.post(url, json={"content": "hello"}, headers=key), 30)
        assert retry.status_code == 202, retry.text
        await _one_question_and_its_answer_ends(nats_server, namespace, session, retry)


async def test_a_message_of_the_longest_allowed_length_is_taken_however_its_json_escapes_it(
    nats_server: NatsServer, namespace: str
) -> None:
    """32,000 characters are allowed whatever they are, and JSON may spell each as escapes
    (``json.dumps``' default, so ``requests``' ``json=``: 6 bytes a CJK character, 12 an
    emoji). The body limit counted 4 bytes a character: such a message got a 413."""
    async with _service(nats_server) as (http, _):
        session, url, _ = await _conversation(http, namespace)
        sent = ["中" * MAX_MESSAGE_CHARS, "\U0001f600" * MAX_MESSAGE_CHARS]
        for content in sent:
            body = json.dumps({"content": content}).encode()  # ASCII only: every character escaped
            r = await http.post(url, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 202, (len(body), r.text)
        too_long = json.dumps({"content": "a" * (MAX_MESSAGE_CHARS + 1)}).encode()
        r = await http.post(url, content=too_long, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "characters" in r.json()["error"]
        chat = AsyncChatHistory(session, namespace=namespace, url=nats_server.url)
        try:
            assert [m["content"] for m in await chat.messages() if m["role"] == "user"] == sent
        finally:
            await chat.close()


# Bodies of POST .../messages: the documented NewMessage schema must take exactly the ones the
# server takes (status 202), and refuse the ones it refuses.
_MESSAGE_BODIES: list[object] = [
    {"content": "hi"},
    {"content": " hi\n"},
    {"content": "   "},
    {"content": "\n\t"},
    {"content": ""},
    {"content": 5},
    {"content": None},
    {},
    [],
    {"content": "hi", "idempotency_key": None},
    {"content": "hi", "idempotency_key": "a b"},
    {"content": "hi", "idempotency_key": 7},
    {"content": "a" * (MAX_MESSAGE_CHARS + 1)},
]


async def test_the_documented_message_schema_takes_exactly_what_the_server_takes(
    nats_server: NatsServer, namespace: str
) -> None:
    """A blank message ("   ") was valid by /openapi.json (``minLength: 1``) yet refused (400):
    a client generated from the document could not know. Each body here must be valid by the
    schema if and only if the server accepts it, and a refused one stores nothing."""
    spec = document()
    validator = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/NewMessage", **spec})
    async with _service(nats_server) as (http, _):
        session, url, _ = await _conversation(http, namespace)
        accepted = 0
        for body in _MESSAGE_BODIES:
            r = await http.post(url, json=body)
            assert (r.status_code == 202) == validator.is_valid(body), (body, r.status_code, r.text)
            assert r.status_code == 202 or 400 <= r.status_code < 500 and r.json()["error"], (body, r.text)
            accepted += r.status_code == 202
        chat = AsyncChatHistory(session, namespace=namespace, url=nats_server.url)
        try:
            assert len([m for m in await chat.messages() if m["role"] == "user"]) == accepted
        finally:
            await chat.close()


@pytest.mark.slow
async def test_a_question_append_cancelled_midway_keeps_its_key_so_a_retry_finds_it(
    nats_server: NatsServer, namespace: str
) -> None:
    """The request is cancelled (its client gone, a shutdown) while the question's append waits
    for its acknowledgement: the question is stored, but serve dropped the answer's record and
    the key's hold as after a definite failure. The retry with the same key then got (through
    the duplicate window) the stored question's 202 with an answer stream nobody would close,
    and after that window it would store the question again. A cancelled append is unconfirmed:
    it keeps both, as one that timed out does."""
    async with _relayed(nats_server) as (http, relay):
        session, url, key = await _conversation(http, namespace)
        relay.trigger = b"botwire-idem-"  # the question's Nats-Msg-Id: its ack is lost
        # ... and replies flow again from serve's next look at an answer's record (a clean-up:
        # while they were lost, the clean-up's deletes never completed, and the test passed)
        relay.undrop = re.compile(rb"answer\.[0-9a-f]")
        post = asyncio.ensure_future(http.post(url, json={"content": "hello"}, headers=key))
        chat = AsyncChatHistory(session, namespace=namespace, url=nats_server.url)
        try:

            async def stored() -> bool:
                assert not post.done(), post.result().text  # still waiting for the lost ack
                return len(await chat.messages()) == 1

            await until(stored, "the question is stored", bound=10)
        finally:
            await chat.close()
        post.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(post, 30)
        relay.drop, relay.undrop = False, None
        retry = await asyncio.wait_for(http.post(url, json={"content": "hello"}, headers=key), 30)
        assert retry.status_code == 202, retry.text
        await _one_question_and_its_answer_ends(nats_server, namespace, session, retry)


def _is_valid(schema: dict[str, Any], value: object) -> bool:
    """``value`` against one schema of /openapi.json (``$ref``s resolved in the document)."""
    return bool(jsonschema.Draft202012Validator({**schema, "components": document()["components"]}).is_valid(value))


def _parameter(path: str, method: str, name: str) -> dict[str, Any]:
    params = document()["paths"][path][method]["parameters"]
    schema: dict[str, Any] = next(p["schema"] for p in params if p["name"] == name)
    return schema


async def test_the_documented_patterns_refuse_a_trailing_newline_as_the_server_does(
    nats_server: NatsServer, namespace: str
) -> None:
    """/openapi.json wrote its patterns as ``^...$``, and a Python validator's ``$`` matches before
    a final newline: "ada\\n" was a valid user, namespace and idempotency key by the document
    (jsonschema) and refused by the server. Each value here is valid by its documented schema if
    and only if the server accepts it; a refused one stores nothing."""
    conversation = {"$ref": "#/components/schemas/NewConversation"}
    message = {"$ref": "#/components/schemas/NewMessage"}
    user_query = _parameter("/v1/chat/{ns}", "get", "user")
    ns_path = _parameter("/v1/chat/{ns}", "get", "ns")
    async with _service(nats_server) as (http, _):
        session = (await http.post(f"/v1/chat/{namespace}", json={"user": "ada"})).json()["session"]
        created = asked = 0
        for value in ["bob", "bob\n", "b" * 40, "b" * 40 + "\n", "bob\n\n"]:
            r = await http.post(f"/v1/chat/{namespace}", json={"user": value})
            assert (r.status_code == 201) == _is_valid(conversation, {"user": value}), (value, r.text)
            created += r.status_code == 201
            r = await http.get(f"/v1/chat/{namespace}", params={"user": value})
            assert (r.status_code == 200) == _is_valid(user_query, value), (value, r.text)
        for value in ["k-1", "k-1\n", "k-2\r\n"]:
            body = {"content": "hi " + value, "idempotency_key": value}
            r = await http.post(f"/v1/chat/{namespace}/{session}/messages", json=body)
            assert (r.status_code == 202) == _is_valid(message, body), (value, r.text)
            asked += r.status_code == 202
        for value in [namespace, namespace + "\n"]:
            r = await http.get(f"/v1/chat/{quote(value)}", params={"user": "ada"})
            assert (r.status_code == 200) == _is_valid(ns_path, value), (value, r.text)
        assert (created, asked) == (2, 1)  # the values without a newline; those with one refused
        listed = (await http.get(f"/v1/chat/{namespace}", params={"user": "bob"})).json()["conversations"]
        assert len(listed) == 1
    chat = AsyncChatHistory(session, namespace=namespace, url=nats_server.url)
    try:
        assert [m["content"] for m in await chat.messages() if m["role"] == "user"] == ["hi k-1"]
    finally:
        await chat.close()


async def test_a_namespace_or_session_over_its_limit_is_a_400_naming_the_limit(
    nats_server: NatsServer, namespace: str
) -> None:
    """A session id over 1024 bytes got "key is 1113 UTF-8 bytes; the limit is 1024" (an internal
    key's limit), one of 300 characters a 404, and a long namespace an error cut (at 300
    characters) inside its own echo, before the limit. Each is now a 400 that names the limit,
    on every chat route, as /openapi.json documents (1-256 characters; 1-64 for a namespace),
    and nothing is stored."""
    session_schema = _parameter("/v1/chat/{ns}/{session}", "get", "session")
    async with _service(nats_server) as (http, _):
        for session in ["a" * 1100, "é" * 300, "a" * 257]:
            assert not _is_valid(session_schema, session)
            for method, path in [("GET", ""), ("POST", "/messages")]:
                r = await http.request(method, f"/v1/chat/{namespace}/{quote(session)}{path}", json={"content": "hi"})
                error = r.json()["error"]
                assert r.status_code == 400 and "256" in error and "session" in error and len(error) < 100, (len(session), r.text)
        # the longest the document allows, in 4-byte characters: no such conversation (404), not a 400
        for session in ["\U0001f600" * 256, "a" * 256]:
            assert _is_valid(session_schema, session)
            r = await http.get(f"/v1/chat/{namespace}/{quote(session)}")
            assert r.status_code == 404 and "no conversation" in r.json()["error"], r.text
        for ns in ["n" * 65, "n" * 2000]:
            for method, path in [("GET", "?user=ada"), ("POST", ""), ("GET", "/s"), ("POST", "/s/messages")]:
                r = await http.request(method, f"/v1/chat/{ns}{path}", json={"user": "ada", "content": "hi"})
                error = r.json()["error"]
                assert r.status_code == 400 and "1-64 characters" in error and len(error) < 150, (len(ns), method, path, r.text)
    async with AsyncMemory(namespace, url=nats_server.url) as memory:
        assert await memory.list_keys("*") == []
    assert await AsyncChatHistory.sessions(namespace=namespace, url=nats_server.url) == []


async def test_the_chat_page_is_served_with_the_servers_own_limits(nats_server: NatsServer, namespace: str) -> None:
    """The page (app.js, index.html) had its own copies of the user-name pattern and the
    32,000-character limit, free to drift from the server's. It now gets them from the server,
    in the page served at ``/``: they are exactly what the server takes (probed here), and the
    page's files hold no copy."""
    async with _service(nats_server) as (http, _):
        page = (await http.get("/")).text
        found = re.search(r'<meta name="botwire-limits" content="([^"]*)">', page)
        assert found, page
        limits = json.loads(html.unescape(found.group(1)))
        pattern, chars = limits["user_pattern"], limits["message_chars"]
        longest = max(n for n in range(1, 200) if re.search(pattern, "u" * n))
        for user in ["u" * longest, "u" * (longest + 1), "u-1", "u\n", ""]:
            r = await http.post(f"/v1/chat/{namespace}", json={"user": user})
            assert (r.status_code == 201) == bool(re.search(pattern, user)), (user, r.text)
        session = (await http.post(f"/v1/chat/{namespace}", json={"user": "u"})).json()["session"]
        for content in ["\U0001f600" * chars, "a" * chars, "a" * (chars + 1)]:
            r = await http.post(f"/v1/chat/{namespace}/{session}/messages", json={"content": content})
            assert r.status_code == (202 if len(content) <= chars else 413), (len(content), r.text)
        script = (await http.get("/static/app.js")).text
        assert "botwire-limits" in script
        for copy in (str(MAX_MESSAGE_CHARS), f"{MAX_MESSAGE_CHARS:_}", f"{MAX_MESSAGE_CHARS:,}", "{1,40}", "A-Za-z0-9"):
            assert copy not in script and copy not in page.replace(found.group(0), ""), copy
        assert (await http.get("/static/index.html")).status_code == 404  # no copy without the limits
