"""The FastAPI examples as users run them (uvicorn in its own process, against a real nats-server):
a client streams an answer, disconnects mid-answer, reconnects from its last offset and gets the
rest (nothing twice, nothing missing); a second process reads the whole conversation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from botwire_stream.server.model import FakeModel
from tests.http_serve import free_port
from tests.procs import ROOT
from tests.sse import sse_events

PACE = 0.03  # 82 pieces: about 2.5 s per answer


def expected(text: str) -> str:
    return "".join(FakeModel(pace=0).answer([{"role": "user", "content": text}]))


@pytest.fixture
def example(request: pytest.FixtureRequest, url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "uvicorn.log").open("wb")
    env = {**os.environ, "BOTWIRE_URL": url, "BOTWIRE_FAKE_PACE": str(PACE)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", f"{request.param}:app", "--app-dir", "examples", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):  # bounded: 20 s
            assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                httpx.get(base + "/docs", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield base
    finally:
        proc.kill()
        proc.wait(10)


def conversation_from_another_process(url: str, session: str) -> list[dict[str, object]]:
    """The conversation as a separate Python process reads it (waits up to 10 s for the answer)."""
    code = (
        "import json, sys, time\n"
        "from botwire_stream import ChatHistory\n"
        "chat = ChatHistory(sys.argv[1], namespace='examples', url=sys.argv[2])\n"
        "for _ in range(200):\n"
        "    messages = chat.messages()\n"
        "    if len(messages) >= 2: break\n"
        "    time.sleep(0.05)\n"
        "print(json.dumps(messages))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, session, url], cwd=ROOT, capture_output=True, timeout=60, check=True)
    result: list[dict[str, object]] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("example", ["fastapi_sse"], indirect=True)
def test_sse_example_resumes_after_a_disconnect(example: str, url: str) -> None:
    session = "s-" + uuid.uuid4().hex[:8]
    want = expected("tell me more")
    got, last_id, answer = "", "", ""
    with httpx.Client(base_url=example, timeout=10) as client:
        with client.stream("POST", f"/chat/{session}", json={"content": "tell me more"}) as r:
            assert r.status_code == 200
            for event in sse_events(r.iter_lines()):
                if event.get("event") == "answer":
                    answer = event["data"]
                elif "id" in event:
                    got += json.loads(event["data"])
                    last_id = event["id"]
                    if len(got) > len(want) // 3:
                        break  # the client goes away mid-answer
        assert answer and last_id and len(got) < len(want)
        with client.stream("GET", f"/answers/{answer}", headers={"Last-Event-ID": last_id}) as r:
            done = False
            for event in sse_events(r.iter_lines()):
                if "id" in event:
                    got += json.loads(event["data"])
                if event.get("event") == "done":
                    done = True
                    break
        assert done and got == want
        assert client.get(f"/answers/{answer}", params={"offset": "bogus"}).status_code == 400
        assert client.get("/answers/nope", params={"offset": "-1"}).status_code == 404
        assert client.post(f"/chat/{session}", json={"content": ""}).status_code == 422
    messages = conversation_from_another_process(url, session)
    assert [(m["role"], m["content"]) for m in messages] == [("user", "tell me more"), ("assistant", want)]


@pytest.mark.parametrize("example", ["fastapi_ws"], indirect=True)
def test_websocket_example_resumes_after_a_disconnect(example: str, url: str) -> None:
    session = "w-" + uuid.uuid4().hex[:8]
    ws_url = example.replace("http://", "ws://") + f"/ws/{session}"
    want = expected("over the socket")
    got, offset = "", ""
    with connect(ws_url, open_timeout=10) as ws:
        ws.send(json.dumps({"content": "over the socket"}))
        answer = json.loads(ws.recv(timeout=10))["answer"]
        while len(got) <= len(want) // 3:
            frame = json.loads(ws.recv(timeout=10))
            got += frame["token"]
            offset = frame["offset"]
    assert len(got) < len(want)  # disconnected mid-answer
    with connect(ws_url, open_timeout=10) as ws:
        ws.send(json.dumps({"resume": answer, "offset": offset}))
        assert json.loads(ws.recv(timeout=10)) == {"answer": answer}
        while True:
            frame = json.loads(ws.recv(timeout=10))
            if frame.get("done"):
                break
            got += frame["token"]
        assert got == want
        ws.send(json.dumps({"resume": answer, "offset": "bogus"}))
        assert "offset" in json.loads(ws.recv(timeout=10))["error"]
        ws.send(json.dumps({"resume": "nope", "offset": "-1"}))
        assert "no token stream" in json.loads(ws.recv(timeout=10))["error"]
        ws.send(json.dumps({"content": " "}))
        assert "error" in json.loads(ws.recv(timeout=10))
    messages = conversation_from_another_process(url, session)
    assert [(m["role"], m["content"]) for m in messages] == [("user", "over the socket"), ("assistant", want)]
