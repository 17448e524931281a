"""Real nats-server processes for the tests: loopback only, temporary store, killed by PID."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from botwire_stream._natsproc import render_config, start
from botwire_stream.nats.embedded import find_binary


class NatsServer:
    """One nats-server with JetStream on 127.0.0.1, started and stopped by the tests."""

    def __init__(
        self,
        workdir: Path,
        *,
        max_payload: int | None = None,
        token: str | None = None,
        max_file_store: int | None = None,
        extra_config: str = "",
    ) -> None:
        self.workdir = workdir
        self.store = workdir / "store"
        self.ports_dir = workdir / "ports"
        self.log = workdir / "server.log"
        self.max_payload = max_payload
        self.token = token
        self.max_file_store = max_file_store
        self.extra_config = extra_config
        self.port = -1
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> NatsServer:
        self.store.mkdir(parents=True, exist_ok=True)
        self.ports_dir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nats.conf"
        config = render_config(
            port=self.port,
            ports_dir=self.ports_dir,
            store_dir=self.store,
            max_file_store=self.max_file_store or None,
            max_payload=self.max_payload or None,
            token=self.token,
            extra=[self.extra_config] if self.extra_config else [],
        )
        conf.write_text(config)
        self.proc, self.port = start(find_binary(), conf, self.ports_dir, log=self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL with ``sig=signal.SIGKILL``); the store is kept."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> NatsServer:
        """Start again on the same port and store."""
        self.stop()
        return self.start()
