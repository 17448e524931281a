"""The chat endpoint of ``botwire serve`` over HTTP: a message goes into the conversation, its
answer streams through a token stream (coalesced), ends in the conversation with the stream's id,
and bad input is refused with a 4xx and a clear body, nothing written, the server still serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from botwire_stream import AsyncTokenStream, ChatHistory
from botwire_stream.server.model import FakeModel
from botwire_stream.tokens import format_offset
from tests.chat_models import OPENAI_KEY, OPENAI_PIECES
from tests.chat_serve import read_answer
from tests.http_serve import Serve, Serves, free_port
from tests.procs import ROOT
from tests.waits import sigstop


@pytest.fixture
def serve(url: str, serves: Serves) -> Serve:
    return serves.chat(url, {"BOTWIRE_FAKE_PACE": "0.01", "BOTWIRE_FAKE_TOKENS": "30"})


def conversation(client: httpx.Client, namespace: str, user: str = "ada") -> str:
    r = client.post(f"/v1/chat/{namespace}", json={"user": user})
    assert r.status_code == 201, r.text
    session: str = r.json()["session"]
    return session


def wait_messages(url: str, namespace: str, session: str, n: int, bound: float = 20.0) -> list[dict[str, object]]:
    chat = ChatHistory(session, namespace=namespace, url=url)
    try:
        deadline = time.monotonic() + bound
        while True:
            messages = chat.messages()
            if len(messages) >= n or time.monotonic() > deadline:
                return messages
            time.sleep(0.05)
    finally:
        chat.close()


def test_a_message_streams_its_answer_and_ends_in_the_conversation(serve: Serve, url: str, namespace: str) -> None:
    with httpx.Client(base_url=serve.base, timeout=10) as client:
        session = conversation(client, namespace)
        r = client.post(f"/v1/chat/{namespace}/{session}/messages", json={"content": "hi there"})
        assert r.status_code == 202, r.text
        answer = r.json()
        text = read_answer(client, answer["answer"])
    want = "".join(FakeModel(pace=0, tokens=30).answer([{"role": "user", "content": "hi there"}]))
    assert text == want
    messages = wait_messages(url, namespace, session, 2)
    assert messages == [
        {"role": "user", "content": "hi there", "meta": {"answer": messages[0]["meta"]["answer"], "stream": answer["stream"]}},  # type: ignore[index]
        {"role": "assistant", "content": want, "meta": {"answer": messages[0]["meta"]["answer"], "stream": answer["stream"]}},  # type: ignore[index]
    ]
    assert answer["seq"] == 1


def test_paced_tokens_go_out_as_they_come_and_fast_ones_coalesced(url: str, namespace: str, serves: Serves) -> None:
    async def chunks(path: str) -> int:
        async with AsyncTokenStream(path, url=url) as stream:
            return (await stream.read()).chunks

    import asyncio

    for pace, tokens in (("0.03", 20), ("0", 2000)):
        s = serves.chat(url, {"BOTWIRE_FAKE_PACE": pace, "BOTWIRE_FAKE_TOKENS": str(tokens)})
        with httpx.Client(base_url=s.base, timeout=10) as client:
            session = conversation(client, namespace)
            answer = client.post(f"/v1/chat/{namespace}/{session}/messages", json={"content": "x"}).json()
            text = read_answer(client, answer["answer"])
        assert text == "".join(FakeModel(pace=0, tokens=tokens).answer([{"role": "user", "content": "x"}]))
        n = asyncio.run(chunks(answer["stream"]))
        if pace == "0":
            assert n <= 10, f"2,000 tokens at full speed took {n} appends"  # coalesced
        else:
            assert n >= 10, f"tokens 30 ms apart went out in {n} appends"  # not held back


@pytest.mark.parametrize(
    ("model", "want", "incomplete"),
    [
        ("tests.chat_models:langchain_model", "Hello from a LangChain chat model", False),
        ("tests.chat_models:failing", "partial answer then", True),
    ],
)
def test_langchain_models_and_a_failing_model(url: str, namespace: str, model: str, want: str, incomplete: bool, serves: Serves) -> None:
    s = serves.chat(url, {"BOTWIRE_CHAT_MODEL": model})
    with httpx.Client(base_url=s.base, timeout=10) as client:
        session = conversation(client, namespace)
        answer = client.post(f"/v1/chat/{namespace}/{session}/messages", json={"content": "hello"}).json()
        assert read_answer(client, answer["answer"]) == want
    last = wait_messages(url, namespace, session, 2)[-1]
    assert last["content"] == want
    assert bool(last["meta"].get("incomplete")) is incomplete  # type: ignore[union-attr]


def test_an_openai_compatible_endpoint_streamed_with_httpx(url: str, namespace: str, serves: Serves) -> None:
    port = free_port()
    stub = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.chat_models:openai_app", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, stdin=subprocess.DEVNULL,
    )
    env = {"BOTWIRE_CHAT_MODEL": "openai", "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1", "OPENAI_API_KEY": OPENAI_KEY}
    try:
        for _ in range(200):  # bounded: the stub answers within 10 s
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        s = serves.chat(url, env)
        with httpx.Client(base_url=s.base, timeout=10) as client:
            session = conversation(client, namespace)
            answer = client.post(f"/v1/chat/{namespace}/{session}/messages", json={"content": "hello"}).json()
            assert read_answer(client, answer["answer"]) == "".join(OPENAI_PIECES)
        assert wait_messages(url, namespace, session, 2)[-1]["content"] == "".join(OPENAI_PIECES)
    finally:
        stub.kill()
        stub.wait(10)


def test_bad_input_is_refused_with_a_clear_4xx_and_nothing_written(serve: Serve, url: str, namespace: str) -> None:
    with httpx.Client(base_url=serve.base, timeout=10) as client:
        session = conversation(client, namespace)
        post = f"/v1/chat/{namespace}/{session}/messages"
        cases = [
            (f"/v1/chat/{namespace}/nobody-123/messages", {"json": {"content": "hi"}}, 404, "no conversation"),
            (post, {"json": {"content": ""}}, 400, "non-empty"),
            (post, {"json": {"content": "   \n"}}, 400, "non-empty"),
            (post, {"json": {"content": 42}}, 400, "non-empty string"),
            (post, {"json": {"content": "x" * 32_001}}, 413, "at most 32000 characters"),
            (post, {"content": b"x" * 400_000, "headers": {"content-type": "application/json"}}, 413, "larger than"),
            (post, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
            (post, {"json": ["hi"]}, 400, "JSON object"),
            (f"/v1/chat/{namespace}", {"json": {"user": "a b"}}, 400, "user must be"),
            ("/v1/chat/bad.namespace/x/messages", {"json": {"content": "hi"}}, 400, "namespace"),
        ]
        for path, kwargs, status, words in cases:
            r = client.post(path, **kwargs)  # type: ignore[arg-type]
            assert r.status_code == status, (path, r.status_code, r.text)
            assert words in r.json()["error"], r.text
        assert client.get(f"/v1/chat/{namespace}/nobody-123").status_code == 404
        assert wait_messages(url, namespace, session, 1, bound=0.5) == []  # nothing written
        assert wait_messages(url, namespace, "nobody-123", 1, bound=0.1) == []
        # malformed offsets of the answer's and the conversation's streams
        answer = client.post(post, json={"content": "still here?"}).json()
        for bad in ("abc", "1_", "-2", "9" * 40):
            r = client.get(answer["answer"], params={"offset": bad})
            assert r.status_code == 400 and "offset" in r.text, (bad, r.status_code, r.text)
            r = client.get(f"/v1/stream/chat/{namespace}/{session}", params={"offset": bad})
            assert r.status_code == 400 and "offset" in r.text, (bad, r.status_code, r.text)
        # and the server keeps serving: the good message was answered
        assert read_answer(client, answer["answer"]).startswith("You said: still here?.")
        assert [m["role"] for m in wait_messages(url, namespace, session, 2)] == ["user", "assistant"]


def test_conversations_are_listed_per_user_newest_first(serve: Serve, namespace: str) -> None:
    with httpx.Client(base_url=serve.base, timeout=10) as client:
        first = conversation(client, namespace, "ada")
        second = conversation(client, namespace, "ada")
        conversation(client, namespace, "bob")
        client.post(f"/v1/chat/{namespace}/{first}/messages", json={"content": "the first one"})
        listed = client.get(f"/v1/chat/{namespace}", params={"user": "ada"}).json()["conversations"]
        assert [c["session"] for c in listed] == [first, second]
        assert listed[0]["title"] == "the first one" and listed[1]["title"] == "New conversation"
        assert client.get(f"/v1/chat/{namespace}", params={"user": "a*"}).status_code == 400


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_producer_is_closed_as_incomplete_by_another_serve_process(url: str, namespace: str, sig: int, serves: Serves) -> None:
    env = {"BOTWIRE_FAKE_PACE": "0.05", "BOTWIRE_FAKE_TOKENS": "200"}  # about 10 s of answer
    producer = serves.chat(url, env)
    other = serves.chat(url, env)
    try:
        with httpx.Client(base_url=other.base, timeout=10) as client:
            session = conversation(client, namespace)
            answer = httpx.post(f"{producer.base}/v1/chat/{namespace}/{session}/messages", json={"content": "go"}).json()
            offset, text = "-1", ""
            while len(text) < 100:  # read some of it from the other process
                r = client.get(answer["answer"], params={"offset": offset, "live": "long-poll"})
                text += r.text if r.status_code == 200 else ""
                offset = r.headers["stream-next-offset"]
            producer.kill(sig)  # SIGTERM: a clean stop leaves its answers in flight to the others too
            killed = time.monotonic()
            rest = read_answer(client, answer["answer"], bound=20, offset=offset)  # ends: closed
            print(f"closed {time.monotonic() - killed:.2f} s after the kill")
            assert time.monotonic() - killed < 20
        partial = text + rest
        want = "".join(FakeModel(pace=0, tokens=200).answer([{"role": "user", "content": "go"}]))
        assert want.startswith(partial) and len(partial) < len(want)
        last = wait_messages(url, namespace, session, 2)
        assert len(last) == 2 and last[-1]["content"] == partial
        assert last[-1]["meta"]["incomplete"] is True  # type: ignore[index]
        time.sleep(1.5)  # a few more lease checks of the surviving process: no second copy
        assert len(wait_messages(url, namespace, session, 3, bound=0.1)) == 2
    finally:
        producer.kill(signal.SIGKILL)
        other.stop()


def racing_the_first_append(url: str, namespace: str, session: str, delay: float, request: Callable[[], httpx.Response]) -> httpx.Response:
    """``request()``'s response, the conversation's first message ("first") appended ``delay`` s
    after the request started (by a client connected beforehand)."""
    chat = ChatHistory(session, namespace=namespace, url=url)
    try:
        chat.messages()  # connected before the race
        poster = threading.Timer(delay, chat.append, [{"role": "user", "content": "first"}])
        poster.start()
        r = request()
        poster.join(10)
        return r
    finally:
        chat.close()


def test_a_new_conversations_first_message_ends_a_long_poll_at_once(url: str, namespace: str, serves: Serves) -> None:
    """The page tails an empty conversation with a long-poll from offset 0 while its first message
    is stored: the long-poll must answer with it, whenever the append lands (it used to start its
    watch "from now", missing a message stored between its read and its watch: a 20 s wait)."""
    s = serves.chat(url, {"BOTWIRE_FAKE_PACE": "0"})
    with httpx.Client(base_url=s.base, timeout=30) as client:
        slow = 0
        for i in range(60):
            session = f"race-{i}"
            tail = f"/v1/stream/chat/{namespace}/{session}"
            t0 = time.monotonic()
            # appends landing from before the long-poll's read to after its watch started
            r = racing_the_first_append(
                url, namespace, session, 0.0005 * (i % 30),
                lambda: client.get(tail, params={"offset": format_offset(0), "live": "long-poll"}),
            )
            if r.status_code == 204:  # the long-poll timed out (2 s here) without the message
                slow += 1
            else:
                assert r.json()[0]["content"] == "first"
            assert time.monotonic() - t0 < 10
        assert slow == 0


def test_an_answer_larger_than_a_message_is_stored_whole(url: str, namespace: str, serves: Serves) -> None:
    """A model faster than the appends: 1.3 MB of answer piles up before the first append, more
    than the server's 1 MiB message limit; it goes out in several appends, nothing lost."""
    s = serves.chat(url, {"BOTWIRE_FAKE_PACE": "0", "BOTWIRE_FAKE_TOKENS": "200000"})
    with httpx.Client(base_url=s.base, timeout=30) as client:
        session = conversation(client, namespace)
        answer = client.post(f"/v1/chat/{namespace}/{session}/messages", json={"content": "é" * 10}).json()
        text = read_answer(client, answer["answer"])
    want = "".join(FakeModel(pace=0, tokens=200000).answer([{"role": "user", "content": "é" * 10}]))
    assert len(want.encode()) > 1 << 20
    assert text == want
    # the conversation gets what fits in one of its messages, marked; the stream has it all
    last = wait_messages(url, namespace, session, 2)[-1]
    assert last["meta"]["truncated"] is True and len(last["content"]) > 100_000  # type: ignore[index, arg-type]
    assert want.startswith(last["content"])  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_stalled_producer_is_fenced_and_its_answer_stored_once(url: str, namespace: str, serves: Serves) -> None:
    """SIGSTOP the producing process past its lease: another process closes the answer as
    incomplete; once resumed, the old producer appends nothing more and stores no second copy."""
    env = {"BOTWIRE_FAKE_PACE": "0.05", "BOTWIRE_FAKE_TOKENS": "200"}
    producer = serves.chat(url, env)
    other = serves.chat(url, env)
    try:
        with httpx.Client(base_url=other.base, timeout=10) as client:
            session = conversation(client, namespace)
            answer = httpx.post(f"{producer.base}/v1/chat/{namespace}/{session}/messages", json={"content": "stall"}).json()
            time.sleep(1.0)
            sigstop(producer.proc.pid)
            try:
                text = read_answer(client, answer["answer"], bound=20)  # closed by the other process
            finally:
                os.kill(producer.proc.pid, signal.SIGCONT)
            time.sleep(3.0)  # the resumed producer tries to go on (fenced) and stops
            assert read_answer(client, answer["answer"], bound=5) == text  # nothing appended after the close
        messages = wait_messages(url, namespace, session, 3, bound=1.0)
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[-1]["content"] == text and messages[-1]["meta"]["incomplete"] is True  # type: ignore[index]
        want = "".join(FakeModel(pace=0, tokens=200).answer([{"role": "user", "content": "stall"}]))
        assert want.startswith(text) and len(text) < len(want)
        assert producer.proc.poll() is None  # the stalled process itself carries on serving
        assert httpx.get(producer.base + "/").status_code == 200
    finally:
        producer.kill(signal.SIGKILL)
        other.stop()


@pytest.mark.slow
def test_long_polls_that_time_out_or_end_at_shutdown_leave_no_unretrieved_task_errors(url: str, namespace: str, serves: Serves) -> None:
    """The serve log of a chat whose conversation long-polls time out (2 s here) and are ended by
    a shutdown holds no "Task exception was never retrieved" (it filled with them)."""
    import asyncio

    s = serves.chat(url, {"BOTWIRE_FAKE_PACE": "0"})
    try:
        with httpx.Client(base_url=s.base, timeout=10) as client:
            session = conversation(client, namespace)
        tail = f"{s.base}/v1/stream/chat/{namespace}/{session}"

        async def polls() -> list[int]:
            async with httpx.AsyncClient(timeout=10) as client:
                get = lambda: client.get(tail, params={"offset": format_offset(0), "live": "long-poll"})  # noqa: E731
                timed_out = await asyncio.gather(*(get() for _ in range(6)))  # each ends empty after 2 s
                ended = [asyncio.ensure_future(get()) for _ in range(6)]
                await asyncio.sleep(0.5)  # open; then the server stops: they answer at once
                os.kill(s.proc.pid, signal.SIGTERM)
                return [r.status_code for r in timed_out + list(await asyncio.gather(*ended))]

        assert asyncio.run(polls()) == [204] * 12
    finally:
        s.stop()
    assert s.proc.returncode == 0
    log = s.log.read_text()
    assert "never retrieved" not in log, log[-3000:]


def test_json_sent_as_another_content_type_is_refused_with_415_and_nothing_written(serve: Serve, url: str, namespace: str) -> None:
    """Every JSON endpoint of the chat API takes ``application/json`` only: the same JSON as
    text/plain, a form or with no content type (what a cross-site page can send without a CORS
    preflight) is a 415 and writes nothing (it was taken: a message stored, a conversation made)."""
    with httpx.Client(base_url=serve.base, timeout=10) as client:
        session = conversation(client, namespace)
        for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": ctype} if ctype else {}
            for path, body in ((f"/v1/chat/{namespace}", b'{"user": "bob"}'), (f"/v1/chat/{namespace}/{session}/messages", b'{"content": "hi"}')):
                r = client.post(path, content=body, headers=headers)
                assert r.status_code == 415, (ctype, path, r.status_code, r.text)
                assert "application/json" in r.json()["error"]
        assert client.get(f"/v1/chat/{namespace}", params={"user": "bob"}).json() == {"conversations": []}
        assert wait_messages(url, namespace, session, 1, bound=0.5) == []
        # with its parameters, and a +json type, it is taken
        r = client.post(f"/v1/chat/{namespace}/{session}/messages", content=b'{"content": "hi"}', headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 202, r.text
        r = client.post(f"/v1/chat/{namespace}", content=b'{"user": "bob"}', headers={"content-type": "application/merge-patch+json"})
        assert r.status_code == 201, r.text


def test_a_repeated_post_with_the_same_idempotency_key_stores_one_question_and_one_answer(url: str, namespace: str, serves: Serves) -> None:
    """A client whose POST's response was lost sends it again with the same ``Idempotency-Key``:
    the same 202 (the same answer stream), one question, one answer; also when the two reach
    two serve processes at the same moment (it stored the question twice, answered twice)."""
    from concurrent.futures import ThreadPoolExecutor

    env = {"BOTWIRE_FAKE_PACE": "0.01", "BOTWIRE_FAKE_TOKENS": "30"}
    one, two = serves.chat(url, env), serves.chat(url, env)
    with httpx.Client(timeout=20) as client:
        session = client.post(f"{one.base}/v1/chat/{namespace}", json={"user": "ada"}).json()["session"]
        post = f"/v1/chat/{namespace}/{session}/messages"

        def ask(base: str, key: str, content: str = "once, please", field: bool = False) -> httpx.Response:
            if field:
                return client.post(base + post, json={"content": content, "idempotency_key": key})
            return client.post(base + post, json={"content": content}, headers={"Idempotency-Key": key})

        first = ask(one.base, "k-1")
        again = ask(two.base, "k-1")  # a retry, to the other process
        body_field = ask(one.base, "k-1", field=True)  # the key as a body field
        assert first.status_code == again.status_code == body_field.status_code == 202, (first.text, again.text)
        assert first.json() == again.json() == body_field.json()
        # the same key for another message is refused, writing nothing
        other = ask(two.base, "k-1", "something else")
        assert other.status_code == 422 and "Idempotency-Key" in other.json()["error"]
        # at the same moment, from two serve processes, a few times over
        for i in range(5):
            with ThreadPoolExecutor(2) as pool:
                r1, r2 = pool.map(lambda base: ask(base, f"k-race-{i}", f"race {i}"), [one.base, two.base])
            assert r1.status_code == r2.status_code == 202, (r1.text, r2.text)
            assert r1.json() == r2.json()
        assert read_answer(client, one.base + first.json()["answer"]).startswith("You said: once, please.")
    messages = wait_messages(url, namespace, session, 12)
    time.sleep(0.5)  # nothing more comes
    messages = wait_messages(url, namespace, session, 13, bound=0.1)
    questions = [m["content"] for m in messages if m["role"] == "user"]
    assert sorted(questions) == sorted(["once, please"] + [f"race {i}" for i in range(5)])
    assert len([m for m in messages if m["role"] == "assistant"]) == 6


def test_a_read_racing_the_first_append_never_hands_out_an_offset_past_an_unread_message(url: str, namespace: str, serves: Serves) -> None:
    """The page reads a new conversation (offset -1) as it posts the first question. A read that
    answered no message must not return an offset past the one being appended: following the
    offsets must get each message once (it skipped the question for good in 9 of 200 tries, so
    the page never read its answer's stream: the browser tests' intermittent)."""
    s = serves.chat(url, {"BOTWIRE_FAKE_PACE": "0"})
    with httpx.Client(base_url=s.base, timeout=30) as client:
        for i in range(150):
            session = f"race-{i}"
            tail = f"/v1/stream/chat/{namespace}/{session}"
            # appends landing from before the read's first step to after its last
            r = racing_the_first_append(url, namespace, session, 0.0003 * (i % 40), lambda: client.get(tail, params={"offset": "-1"}))
            assert r.status_code == 200, r.text
            seen = [m["content"] for m in r.json()]
            # the rest, from the offset handed out
            rest = client.get(tail, params={"offset": r.headers["stream-next-offset"]})
            seen += [m["content"] for m in rest.json()] if rest.status_code == 200 else []
            assert seen == ["first"], (i, r.headers["stream-next-offset"], seen)
