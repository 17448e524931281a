"""Real nats-server processes for the tests: loopback only, temporary store, killed by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from botwire_stream.embedded import find_binary


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
        for f in self.ports_dir.glob("*.ports"):
            f.unlink()
        lines = [
            "host: 127.0.0.1",
            f"port: {self.port}",
            f"ports_file_dir: {json.dumps(str(self.ports_dir))}",
            f"jetstream {{ store_dir: {json.dumps(str(self.store))}"
            + (f", max_file_store: {self.max_file_store}" if self.max_file_store else "")
            + " }",
        ]
        if self.max_payload:
            lines.append(f"max_payload: {self.max_payload}")
        if self.token:
            lines.append(f"authorization {{ token: {json.dumps(self.token)} }}")
        if self.extra_config:
            lines.append(self.extra_config)
        conf = self.workdir / "nats.conf"
        conf.write_text("\n".join(lines) + "\n")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [find_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
            files = list(self.ports_dir.glob("*.ports"))
            if files:
                try:
                    self.port = int(json.loads(files[0].read_text())["nats"][0].rsplit(":", 1)[1])
                    return self
                except (ValueError, KeyError, IndexError):
                    pass
            time.sleep(0.005)
        raise RuntimeError("nats-server did not start")

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
