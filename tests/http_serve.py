"""``botwire serve`` processes for the tests: started on a free loopback port, ready once they
answer HTTP, stopped (SIGTERM, then SIGKILL) by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

from tests.procs import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Serve:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.base = f"http://127.0.0.1:{port}"

    def stream(self, name: str) -> str:
        return f"{self.base}/v1/stream/{name}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(20)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; nothing if it has ended."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def start_serve(
    url: str | None,
    log: Path,
    *,
    long_poll: float = 0.5,
    bound: float = 60.0,
    extra: Sequence[str] = (),
    port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Serve:
    """``url`` None: the embedded server (of ``BOTWIRE_HOME``); ``extra``: more ``serve`` options;
    ``port``: a given one (a restart on the same address), else a free one; ``env``: more
    environment (the chat model: ``BOTWIRE_FAKE_PACE``, ``BOTWIRE_CHAT_MODEL``, ...); ``log`` is
    appended to (a restart keeps the first process's lines).
    ``bound``: a start that takes longer fails (a does-not-hang bound: 4 xdist workers on 2 busy
    cores took over 20 s to import and start one)."""
    port = port or free_port()
    out = log.open("ab")
    nats = ["--url", url] if url else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "serve", "--port", str(port), *nats,
         "--long-poll-timeout", str(long_poll), *extra],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    out.close()
    serve = Serve(proc, port, log)
    deadline = time.monotonic() + bound
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"botwire serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.head(serve.stream("__ready__"), timeout=1.0).status_code in (404, 401):  # 401: --auth
                return serve
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            serve.kill()
            raise AssertionError(f"botwire serve did not answer within {bound} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def serving(url: str | None, log: Path, *, long_poll: float = 0.5, extra: Sequence[str] = ()) -> Iterator[Serve]:
    serve = start_serve(url, log, long_poll=long_poll, extra=extra)
    try:
        yield serve
    finally:
        serve.stop()


class Serves:
    """The ``botwire serve`` processes of one test (the ``serves`` fixture): each started with
    ``start_serve``'s options and its log in the test's folder, all stopped (SIGTERM, then SIGKILL)
    when the test ends; a test stops one itself only where it checks what follows the stop."""

    # A chat test's serve ends an empty long-poll after 2 s, as the chat tests always had it (the
    # long-poll tests of test_demo_chat.py count on 2 s)
    CHAT_LONG_POLL = 2.0

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[Serve] = []

    def start(
        self,
        url: str | None,
        *,
        log: str | None = None,
        long_poll: float = 0.5,
        extra: Sequence[str] = (),
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Serve:
        """A ready serve process; ``log``: its log's file name (default ``serve-N.log``)."""
        path = self.folder / (log or f"serve-{len(self.started)}.log")
        serve = start_serve(url, path, long_poll=long_poll, extra=extra, port=port, env=env)
        self.started.append(serve)
        return serve

    def chat(self, url: str, env: Mapping[str, str] | None = None, *, log: str | None = None, port: int | None = None) -> Serve:
        """A serve process for the chat tests, its model chosen by ``env`` (``BOTWIRE_FAKE_PACE``,
        ``BOTWIRE_FAKE_TOKENS``, ``BOTWIRE_CHAT_MODEL``, ...)."""
        return self.start(url, log=log, long_poll=self.CHAT_LONG_POLL, port=port, env=env)

    def stop_all(self) -> None:
        for serve in self.started:
            serve.stop()
