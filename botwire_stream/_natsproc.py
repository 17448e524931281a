"""Start one nats-server process and wait until it listens: the single start-up path of the
embedded server (``embedded.py``), the tests' servers and the benchmarks' server.

``start`` spawns ``nats-server -c <conf>`` with its output appended to a log, then waits for the
ports file the server writes once it accepts clients (``ports_file_dir``:
``<dir>/<binary name>_<pid>.ports``, JSON ``{"nats": ["nats://127.0.0.1:PORT"]}``), and returns
the process and its port. Polling that file is the readiness signal: it appears only after the
listener is up, and with ``port: -1`` it is the only way to learn the port the server chose.
What belongs to one caller stays with it: the embedded server's TLS, token, private files and
disk-full checks live in ``embedded.py``. Internal: not part of the public API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ServerUnavailable

__all__ = ["StartFailed", "conf_string", "render_config", "start"]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_OUTPUT_CHARS = 2000  # how much of this run's output an error shows


class StartFailed(ServerUnavailable):
    """nats-server did not become ready: it exited (``returncode``), or it did not write its ports
    file within the timeout (``returncode`` None; the process was stopped). ``output`` is the end
    of what this run wrote to the log."""

    def __init__(self, message: str, *, returncode: int | None, output: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.output = output


def conf_string(text: str) -> str:
    """``text`` as a double-quoted string of nats-server's config language.

    Its lexer knows the escapes \\t \\n \\r \\" \\\\ and \\uXXXX/\\UXXXXXXXX but rejected the \\u00e9
    that ``json.dumps`` writes for a non-ASCII home (2.15.1), so non-ASCII is written as UTF-8.
    """
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return f'"{escaped}"'


def render_config(
    *,
    port: int,
    ports_dir: Path,
    store_dir: Path,
    max_file_store: int | None = None,
    max_payload: int | None = None,
    token: str | None = None,
    extra: Sequence[str] = (),
    sync_interval: str | None = None,
) -> str:
    """A config for a JetStream server on 127.0.0.1 (``port`` -1: any free port), reporting its
    port in ``ports_dir``; ``extra`` lines are appended as they are (TLS, accounts...).
    ``sync_interval``: JetStream's fsync interval (``always``: every write), config file only."""
    lines = ["host: 127.0.0.1", f"port: {port}"]
    if max_payload is not None:
        lines.append(f"max_payload: {max_payload}")
    lines.append(f"ports_file_dir: {conf_string(str(ports_dir))}")
    if token is not None:
        lines.append(f"authorization {{ token: {conf_string(token)} }}")
    lines.extend(extra)
    limit = f", max_file_store: {max_file_store}" if max_file_store is not None else ""
    sync = f", sync_interval: {sync_interval}" if sync_interval else ""
    # embedded.store_limit_grew reads the limit back from "max_file_store: N }".
    lines.append(f"jetstream {{ store_dir: {conf_string(str(store_dir))}{sync}{limit} }}")
    return "\n".join(lines) + "\n"


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_CLOEXEC, 0o600)


def _output(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")[-_OUTPUT_CHARS:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (and SIGCONT, so that a stopped server handles it), then SIGKILL: our child, by PID.

    It is not reaped before ``wait`` returns, so its PID cannot belong to another process yet."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        if sig == signal.SIGTERM and hasattr(signal, "SIGCONT"):
            os.kill(proc.pid, signal.SIGCONT)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def start(
    binary: str,
    conf: Path,
    ports_dir: Path,
    *,
    log: Path,
    open_log: Callable[[Path], int] = _open_append,
    timeout: float = 15.0,
    on_spawn: Callable[[subprocess.Popen[bytes]], object] | None = None,
    new_session: bool = False,
) -> tuple[subprocess.Popen[bytes], int]:
    """Spawn ``binary -c conf`` (its config written already), output appended to ``log`` (opened
    by ``open_log``, which returns a file descriptor), and wait up to ``timeout`` seconds until it
    listens; return ``(process, port)``.

    ``on_spawn(process)`` runs right after the spawn, while the server boots (work done there
    overlaps the boot). ``new_session``: the server leaves the caller's session, so it survives
    the caller's terminal and Ctrl-C. ``StartFailed`` (with this run's output) when it exits or is
    not ready in time (it is then stopped).
    """
    fd = open_log(log)
    offset = os.lseek(fd, 0, os.SEEK_END)  # errors show this run's output, not older runs'
    try:
        proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
            close_fds=True,
        )
    finally:
        os.close(fd)
    if on_spawn is not None:
        on_spawn(proc)
    ports_file = ports_dir / f"{Path(binary).name}_{proc.pid}.ports"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = _output(log, offset)
            raise StartFailed(
                f"nats-server exited at start (code {proc.returncode}); its output:\n{output}",
                returncode=proc.returncode,
                output=output,
            )
        try:
            url = json.loads(ports_file.read_text())["nats"][0]
            return proc, int(url.rsplit(":", 1)[1])
        except (OSError, ValueError, KeyError, IndexError):
            time.sleep(0.001)  # the file appears within milliseconds of the listener (cold start)
    _stop(proc, 2.0)
    raise StartFailed(
        f"nats-server did not start within {timeout:g} s; see {log}", returncode=None, output=_output(log, offset)
    )
