"""QA of r1 (``botwire serve``'s chat API): Idempotency-Key retries across faults, and
/openapi.json against what the chat routes accept and refuse.

The fault tests run the chat service in this process, over a loopback relay to a real
nats-server (``tests/proxy.py``), so that a reply can be lost at the exact write under test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
from starlette.applications import Starlette

from botwire_stream import AsyncChatHistory
from botwire_stream.server.chatapi import MAX_MESSAGE_CHARS, ChatService
from botwire_stream.server.model import FakeModel
from botwire_stream.server.openapi import document
from botwire_stream.tokens import open_token_streams
from tests.proxy import Relay
from tests.servers import NatsServer


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
    relay = await Relay(nats_server.port).start()
    try:
        async with _service(nats_server, relay) as (http, _):
            r = await http.post(f"/v1/chat/{namespace}", json={"user": "ada"})
            assert r.status_code == 201, r.text
            session = r.json()["session"]
            relay.trigger = b"botwire-idem-"  # the question's Nats-Msg-Id: its ack (and all after) lost
            url, key = f"/v1/chat/{namespace}/{session}/messages", {"Idempotency-Key": "k-" + uuid.uuid4().hex}
            lost = await asyncio.wait_for(http.post(url, json={"content": "hello"}, headers=key), 30)
            assert lost.status_code >= 500, lost.text  # not known to be stored: the client retries
            relay.drop = False
            retry = await asyncio.wait_for(http.post(url, json={"content": "hello"}, headers=key), 30)
            assert retry.status_code == 202, retry.text
            await _one_question_and_its_answer_ends(nats_server, namespace, session, retry)
    finally:
        await relay.close()


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
    relay = await Relay(nats_server.port).start()
    try:
        async with _service(nats_server, relay, lease_ttl=3) as (http, _):
            r = await http.post(f"/v1/chat/{namespace}", json={"user": "ada"})
            assert r.status_code == 201, r.text
            session = r.json()["session"]
            relay.trigger = b"botwire-idem-"  # the question's Nats-Msg-Id: its ack is lost
            # ... and replies flow again from serve's next look at an answer's record (a clean-up)
            relay.undrop = re.compile(rb"answer\.[0-9a-f]")
            url, key = f"/v1/chat/{namespace}/{session}/messages", {"Idempotency-Key": "k-" + uuid.uuid4().hex}
            lost = await asyncio.wait_for(http.post(url, json={"content": "hello"}, headers=key), 30)
            assert lost.status_code >= 500, lost.text
            relay.drop, relay.undrop = False, None
            retry = await asyncio.wait_for(http.post(url, json={"content": "hello"}, headers=key), 30)
            assert retry.status_code == 202, retry.text
            await _one_question_and_its_answer_ends(nats_server, namespace, session, retry)
    finally:
        await relay.close()


async def test_a_message_of_the_longest_allowed_length_is_taken_however_its_json_escapes_it(
    nats_server: NatsServer, namespace: str
) -> None:
    """32,000 characters are allowed whatever they are, and JSON may spell each as escapes
    (``json.dumps``' default, so ``requests``' ``json=``: 6 bytes a CJK character, 12 an
    emoji). The body limit counted 4 bytes a character: such a message got a 413."""
    async with _service(nats_server) as (http, _):
        r = await http.post(f"/v1/chat/{namespace}", json={"user": "ada"})
        session = r.json()["session"]
        url = f"/v1/chat/{namespace}/{session}/messages"
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
        r = await http.post(f"/v1/chat/{namespace}", json={"user": "ada"})
        session = r.json()["session"]
        url = f"/v1/chat/{namespace}/{session}/messages"
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
