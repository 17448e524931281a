"""``botwire demo``: the chat page on the embedded server (a private BOTWIRE_HOME), its URL printed
once the page is served, nothing opened; a message is answered; SIGTERM stops it with exit 0."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.chat_serve import read_answer
from tests.procs import ROOT


def test_botwire_demo_prints_the_url_of_a_working_chat(botwire_home: Path) -> None:
    env = {**os.environ, "BOTWIRE_HOME": str(botwire_home), "BOTWIRE_FAKE_PACE": "0"}
    env.pop("BOTWIRE_URL", None)
    env.pop("BROWSER", None)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "demo", "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)  # bound: "does not hang"
        assert ready, "botwire demo printed nothing within 30 s"
        line = proc.stdout.readline().decode()
        assert line.startswith("botwire demo: open http://127.0.0.1:"), line
        base = line.split("open ", 1)[1].split(" ", 1)[0].rstrip("/")
        page = httpx.get(base + "/")  # served once the URL is printed: no retry
        elapsed = time.monotonic() - started
        assert page.status_code == 200 and "botwire chat" in page.text
        assert elapsed < 30
        with httpx.Client(base_url=base, timeout=10) as client:
            session = client.post("/v1/chat/demo", json={"user": "newcomer"}).json()["session"]
            answer = client.post(f"/v1/chat/demo/{session}/messages", json={"content": "hello"}).json()
            assert read_answer(client, answer["answer"]).startswith("You said: hello.")
        assert (botwire_home / "server").is_dir()  # the embedded server it started
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(20)
    assert code == 0
