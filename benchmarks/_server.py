"""Servers the benchmarks start for themselves: nats-server and (when installed) redis-server.

Both listen on 127.0.0.1 only, keep their data in a temporary folder, and are stopped by the PID
this process started; nothing here touches a server it did not start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from botwire_stream._natsproc import StartFailed, render_config, start
from botwire_stream.nats.embedded import find_binary

_START_TIMEOUT = 15.0


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s: always by the PID of the process we spawned."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


class NatsServer:
    """A nats-server with JetStream on 127.0.0.1, a random port (``-1``) and a temporary store."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.version = ""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        binary = find_binary()
        self.version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
        store, ports = self.workdir / "store", self.workdir / "ports"
        store.mkdir(parents=True, exist_ok=True)
        ports.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nats.conf"
        conf.write_text(render_config(port=-1, ports_dir=ports, store_dir=store))
        try:
            self.proc, self.port = start(binary, conf, ports, log=self.workdir / "nats.log", timeout=_START_TIMEOUT)
        except StartFailed as exc:
            raise RuntimeError(str(exc)) from exc
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A redis-server on 127.0.0.1 and a free port, without persistence (``--save '' --appendonly no``)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.version = ""

    @staticmethod
    def binary() -> str | None:
        return shutil.which("redis-server")

    def start(self) -> RedisServer:
        import redis

        binary = self.binary()
        if binary is None:
            raise RuntimeError("no redis-server on PATH")
        self.version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "redis.log"
        for _attempt in range(3):  # the free port may be taken between the probe and the bind
            self.port = _free_port()
            args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
            args += ["--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "yes"]
            with open(log, "ab") as out:
                self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
            deadline = time.monotonic() + _START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    client.ping()
                    client.close()
                    return self
                except redis.exceptions.ConnectionError:
                    time.sleep(0.01)
            client.close()
            self.stop()
        raise RuntimeError(f"redis-server did not start; see {log}")

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
