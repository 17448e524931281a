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
from collections.abc import Iterator, Sequence
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


def start_serve(
    url: str | None, log: Path, *, long_poll: float = 0.5, bound: float = 60.0, extra: Sequence[str] = ()
) -> Serve:
    """``url`` None: the embedded server (of ``BOTWIRE_HOME``); ``extra``: more ``serve`` options.
    ``bound``: a start that takes longer fails (a does-not-hang bound: 4 xdist workers on 2 busy
    cores took over 20 s to import and start one)."""
    port = free_port()
    out = log.open("wb")
    nats = ["--url", url] if url else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "serve", "--port", str(port), *nats,
         "--long-poll-timeout", str(long_poll), *extra],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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
        if serve.proc.poll() is None:
            os.kill(serve.proc.pid, signal.SIGTERM)
            try:
                serve.proc.wait(15)
            except subprocess.TimeoutExpired:
                serve.kill()
