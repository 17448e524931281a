"""QA of the chat demo's layer (issue 8): who stores an answer when its producer stalls, bad
names and bodies over HTTP. Real nats-server, real ``botwire serve`` processes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from botwire_stream import AsyncChatHistory, ChatHistory
from botwire_stream.server.chatapi import REGISTRY_NAMESPACE, ChatService, Producer
from botwire_stream.server.model import FakeModel
from botwire_stream.tokens import open_token_streams
from tests.http_serve import Serve, Serves
from tests.servers import NatsServer
from tests.test_examples import example  # noqa: F401, F811  (the fixture)
from tests.waits import sigstop


def test_a_producer_stalled_between_closing_its_stream_and_storing_its_answer_stores_no_second_copy(
    url: str, namespace: str
) -> None:
    """The producer closed its stream, then stalled past its lease before appending the answer to
    the conversation: another process recovers it (the stream is closed, so it stores the text as
    complete). Once resumed, the producer must not store it again (it did: two answers)."""

    async def scenario() -> list[dict[str, object]]:
        store, client = await open_token_streams(url=url)
        a = ChatService({"url": url}, FakeModel(pace=0, tokens=3))
        b = ChatService({"url": url}, FakeModel(pace=0, tokens=3))
        a.store = b.store = store
        session, answer = "s-" + uuid.uuid4().hex[:8], uuid.uuid4().hex[:16]
        path = f"answers/{namespace}/{answer}"
        chat = AsyncChatHistory(session, namespace=namespace, url=url)
        try:
            await store.create(path, content_type="text/plain", ttl=3600)
            await a.memory(REGISTRY_NAMESPACE).set(f"answer:{answer}", {"ns": namespace, "session": session, "stream": path, "owner": a.owner})
            await chat.append({"role": "user", "content": "q", "meta": {"answer": answer, "stream": path}})
            producer = Producer(store, path, answer)
            producer.add("the whole answer")
            await producer.finish()  # the stream is closed; here the producer stalls past its lease
            assert await b.recover(answer) is True
            # resumed: the producer goes on to store its answer
            stored = await a._conclude(namespace, session, answer, "the whole answer", {"answer": answer, "stream": path})
            assert stored is False
            return await chat.messages()
        finally:
            await chat.close()
            await a.close()
            await b.close()
            await client.close()

    messages = asyncio.run(scenario())
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == "the whole answer"
    assert not (messages[1].get("meta") or {}).get("incomplete")  # type: ignore[union-attr]


@pytest.fixture
def serve(url: str, serves: Serves) -> Serve:
    return serves.chat(url, {"BOTWIRE_FAKE_PACE": "0", "BOTWIRE_FAKE_TOKENS": "5"})


BAD_NAMES = ["a.b", "a*", "a>", "..", "%2E%2E", "a%2Fb", "x" * 300, "%00", "a%20b", "%C3%A9"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_namespace_or_session_names_are_a_4xx_and_the_server_keeps_serving(serve: Serve, namespace: str, name: str) -> None:
    with httpx.Client(base_url=serve.base, timeout=10) as client:
        r = client.post(f"/v1/chat/{name}", json={"user": "ada"})
        assert 400 <= r.status_code < 500 or r.status_code == 201, (r.status_code, r.text)
        for path in (f"/v1/chat/{namespace}/{name}", f"/v1/chat/{name}/s"):
            r = client.get(path)
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        r = client.post(f"/v1/chat/{namespace}/{name}/messages", json={"content": "hi"})
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        r = client.post(f"/v1/chat/{name}/s/messages", json={"content": "hi"})
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert client.get("/").status_code == 200


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"", "application/json"),
        (b"{", "application/json"),
        (b"[]", "application/json"),
        (b'{"content": 5}', "application/json"),
        (b'{"content": "   "}', "application/json"),
        (b'{"content": "hi"}', "text/plain"),
        (b"\xff\xfe", "application/json"),
        (b'{"content": "\\ud800"}', "application/json"),
        (b'{"content": "' + b"a" * 40_000 + b'"}', "application/json"),
        (b"x" * 300_000, "application/json"),
    ],
)
def test_bad_message_bodies_write_nothing(serve: Serve, url: str, namespace: str, body: bytes, ctype: str) -> None:
    with httpx.Client(base_url=serve.base, timeout=10) as client:
        session = client.post(f"/v1/chat/{namespace}", json={"user": "ada"}).json()["session"]
        r = client.post(f"/v1/chat/{namespace}/{session}/messages", content=body, headers={"content-type": ctype})
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert "error" in r.json()
        assert client.get("/").status_code == 200
    chat = ChatHistory(session, namespace=namespace, url=url)
    try:
        assert chat.messages() == []
    finally:
        chat.close()


def test_a_process_stopped_before_storing_the_question_leaves_no_answer_without_its_question(url: str, namespace: str) -> None:
    """``POST .../messages`` registers the answer, then appends the question: a process killed in
    between (the client got no 202) must not leave an empty "incomplete" answer to a question the
    conversation never got (it did: the recovery appended it)."""

    async def scenario() -> list[dict[str, object]]:
        store, client = await open_token_streams(url=url)
        b = ChatService({"url": url}, FakeModel(pace=0, tokens=3))
        b.store = store
        session, answer = "s-" + uuid.uuid4().hex[:8], uuid.uuid4().hex[:16]
        path = f"answers/{namespace}/{answer}"
        chat = AsyncChatHistory(session, namespace=namespace, url=url)
        try:
            await chat.append({"role": "user", "content": "an earlier question"})
            await chat.append({"role": "assistant", "content": "an earlier answer"})
            await store.create(path, content_type="text/plain", ttl=3600)
            registry = b.memory(REGISTRY_NAMESPACE)
            await registry.set(f"answer:{answer}", {"ns": namespace, "session": session, "stream": path, "owner": "gone"})
            # the process dies here, before the question's append; its lease expires
            assert await b.recover(answer) is True
            assert await registry.get(f"answer:{answer}") is None  # not recovered again and again
            info = await store.read(path, "-1")
            assert info.closed  # a late producer of it is fenced
            return await chat.messages()
        finally:
            await chat.close()
            await b.close()
            await client.close()

    messages = asyncio.run(scenario())
    assert [m["content"] for m in messages] == ["an earlier question", "an earlier answer"]


XSS = "<img src=x onerror=window.__xss=1> <script>window.__xss=2</script> &lt;b&gt; <b>bold</b> \u202e\u0000end"


@pytest.mark.slow
def test_markup_in_a_message_and_in_the_models_answer_renders_as_text(serve: Serve, namespace: str) -> None:
    """The fake model echoes the message: both bubbles and the conversation's title get markup,
    which must show as typed, run nothing and make no element."""
    browser_test = pytest.importorskip("tests.test_browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser_test.CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = b.new_page()
            page.add_init_script("window.alert = () => { window.__xss = 3 }")
            page = browser_test.open_page(page, serve.base, namespace)
            browser_test.send(page, XSS)
            browser_test.wait_done(page)
            want = "".join(FakeModel(pace=0, tokens=5).answer([{"role": "user", "content": XSS}]))
            assert page.locator("#log li.user").last.text_content() == XSS.replace("\u0000", "\ufffd") or page.locator(
                "#log li.user"
            ).last.text_content() == XSS
            assert browser_test.last_answer(page).text_content() in (want, want.replace("\u0000", "\ufffd"))
            page.reload()
            browser_test.wait_done(page)
            page.wait_for_selector("#conversations a")
            assert page.evaluate("() => window.__xss") is None
            assert page.locator("#log img, #log script, #log b, #conversations img, #conversations b, #title b").count() == 0
        finally:
            b.close()


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["before-first-token", "mid-answer"])
def test_two_processes_racing_for_an_expired_lease_store_the_answer_once(url: str, namespace: str, phase: str, serves: Serves) -> None:
    """SIGKILL the producer; two other serve processes both watch the leases: the stream ends
    (closed) within the bound and the conversation gets exactly one incomplete answer."""
    import signal
    import time

    from tests.chat_serve import read_answer

    env = {"BOTWIRE_FAKE_PACE": "0.05", "BOTWIRE_FAKE_TOKENS": "200"}
    procs = [serves.chat(url, env) for _ in range(3)]
    producer, others = procs[0], procs[1:]
    try:
        with httpx.Client(base_url=others[0].base, timeout=10) as client:
            session = client.post(f"/v1/chat/{namespace}", json={"user": "ada"}).json()["session"]
            answer = httpx.post(f"{producer.base}/v1/chat/{namespace}/{session}/messages", json={"content": "race"}).json()
            if phase == "mid-answer":
                time.sleep(1.0)
            producer.kill(signal.SIGKILL)
            killed = time.monotonic()
            text = read_answer(client, answer["answer"], bound=20)
            assert time.monotonic() - killed < 20
        deadline = time.monotonic() + 10
        chat = ChatHistory(session, namespace=namespace, url=url)
        try:
            while len(chat.messages()) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2.5)  # more lease checks of both survivors: still one answer
            messages = chat.messages()
        finally:
            chat.close()
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[1]["content"] == text and messages[1]["meta"]["incomplete"] is True
        want = "".join(FakeModel(pace=0, tokens=200).answer([{"role": "user", "content": "race"}]))
        assert want.startswith(text) and len(text) < len(want)
    finally:
        producer.kill(signal.SIGKILL)
        for s in others:
            s.stop()


@pytest.mark.slow
@pytest.mark.parametrize("stall", [2.0, 7.0, -1.0])
def test_the_nats_server_stopped_mid_answer(own_server: NatsServer, stall: float, serves: Serves) -> None:
    """SIGSTOP the nats-server mid-answer for less than a lease (2 s) and for more (7 s), or
    SIGKILL and restart it on its store (-1): the
    answer's stream still ends (closed) within a bound, and the conversation holds exactly one
    answer whose text is the stream's."""
    import os
    import signal
    import time

    from tests.chat_serve import read_answer

    url = own_server.url
    s = serves.chat(url, {"BOTWIRE_FAKE_PACE": "0.05", "BOTWIRE_FAKE_TOKENS": "100"})
    with httpx.Client(base_url=s.base, timeout=20) as client:
        session = client.post("/v1/chat/ns", json={"user": "ada"}).json()["session"]
        answer = client.post(f"/v1/chat/ns/{session}/messages", json={"content": "stall"}).json()
        time.sleep(1.0)
        if stall < 0:
            own_server.kill()
            time.sleep(1.0)
            own_server.start()
        else:
            sigstop(own_server.pid)
            try:
                time.sleep(stall)
            finally:
                os.kill(own_server.pid, signal.SIGCONT)
        resumed = time.monotonic()
        text = read_answer(client, answer["answer"], bound=40)
        assert time.monotonic() - resumed < 40
    chat = ChatHistory(session, namespace="ns", url=url)
    try:
        deadline = time.monotonic() + 15
        while len(chat.messages()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.5)
        messages = chat.messages()
    finally:
        chat.close()
    assert [m["role"] for m in messages] == ["user", "assistant"], (messages, s.log.read_text()[-3000:])
    assert messages[1]["content"] == text


def test_messages_posted_at_once_to_many_conversations_are_each_answered_once(serve: Serve, url: str, namespace: str) -> None:
    """Two messages at once to each of 12 conversations (24 posts at once): every question is
    stored, and exactly one complete answer follows each, linked by its answer id, answering it
    (the model was given the conversation up to the other question, and answered that one)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    with httpx.Client(base_url=serve.base, timeout=20) as client:
        sessions = [client.post(f"/v1/chat/{namespace}", json={"user": "ada"}).json()["session"] for _ in range(12)]
    targets = [s for s in sessions for _ in range(2)]
    barrier = threading.Barrier(len(targets))

    def post(i: int) -> httpx.Response:
        with httpx.Client(base_url=serve.base, timeout=20) as own:
            own.get("/")  # connected before the race
            barrier.wait(20)
            return own.post(f"/v1/chat/{namespace}/{targets[i]}/messages", json={"content": f"q{i}"})

    with ThreadPoolExecutor(len(targets)) as pool:
        replies = list(pool.map(post, range(len(targets))))
    assert [r.status_code for r in replies] == [202] * len(targets)
    for session in sessions:
        want = 4
        chat = ChatHistory(session, namespace=namespace, url=url)
        try:
            deadline = time.monotonic() + 20
            while len(chat.messages()) < want and time.monotonic() < deadline:
                time.sleep(0.1)
            messages = chat.messages()
        finally:
            chat.close()
        assert len(messages) == want, messages
        questions = {m["meta"]["answer"]: m["content"] for m in messages if m["role"] == "user"}
        answers = [m for m in messages if m["role"] == "assistant"]
        assert sorted(m["meta"]["answer"] for m in answers) == sorted(questions)
        for m in answers:
            assert not m["meta"].get("incomplete")
            assert str(m["content"]).startswith(f"You said: {questions[m['meta']['answer']]}.")
        # an answer comes after its own question
        order = [(m["role"], m["meta"]["answer"]) for m in messages]
        for a in questions:
            assert order.index(("user", a)) < order.index(("assistant", a))


@pytest.mark.parametrize("example", ["fastapi_sse"], indirect=True)
def test_sse_example_refuses_bad_answers_and_offsets_with_a_4xx(example: str) -> None:  # noqa: F811
    """Resuming with a Last-Event-ID that is malformed, or beyond the answer's end, and an answer
    id no stream can have: a 4xx before the stream starts (or, beyond the end, the rest: nothing
    then done), never a 500 or a broken stream; the example keeps serving."""
    import json as _json

    from tests.sse import sse_events

    session = "s-" + uuid.uuid4().hex[:8]
    with httpx.Client(base_url=example, timeout=15) as client:
        with client.stream("POST", f"/chat/{session}", json={"content": "hi"}) as r:
            events = list(sse_events(r.iter_lines()))
        answer = events[0]["data"]
        end = [e["id"] for e in events if "id" in e][-1]
        for bad in ("bogus", "-2", "1" * 40, "\u00e9"):
            r = client.get(f"/answers/{answer}", headers={"Last-Event-ID": bad.encode()})
            assert r.status_code == 400, (bad, r.status_code, r.text)
        for path in ("/answers/%01x", "/answers/" + "x" * 2000):
            r = client.get(path)
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        with client.stream("GET", f"/answers/{answer}", headers={"Last-Event-ID": end}) as r:
            assert r.status_code == 200
            rest = list(sse_events(r.iter_lines()))
        assert [e.get("event") for e in rest] == ["answer", "done"], rest
        beyond = end[:-1] + chr(ord(end[-1]) + 1) if end[-1] in "012345678" else end
        r = client.get(f"/answers/{answer}", headers={"Last-Event-ID": beyond})
        assert r.status_code in (200, 400), (r.status_code, r.text)
        if r.status_code == 200:
            assert [e.get("event") for e in sse_events(iter(r.text.splitlines()))] in (["answer", "done"],), r.text
        assert _json.loads(client.get(f"/chat/{session}").text)[0]["content"] == "hi"


def test_a_conversation_reader_with_a_forged_old_or_future_offset(serve: Serve, namespace: str) -> None:
    """Reading a conversation from a malformed offset is a 400; from past its end it is an empty
    answer (no message invented, none repeated); the server keeps serving."""
    from botwire_stream.tokens import format_offset

    with httpx.Client(base_url=serve.base, timeout=15) as client:
        session = client.post(f"/v1/chat/{namespace}", json={"user": "ada"}).json()["session"]
        client.post(f"/v1/chat/{namespace}/{session}/messages", json={"content": "hi"})
        tail = f"/v1/stream/chat/{namespace}/{session}"
        r = client.get(tail, params={"offset": "-1"})
        assert r.status_code == 200 and r.json()[0]["content"] == "hi"
        end = r.headers["stream-next-offset"]
        for bad in ("bogus", "-2", "1" * 60, "%00", "..", format_offset(0) + "x"):
            r = client.get(tail, params={"offset": bad})
            assert r.status_code == 400, (bad, r.status_code, r.text)
        for far in (format_offset(10**9), format_offset(2**62)):
            r = client.get(tail, params={"offset": far})
            assert r.status_code in (200, 204, 400), (far, r.status_code, r.text)
            if r.status_code == 200:
                assert r.json() == [], r.text
        r = client.get(tail, params={"offset": end})
        assert r.status_code in (200, 204)
        if r.status_code == 200:
            assert all(m["content"] != "hi" for m in r.json())
        assert client.get("/").status_code == 200


@pytest.mark.parametrize("example", ["fastapi_sse"], indirect=True)
def test_sse_example_answers_each_of_two_questions_posted_at_once(example: str) -> None:  # noqa: F811
    """Two questions posted at once to each of 8 conversations: each streamed answer answers its
    own question (the model was given the conversation up to the other one)."""
    import json as _json
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tests.sse import sse_events

    sessions = ["s-" + uuid.uuid4().hex[:8] for _ in range(8)]
    targets = [s for s in sessions for _ in range(2)]
    barrier = threading.Barrier(len(targets))

    def ask(i: int) -> tuple[str, str]:
        with httpx.Client(base_url=example, timeout=30) as client:
            client.get("/docs")
            barrier.wait(20)
            with client.stream("POST", f"/chat/{targets[i]}", json={"content": f"q{i}"}) as r:
                text = "".join(_json.loads(e["data"]) for e in sse_events(r.iter_lines()) if "id" in e)
            return f"q{i}", text

    with ThreadPoolExecutor(len(targets)) as pool:
        for question, text in pool.map(ask, range(len(targets))):
            assert text.startswith(f"You said: {question}."), (question, text[:40])



@pytest.mark.parametrize("died", ["recoverer", "failed-model producer"])
def test_an_answer_whose_stream_was_closed_by_a_process_that_then_died_is_stored_incomplete(url: str, namespace: str, died: str) -> None:
    """A process closed an unfinished answer's stream and stopped before storing its text: the
    process that takes over (once that claim is stale) stores the text marked incomplete.
    ``recoverer``: the first recovering process closed it. ``failed-model producer``: the model
    failed midway, its producer closed the stream and stopped (it was stored as complete)."""

    class Failing:
        async def stream(self, messages: object) -> AsyncIterator[str]:
            yield "half an ans"
            raise ConnectionError("the model's connection broke")

    async def scenario() -> list[dict[str, object]]:
        store, client = await open_token_streams(url=url)
        a = ChatService({"url": url}, Failing())
        b = ChatService({"url": url}, FakeModel(pace=0, tokens=3))
        a.store = b.store = store
        b.claim_stale = 0.2  # instead of 30 s
        session, answer = "s-" + uuid.uuid4().hex[:8], uuid.uuid4().hex[:16]
        path = f"answers/{namespace}/{answer}"
        chat = AsyncChatHistory(session, namespace=namespace, url=url)
        registry = a.memory(REGISTRY_NAMESPACE)
        try:
            await store.create(path, content_type="text/plain", ttl=3600)
            await registry.set(f"answer:{answer}", {"ns": namespace, "session": session, "stream": path, "owner": a.owner})
            await chat.append({"role": "user", "content": "q", "meta": {"answer": answer, "stream": path}})
            if died == "recoverer":
                # the producer appended some text, then its process died; ``a`` recovers it the
                # way ``recover`` does: claims it, closes the stream, and stops there
                await store.append(path, b"half an ans", content_type="text/plain", producer=(answer, 0, 0))
                await registry.update(f"answer:{answer}", a._claim(time.time()))
                await store.append(path, b"", close=True, producer=(answer, 1, 0))
            else:
                stopped = asyncio.Event()

                async def stop_here(*args: object) -> bool:  # the process stops before storing
                    stopped.set()
                    await asyncio.Event().wait()
                    return False

                a._conclude = stop_here  # type: ignore[method-assign]
                task = asyncio.ensure_future(a._produce(namespace, session, answer, path, [{"role": "user", "content": "q"}]))
                await asyncio.wait_for(stopped.wait(), 10)
                task.cancel()
                await registry.update(f"answer:{answer}", a._claim(time.time()))  # what _conclude takes first
            await asyncio.sleep(0.3)  # that claim is stale now (for b)
            assert await b.recover(answer) is True
            assert await registry.get(f"answer:{answer}") is None
            return await chat.messages()
        finally:
            await chat.close()
            await a.close()
            await b.close()
            await client.close()

    messages = asyncio.run(scenario())
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == "half an ans"
    meta = messages[1]["meta"]
    assert isinstance(meta, dict) and meta.get("incomplete") is True, meta
    assert "the model failed" in meta["error"] if died != "recoverer" else "stopped" in meta["error"]
