"""Review follow-ups of ``botwire serve``: every route of the app is in ``/openapi.json``; an
``Idempotency-Key`` holds across a serve process killed between storing the question and
recording the key."""

from __future__ import annotations

import hashlib
import re
import signal

import httpx
import pytest
from starlette.routing import Mount, Route

from botwire_stream import ChatHistory, Memory
from botwire_stream.server.app import create_app
from botwire_stream.server.chatapi import REGISTRY_NAMESPACE
from botwire_stream.server.openapi import document
from tests.http_serve import Serve, Serves

# Not API operations: the chat page and its files, the document itself, the operators' probes, and
# /v1/stream/ (the Durable Streams protocol, described in the README)
_NOT_OPERATIONS = {"/", "/openapi.json", "/docs", "/healthz", "/readyz", "/metrics", "/v1/stream/{path:path}", "/{rest:path}"}
_PARAM = re.compile(r"\{[^}/]+\}")


def test_every_route_of_the_app_is_in_the_openapi_document(url: str) -> None:
    """A route added to the app without its operation in /openapi.json fails here (the chat routes
    were missing): each route's path and methods are in the document, and each dispatcher's prefix
    (/v1/ns/, /memory/) has its operations there."""
    app = create_app(url=url)
    doc = document()
    paths = doc["paths"]
    checked = 0
    for route in app.starlette.routes:
        if isinstance(route, Mount):
            continue
        assert isinstance(route, Route)
        if route.path in _NOT_OPERATIONS:
            continue
        if route.path.endswith("{path:path}"):
            prefix = route.path[: -len("{path:path}")]
            assert any(p.startswith(prefix) for p in paths), f"no operation under {prefix} in /openapi.json"
            continue
        assert route.path in paths, f"{route.path} is not in /openapi.json"
        documented = {m.upper() for m in paths[route.path]}
        assert {m for m in route.methods or () if m != "HEAD"} == documented, route.path
        # each path parameter of the route is a parameter of each of its operations
        for op in paths[route.path].values():
            names = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert names == {m[1:-1] for m in _PARAM.findall(route.path)}, route.path
        checked += 1
    assert checked >= 3  # the chat routes
    # and every schema an operation refers to is in the components
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', str(doc).replace("'", '"')))
    assert refs <= set(doc["components"]["schemas"]), refs - set(doc["components"]["schemas"])


def test_the_chat_operations_describe_what_the_server_answers(url: str, namespace: str, serves: Serves) -> None:
    """The documented bodies are what the chat routes send: a created conversation, the list, one
    conversation, an accepted question, a refusal (validated against the document's schemas)."""
    import jsonschema  # type: ignore[import-untyped]

    doc = document()
    schemas = doc["components"]["schemas"]

    def check(body: object, name: str) -> None:
        jsonschema.validate(body, {"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}})

    s = serves.chat(url, {"BOTWIRE_FAKE_PACE": "0", "BOTWIRE_FAKE_TOKENS": "3"})
    with httpx.Client(base_url=s.base, timeout=20) as client:
        r = client.post(f"/v1/chat/{namespace}", json={"user": "ada"})
        assert r.status_code == 201
        check(r.json(), "Created")
        session = r.json()["session"]
        r = client.get(f"/v1/chat/{namespace}", params={"user": "ada"})
        check(r.json(), "ConversationList")
        check(client.get(f"/v1/chat/{namespace}/{session}").json(), "Conversation")
        r = client.post(f"/v1/chat/{namespace}/{session}/messages", json={"content": "hi"})
        assert r.status_code == 202
        check(r.json(), "Accepted")
        r = client.post(f"/v1/chat/{namespace}/{session}/messages", json={"content": ""})
        assert r.status_code == 400
        check(r.json(), "ChatError")
        # a body the document refuses is refused by the server, nothing stored
        r = client.post(f"/v1/chat/{namespace}", json={"user": "x" * 41})
        assert r.status_code == 400
        assert client.get(f"/v1/chat/{namespace}", params={"user": "x" * 40}).json() == {"conversations": []}


@pytest.fixture
def dying(url: str, serves: Serves) -> Serve:
    """A serve process that SIGKILLs itself right after storing a question (the test hook)."""
    return serves.chat(url, {"BOTWIRE_TEST_HOOK_KILL_AFTER_QUESTION": "1", "BOTWIRE_FAKE_PACE": "0"})


@pytest.mark.slow
def test_a_retry_after_serve_died_between_the_question_and_the_key_record_stores_the_question_once(
    dying: Serve, url: str, namespace: str, serves: Serves
) -> None:
    """The process stores the question and is killed before it records the Idempotency-Key; the
    client gets no answer and retries with the same key on a restarted serve: the same question
    is not stored again, the retry gets the 202 of the stored one. Also when the key's record is
    gone altogether (before, the record of an unfinished request expired after 30 s: a retry
    then stored the question a second time): the question's Nats-Msg-Id drops the repeat."""
    with httpx.Client(timeout=20) as client:
        session = client.post(f"{dying.base}/v1/chat/{namespace}", json={"user": "ada"}).json()["session"]
        post = f"/v1/chat/{namespace}/{session}/messages"
        with pytest.raises(httpx.TransportError):
            client.post(dying.base + post, json={"content": "once"}, headers={"Idempotency-Key": "k-1"})
        assert dying.proc.wait(20) == -signal.SIGKILL
        chat = ChatHistory(session, namespace=namespace, url=url)
        try:
            [stored] = chat.entries()
            assert stored.message["content"] == "once"
            again = serves.chat(url, {"BOTWIRE_FAKE_PACE": "0"})
            # the key's record names the stored question's answer: found at once
            r = client.post(again.base + post, json={"content": "once"}, headers={"Idempotency-Key": "k-1"})
            assert r.status_code == 202, r.text
            assert r.json()["seq"] == stored.seq and r.json()["stream"] == stored.message["meta"]["stream"]
            # the key's record lost (as its expiry lost it before): the append itself is idempotent
            held = "idem:" + hashlib.sha256(f"{namespace}\0{session}\0k-1".encode()).hexdigest()[:40]
            with Memory(REGISTRY_NAMESPACE, url=url) as registry:
                registry.delete(held)
            r2 = client.post(again.base + post, json={"idempotency_key": "k-1", "content": "once"})
            assert r2.status_code == 202 and r2.json() == r.json(), r2.text
            # the same key for another message is still refused
            assert client.post(again.base + post, json={"content": "other"}, headers={"Idempotency-Key": "k-1"}).status_code == 422
            questions = [e for e in chat.entries() if e.message["role"] == "user"]
            assert [e.seq for e in questions] == [stored.seq]
        finally:
            chat.close()
