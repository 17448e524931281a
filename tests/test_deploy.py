"""docker-compose.yml is for users (no Docker engine here): parse it, and run the same nats-server
command line it declares to check that the library works against a server configured that way."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from botwire_stream import ChatHistory, Memory
from botwire_stream.errors import Unauthorized
from botwire_stream.nats.embedded import find_binary

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_declares_a_persistent_jetstream_server_on_loopback() -> None:
    nats = _compose()["services"]["nats"]
    major, minor = map(int, re.search(r"nats:(\d+)\.(\d+)", nats["image"]).groups())  # type: ignore[union-attr]
    assert (major, minor) >= (2, 12), "message schedules and atomic batches need nats-server 2.12+"
    command = nats["command"]
    assert "--jetstream" in command
    assert any(c.startswith("--store_dir=/data") for c in command)
    assert any(c.startswith("--auth=") for c in command)
    for port in nats["ports"]:
        assert port.startswith("127.0.0.1:"), "published ports stay on loopback"
    assert any(v.endswith(":/data") for v in nats["volumes"])
    assert "nats-data" in _compose()["volumes"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_library_works_against_the_compose_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, namespace: str
) -> None:
    command = [c.replace("${BOTWIRE_TOKEN:-change-me}", "s3cret") for c in _compose()["services"]["nats"]["command"]]
    command = [c.replace("/data", str(tmp_path)) for c in command if not c.startswith("--http_port")]
    port = _free_port()
    proc = subprocess.Popen([find_binary(), *command, "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.02)
        monkeypatch.setenv("BOTWIRE_URL", f"nats://127.0.0.1:{port}")
        monkeypatch.setenv("BOTWIRE_TOKEN", "s3cret")
        with Memory(namespace) as memory:
            memory.set("k", {"v": 1})
            assert memory.get("k") == {"v": 1}
        chat = ChatHistory("s", namespace=namespace)
        chat.append({"role": "user", "content": "hi"})
        assert chat.messages() == [{"role": "user", "content": "hi"}]
        chat.close()
        monkeypatch.setenv("BOTWIRE_TOKEN", "wrong")
        with pytest.raises(Unauthorized):
            Memory(namespace)
    finally:
        proc.terminate()
        proc.wait(10)
