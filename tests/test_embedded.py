"""The embedded default server: one per BOTWIRE_HOME, private, persistent, restarted when it dies.

Every test runs in its own BOTWIRE_HOME (``botwire_home`` fixture), whose server is stopped after
the test.
"""

from __future__ import annotations

import os
import signal
import ssl
import stat
import time
from pathlib import Path

import nats
import nats.errors
import pytest

from botwire_stream import Memory
from botwire_stream.errors import ServerNotFound, ServerUnavailable
from botwire_stream.nats import embedded
from tests import workers


def _server_processes(home: Path) -> list[int]:
    """Live nats-server processes started with this home's config (Linux /proc)."""
    conf = str(home / "server" / "nats.conf").encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if b"nats-server" in cmdline and conf in cmdline and state != b"Z":
            pids.append(int(entry.name))
    return pids


def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, st = fields[1], fields[3]
            address, hex_port = local.rsplit(":", 1)
            if st == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    state = embedded.status()
    while state is not None and state.pid == pid:
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} still alive")
        time.sleep(0.02)
        state = embedded.status()


needs_proc = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


@needs_proc
def test_concurrent_first_uses_start_exactly_one_server(botwire_home: Path, namespace: str, tmp_path: Path) -> None:
    pids = workers.run_together(6, tmp_path / "go", "open", namespace, str(tmp_path / "go"))
    state = embedded.status()
    assert state is not None
    assert pids == [state.pid] * 6
    assert _server_processes(botwire_home) == [state.pid]
    with Memory(namespace) as m:
        assert len(m.list_keys("pid:*")) == 6


@needs_proc
def test_concurrent_ensure_calls_agree_on_one_server(botwire_home: Path, tmp_path: Path) -> None:
    pids = workers.run_together(6, tmp_path / "go", "ensure", str(tmp_path / "go"))
    state, _token = embedded.ensure()
    assert pids == [state.pid] * 6
    assert _server_processes(botwire_home) == [state.pid]


@needs_proc
async def test_server_is_private_to_the_owner_and_loopback(botwire_home: Path, namespace: str) -> None:
    with Memory(namespace) as m:
        m.set("secret", 42)
    state, token = embedded.ensure()
    token_file = Path(state.token_file)
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((botwire_home / "server" / "nats.conf").stat().st_mode) == 0o600
    assert state.url == f"tls://127.0.0.1:{state.port}"
    assert _listen_addresses(state.port) == {"0100007F"}  # 127.0.0.1, and nothing else

    pinned = ssl.create_default_context(cafile=state.ca_file)
    tls = {"tls": pinned, "tls_handshake_first": True, "allow_reconnect": False, "connect_timeout": 2}
    with pytest.raises(nats.errors.Error, match="Authorization"):
        await nats.connect(state.url, **tls)  # type: ignore[arg-type]
    with pytest.raises(nats.errors.Error, match="Authorization"):
        await nats.connect(state.url, token="wrong", **tls)  # type: ignore[arg-type]
    nc = await nats.connect(state.url, token=token, **tls)  # type: ignore[arg-type]
    await nc.close()


def test_data_persists_across_stop_and_next_use(botwire_home: Path, namespace: str) -> None:
    big = "p" * (9 * 1024 * 1024)  # over the embedded server's 8 MiB max_payload: chunked
    with Memory(namespace) as m:
        for i in range(50):
            m.set(f"k:{i}", {"i": i})
        m.set("big", big)
        m.set("gone", 1)
        m.delete("gone")
    first = embedded.stop()
    assert first is not None
    assert embedded.status() is None
    with Memory(namespace) as m:  # starts a new server on the same data
        assert m.list_keys("k:*") == sorted(f"k:{i}" for i in range(50))
        assert all(m.get(f"k:{i}") == {"i": i} for i in range(50))
        assert m.get("big") == big
        assert "gone" not in m
    second = embedded.status()
    assert second is not None and second.pid != first.pid


def test_open_memory_survives_kill_9_of_the_server(botwire_home: Path, namespace: str) -> None:
    m = Memory(namespace)
    try:
        revs = [m.set(f"k:{i}", i) for i in range(100)]
        state = embedded.status()
        assert state is not None
        os.kill(state.pid, signal.SIGKILL)
        _wait_dead(state.pid)

        assert m.get("k:99") == 99  # the transport restarts the server, transparently
        assert m.list_keys("k:*") == sorted(f"k:{i}" for i in range(100))
        assert all(m.get(f"k:{i}") == i for i in range(100))
        assert m.set("after", "kill") > revs[-1]
        assert m.update("k:0", lambda v: v + 1) == 1
        restarted = embedded.status()
        assert restarted is not None and restarted.pid != state.pid
    finally:
        m.close()
    assert workers.run("get", "-", namespace, "after") == {"found": True, "value": "kill"}


def test_a_new_process_after_kill_9_restarts_the_server(botwire_home: Path, namespace: str) -> None:
    workers.run("set", "-", namespace, "k", '"before"')
    state = embedded.status()
    assert state is not None
    os.kill(state.pid, signal.SIGKILL)
    _wait_dead(state.pid)
    assert workers.run("get", "-", namespace, "k") == {"found": True, "value": "before"}
    assert embedded.status() is not None


def test_missing_binary_raises_server_not_found(
    botwire_home: Path, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-such-nats-server"
    monkeypatch.setenv("BOTWIRE_NATS_SERVER", str(missing))
    with pytest.raises(ServerNotFound, match="BOTWIRE_NATS_SERVER") as info:
        Memory(namespace)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, ServerUnavailable)
    with pytest.raises(ServerNotFound):
        embedded.ensure()
    not_executable = tmp_path / "nats-server"
    not_executable.write_text("#!/bin/sh\n")
    monkeypatch.setenv("BOTWIRE_NATS_SERVER", str(not_executable))
    with pytest.raises(ServerNotFound, match="executable"):
        embedded.ensure()
    assert embedded.status() is None


def test_status_and_stop(botwire_home: Path) -> None:
    assert embedded.status() is None
    assert embedded.stop() is None
    state, _token = embedded.ensure()
    assert embedded.status() == state
    assert embedded.ensure()[0] == state  # reused, not restarted
    assert embedded.stop() == state
    assert embedded.status() is None
