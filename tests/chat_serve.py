"""``botwire serve`` processes for the chat tests, with the model chosen by environment variables
(``BOTWIRE_FAKE_PACE``, ``BOTWIRE_CHAT_MODEL``, ...); ready once they serve the chat page."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from tests.http_serve import Serve, free_port
from tests.procs import ROOT


def start(url: str, log: Path, *, port: int | None = None, env: Mapping[str, str] | None = None) -> Serve:
    port = port or free_port()
    out = log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "serve", "--port", str(port), "--url", url, "--long-poll-timeout", "2"],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    out.close()
    serve = Serve(proc, port, log)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"botwire serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(serve.base + "/", timeout=1.0).status_code == 200:
                return serve
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            serve.kill()
            raise AssertionError(f"botwire serve did not answer within 20 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def stop(serve: Serve) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    if serve.proc.poll() is None:
        os.kill(serve.proc.pid, signal.SIGTERM)
        try:
            serve.proc.wait(15)
        except subprocess.TimeoutExpired:
            serve.kill()


def read_answer(client: httpx.Client, answer_url: str, bound: float = 30.0, offset: str = "-1") -> str:
    """The answer's text after ``offset``, read by long-polls until the stream says it is closed."""
    text = ""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        r = client.get(answer_url, params={"offset": offset, "live": "long-poll"})
        assert r.status_code in (200, 204), r.text
        if r.status_code == 200:
            text += r.text
        offset = r.headers["stream-next-offset"]
        if r.headers.get("stream-closed") == "true":
            return text
    raise AssertionError(f"the answer was not closed within {bound} s; got {text!r}")
