"""The embedded server against another local user and unlucky states: what protects the data.

Each test runs in its own BOTWIRE_HOME (``botwire_home``), whose server is stopped afterwards.
"Another user" is a real process running under another uid (the tests run as root in CI; without
root they are skipped). Port thieves are plain TCP listeners the test starts on the old port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

from botwire_stream import AsyncMemory, Memory
from botwire_stream.errors import BotWireError, ServerNotTrusted, ServerUnavailable, UnsafeHome
from botwire_stream.nats import embedded
from tests import workers
from tests.servers import NatsServer

OTHER_UID = 4242  # a uid nobody on the test machine uses
needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="acting as a second local user needs root (to run a process under another uid)",
)
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


class PortThief:
    """A plain TCP listener on 127.0.0.1:``port`` recording every byte clients send it.

    It greets each connection with a NATS INFO asking for auth, as a fake server would, so that
    a client ready to authenticate in clear does so.
    """

    INFO = b'INFO {"server_id":"thief","version":"2.15.1","proto":1,"max_payload":1048576,"auth_required":true}\r\n'

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.received = bytearray()
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(0.3)
                try:
                    conn.sendall(self.INFO)
                    deadline = time.monotonic() + 1.0
                    while time.monotonic() < deadline:
                        data = conn.recv(65536)
                        if not data:
                            break
                        self.received += data
                except OSError:
                    pass

    def wait_connections(self, n: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.connections < n:
            assert time.monotonic() < deadline, f"only {self.connections} connection(s) in {timeout} s"
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def thieves() -> Iterator[list[PortThief]]:
    made: list[PortThief] = []
    yield made
    for thief in made:
        thief.close()


async def _raw_connect(state: embedded.ServerState, token: str | None) -> None:
    """Connect with nats-py the way a client that knows the certificate does (raises if refused)."""
    ctx = ssl.create_default_context(cafile=state.ca_file)
    kwargs = {"token": token} if token is not None else {}
    nc = await nats.connect(
        state.url, tls=ctx, tls_handshake_first=True, allow_reconnect=False, connect_timeout=2, **kwargs
    )
    await nc.close()


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    return
        except OSError:
            return
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


# -- 1. the token ----------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"short", b"\n"])
async def test_an_empty_or_short_token_file_never_turns_authentication_off(
    botwire_home: Path, namespace: str, content: bytes
) -> None:
    embedded.ensure()
    embedded.stop()
    token_file = botwire_home / "server" / "token"
    token_file.write_bytes(content)  # e.g. a disk that was full while the token was written
    async with AsyncMemory(namespace) as m:
        await m.set("k", 1)
    state = embedded.status()
    assert state is not None
    token = token_file.read_text()
    assert len(token) >= embedded.MIN_TOKEN_LENGTH
    with pytest.raises(nats.errors.Error, match="Authorization"):
        await _raw_connect(state, None)
    with pytest.raises(nats.errors.Error, match="Authorization"):
        await _raw_connect(state, content.decode())
    await _raw_connect(state, token)


def test_each_start_gets_a_new_token_and_an_open_memory_follows_it(botwire_home: Path, namespace: str) -> None:
    with Memory(namespace) as m:
        m.set("k", "v")
        first, first_token = embedded.ensure()
        embedded.stop()
        second, second_token = embedded.ensure()  # restarted by someone else
        assert second.pid != first.pid and second_token != first_token
        assert m.get("k") == "v"  # the open memory re-read the token from its file
    assert first_token not in (botwire_home / "server" / "nats.conf").read_text()


# -- 2. a port thief gets nothing ------------------------------------------------------------------
async def test_a_client_sends_no_token_to_whatever_took_over_the_old_port(
    botwire_home: Path, namespace: str, thieves: list[PortThief]
) -> None:
    async with AsyncMemory(namespace) as m:
        await m.set("k", "before")
        state, token = embedded.ensure()
        embedded.stop()  # or a crash: the long-lived client starts reconnecting to the old port
        thief = PortThief(state.port)
        thieves.append(thief)
        await __import__("asyncio").to_thread(thief.wait_connections, 3)
        assert await m.get("k") == "before"  # a new server (on another port: the old one is taken)
        new_state, new_token = embedded.ensure()
    assert new_state.port != state.port and new_token != token
    received = bytes(thief.received)
    assert received, "the client reached the thief"
    assert token.encode() not in received and new_token.encode() not in received
    assert b"CONNECT" not in received  # TLS from the first byte: only handshakes, refused


# -- 3. folders and files --------------------------------------------------------------------------
def test_home_and_its_folders_are_private_whatever_the_umask(botwire_home: Path, namespace: str) -> None:
    old = os.umask(0)
    try:
        with Memory(namespace) as m:
            m.set("k", 1)
    finally:
        os.umask(old)
    sdir = botwire_home / "server"
    for folder in (botwire_home, sdir, sdir / "ports", botwire_home / "jetstream"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for name in ("token", "nats.conf", "state.json", "key.pem", "cert.pem", "server.log"):
        assert stat.S_IMODE((sdir / name).stat().st_mode) == 0o600, name


def _as_other_user(script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script as uid/gid ``OTHER_UID``: another local account."""
    return subprocess.run(
        ["/bin/sh", "-c", script], user=OTHER_UID, group=OTHER_UID, capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder under /tmp that every account can enter and write to (sticky, like /tmp itself)."""
    path = Path(tempfile.mkdtemp(prefix="botwire-shared-", dir="/tmp"))
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_a_home_prepared_by_another_user_is_refused(shared_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = shared_tmp / "botwire"
    planted = "planted-token-known-to-the-other-user-0123456789"
    done = _as_other_user(
        f"mkdir -m 777 '{home}' '{home}/server' && chmod 777 '{home}' '{home}/server' && "
        f"printf %s {planted} > '{home}/server/token'"
    )
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("BOTWIRE_HOME", str(home))
    try:
        with pytest.raises(UnsafeHome, match="uid 4242") as info:
            Memory("ns")
        assert isinstance(info.value, BotWireError)
        assert not (home / "server" / "nats.conf").exists()
        assert not (home / "jetstream").exists()
    finally:
        state = embedded._read_state(home)
        if state is not None:  # a regression started a server there: do not leave it running
            embedded._terminate(state, 5.0)


@needs_root
def test_another_user_cannot_read_the_token_or_the_data(shared_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = shared_tmp / "botwire"
    monkeypatch.setenv("BOTWIRE_HOME", str(home))
    old = os.umask(0)  # the most permissive umask: the folders must still be private
    try:
        with Memory("ns") as m:
            m.set("secret", "s3cret-value")
        state = embedded.status()
        assert state is not None
        peek = _as_other_user(
            f"cat '{home}/server/token' '{home}/server/nats.conf' '{home}/server/key.pem' 2>/dev/null; "
            f"ls -R '{home}/server' '{home}/jetstream' 2>/dev/null; "
            f"grep -r s3cret '{home}' 2>/dev/null; true"
        )
        assert peek.returncode == 0, peek.stderr
        assert peek.stdout == ""
        token = (home / "server" / "token").read_text()
        assert token not in peek.stdout
    finally:
        os.umask(old)
        embedded.stop(home)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_home_writable_by_others_is_refused(botwire_home: Path, mode: int) -> None:
    botwire_home.mkdir()
    os.chmod(botwire_home, mode)
    with pytest.raises(UnsafeHome, match="writable by other users"):
        embedded.ensure()
    assert not (botwire_home / "server" / "token").exists()


def test_a_server_folder_writable_by_others_is_refused(botwire_home: Path) -> None:
    embedded.ensure()
    embedded.stop()
    os.chmod(botwire_home / "server", 0o770)
    with pytest.raises(UnsafeHome, match="writable by other users"):
        embedded.ensure()
    os.chmod(botwire_home / "server", 0o700)


@pytest.mark.parametrize("name", ["nats.conf", "token", "state.json", "cert.pem", "key.pem"])
def test_planted_symlinks_are_not_followed(botwire_home: Path, namespace: str, tmp_path: Path, name: str) -> None:
    embedded.ensure()
    embedded.stop()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = botwire_home / "server" / name
    link.unlink()
    link.symlink_to(victim)
    try:
        with Memory(namespace) as m:
            m.set("k", 1)
            assert m.get("k") == 1
    except UnsafeHome:
        pass  # refusing is fine too; writing through the link is not
    assert victim.read_text() == "precious\n"


def test_a_symlinked_server_log_is_refused_not_written(botwire_home: Path, namespace: str, tmp_path: Path) -> None:
    embedded.ensure()
    embedded.stop()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    log = botwire_home / "server" / "server.log"
    log.unlink()
    log.symlink_to(victim)
    with pytest.raises(UnsafeHome, match="server.log"):
        Memory(namespace)
    assert victim.read_text() == "precious\n"


# -- 4. tls:// means TLS ---------------------------------------------------------------------------
async def test_tls_url_to_a_server_without_tls_sends_no_credentials(
    namespace: str, tmp_path: Path, thieves: list[PortThief]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    thief = PortThief(port)
    thieves.append(thief)
    started = time.monotonic()
    with pytest.raises(ServerNotTrusted, match="does not offer TLS"):
        async with AsyncMemory(namespace, url=f"tls://127.0.0.1:{port}", token="tok-secret-1234") as m:
            await m.get("k")
    assert time.monotonic() - started < 15  # does not hang
    assert thief.connections >= 1
    assert b"tok-secret-1234" not in thief.received and b"CONNECT" not in thief.received


async def test_tls_url_to_a_plain_nats_server_fails_clearly(namespace: str, tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "plain", token="tok-secret-5678").start()
    try:
        with pytest.raises(ServerNotTrusted, match="does not offer TLS") as info:
            async with AsyncMemory(namespace, url=f"tls://127.0.0.1:{server.port}", token="tok-secret-5678") as m:
                await m.set("k", 1)
        assert isinstance(info.value, ServerUnavailable)
        async with AsyncMemory(namespace, url=server.url, token="tok-secret-5678") as m:
            assert await m.get("k") is None  # nothing was written through the refused connection
    finally:
        server.stop()


# -- 5. credentials stay out of messages and process lists -----------------------------------------
async def test_url_credentials_are_redacted_in_errors(namespace: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    with pytest.raises(ServerUnavailable) as info:
        async with AsyncMemory(namespace, url=f"nats://alice:pa55word@127.0.0.1:{port}") as m:
            await m.get("k")
    assert "pa55word" not in str(info.value) and "alice" not in str(info.value)
    assert "127.0.0.1" in str(info.value)
    with pytest.raises(BotWireError) as info2:  # over HTTP (botwire serve): at first use
        with Memory(namespace, url="https://bob:hunter22@example.invalid", timeout=2) as m2:
            m2.get("k")
    assert "hunter22" not in str(info2.value)


def _botwire(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "botwire_stream", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_cli_takes_the_token_from_a_file_and_warns_about_token_on_the_command_line(
    namespace: str, tmp_path: Path
) -> None:
    server = NatsServer(tmp_path / "s", token="cli-secret-token-42").start()
    try:
        token_file = tmp_path / "token"
        token_file.write_text("cli-secret-token-42\n")
        ok = _botwire("--url", server.url, "--token-file", str(token_file), "-n", namespace, "set", "k", "1")
        assert ok.returncode == 0, ok.stderr
        assert _botwire("--url", server.url, "-n", namespace, "get", "k", env={"BOTWIRE_TOKEN": "cli-secret-token-42"}).stdout.strip() == "1"
        (tmp_path / "wrong").write_text("nope\n")
        bad = _botwire("--url", server.url, "--token-file", str(tmp_path / "wrong"), "-n", namespace, "get", "k")
        assert bad.returncode == 2 and "refused" in bad.stderr
        old = _botwire("--url", server.url, "--token", "cli-secret-token-42", "-n", namespace, "get", "k")
        assert old.returncode == 0 and "process list" in old.stderr
        helptext = _botwire("--help").stdout
        assert "--token-file" in helptext and "BOTWIRE_TOKEN" in helptext
    finally:
        server.stop()


# -- 6. a stale pid is never signalled -------------------------------------------------------------
def _fake_state(home: Path, pid: int, port: int = 1) -> None:
    sdir = home / "server"
    state = embedded.ServerState(
        url=f"tls://127.0.0.1:{port}",
        pid=pid,
        port=port,
        home=str(home),
        store_dir=str(home / "jetstream"),
        log_file=str(sdir / "server.log"),
        token_file=str(sdir / "token"),
    )
    (sdir / "state.json").write_text(json.dumps(state.__dict__))
    os.chmod(sdir / "state.json", 0o600)


@needs_proc
def test_a_stale_pid_of_another_process_is_not_killed(botwire_home: Path, namespace: str, tmp_path: Path) -> None:
    embedded.ensure()
    embedded.stop()
    log = tmp_path / "nats-server.log"
    log.write_text("")
    tail = subprocess.Popen(["tail", "-f", str(log)], stdout=subprocess.DEVNULL)
    try:
        _fake_state(botwire_home, tail.pid)
        assert embedded.status() is None
        stopped = _botwire("server", "stop")
        assert stopped.returncode == 0 and "no embedded nats-server was running" in stopped.stdout
        with Memory(namespace) as m:
            m.set("k", 1)
        assert tail.poll() is None, "tail was killed"
    finally:
        tail.kill()
        tail.wait(5)


@needs_proc
def test_the_server_of_another_home_is_not_taken_for_ours(
    botwire_home: Path, namespace: str, tmp_path: Path
) -> None:
    other_home = tmp_path / "other"
    other, _ = embedded.ensure(other_home)
    try:
        embedded.ensure()
        embedded.stop()
        _fake_state(botwire_home, other.pid, other.port)  # a stale state.json naming that pid
        assert embedded.status() is None
        assert embedded.stop() is None
        with Memory(namespace) as m:
            m.set("k", 1)
        ours = embedded.status()
        assert ours is not None and ours.pid != other.pid
        assert embedded.status(other_home) == other and _alive(other.pid)
    finally:
        embedded.stop(other_home)


# -- 7. homes with odd names -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["josé-ö-中文", "with space", "q\"uo'te", "back\\slash$HOME"])
def test_homes_with_odd_names_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, namespace: str, name: str) -> None:
    home = tmp_path / name / "botwire"
    monkeypatch.setenv("BOTWIRE_HOME", str(home))
    try:
        with Memory(namespace) as m:
            m.set("k", "v")
        assert workers.run("get", "-", namespace, "k") == {"found": True, "value": "v"}
        assert any((home / "jetstream").iterdir())  # the data is in this home, not elsewhere
    finally:
        embedded.stop(home)


# -- 10. a lost token file -------------------------------------------------------------------------
def test_a_lost_token_file_restarts_the_server_cleanly(botwire_home: Path, namespace: str) -> None:
    with Memory(namespace) as m:
        m.set("k", "v")
        first = embedded.status()
        assert first is not None
        (botwire_home / "server" / "token").unlink()
        assert workers.run("get", "-", namespace, "k") == {"found": True, "value": "v"}
        second = embedded.status()
        assert second is not None and second.pid != first.pid
        assert m.get("k") == "v"  # the open memory follows the new token
    started = _botwire("server", "start")
    assert started.returncode == 0 and "already running" in started.stdout
    (botwire_home / "server" / "token").unlink()
    restarted = _botwire("server", "start")
    assert restarted.returncode == 0 and "started" in restarted.stdout, restarted.stdout


# -- issue 14: same port after kill -9 -------------------------------------------------------------
def test_after_kill_9_the_server_comes_back_on_the_same_port(botwire_home: Path, namespace: str) -> None:
    with Memory(namespace) as m:
        for i in range(20):
            m.set(f"k{i}", i)
        first = embedded.status()
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        _wait_dead(first.pid)
        assert m.get("k19") == 19
        second = embedded.status()
        assert second is not None and second.pid != first.pid
        assert second.port == first.port
