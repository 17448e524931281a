"""Audit export: every event of chosen namespaces (keys and conversations) to JSON Lines files.

Files: ``<dir>/audit-<n>.jsonl``, one JSON object per event (stream, sequence, namespace, kind,
key or session, operation, time, origin, data; a summary also its ``upto``). A conversation's
operations are ``append``, ``expire``, and its ``summary`` and ``clear`` events), rotated at ``rotate_bytes`` and then, with
``compress``, gzipped (``audit-<n>.jsonl.gz``). Exactly once, also across a SIGKILL: after each
batch the file is fsynced, then ``state.json`` (the file, its length, and the last sequence
written per stream) is replaced atomically, and only then are the events acknowledged. A restart
cuts the file back to the recorded length (dropping lines written after the last state) and skips
events at or below the recorded sequences (redelivered, already written).
"""

from __future__ import annotations

import base64
import fcntl
import gzip
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Final

import msgspec
from nats.aio.msg import Msg

from botwire_stream import keys
from botwire_stream.errors import Conflict

from .runtime import Source, Worker

__all__ = ["Audit", "event_record"]

_STATE: Final = "state.json"


class _State(msgspec.Struct):
    file: int = 0
    offset: int = 0
    seqs: dict[str, int] = msgspec.field(default_factory=dict)


def event_record(source: Source, m: Msg) -> dict[str, Any]:
    """One event as a JSON-ready dict (also the body a webhook POSTs)."""
    meta = m.metadata
    hdr = m.headers or {}
    is_event, token = source.token(m)
    name = keys.decode_key(token)
    if source.kind == "keys":
        op = {"DEL": "delete", "PURGE": "purge"}.get(hdr.get("KV-Operation", ""), "set")
    elif is_event:  # a conversation's summary (``compact``) or clear, as replay names them
        op = hdr.get("Botwire-Event", "summary")
    else:
        op = "append" if m.data else "expire"
    rec: dict[str, Any] = {
        "id": f"{source.stream}:{meta.sequence.stream}",
        "stream": source.stream,
        "seq": meta.sequence.stream,
        "namespace": source.namespace,
        "kind": source.kind,
        ("key" if source.kind == "keys" else "session_id"): name,
        "op": op,
        "time": meta.timestamp.isoformat(),
        "origin": hdr.get("Botwire-Origin"),
    }
    if "Botwire-Upto" in hdr:  # a summary: the last message sequence it covers
        rec["upto"] = int(hdr["Botwire-Upto"])
    if m.data:
        try:
            rec["data"] = m.data.decode()
        except UnicodeDecodeError:
            rec["data_b64"] = base64.b64encode(m.data).decode()
    return rec


class Audit(Worker):
    """``botwire consume audit -n NS... --dir DIR [--gzip]``."""

    kind = "audit"
    batch = 1000

    def __init__(
        self,
        namespaces: list[str],
        directory: str | os.PathLike[str],
        *,
        name: str | None = None,
        compress: bool = False,
        rotate_bytes: int = 64 * 1024 * 1024,
        progress: bool | None = None,
    ) -> None:
        super().__init__(namespaces, ["keys", "chat"], name=name)
        self.dir = Path(directory)
        self.compress = compress
        self.rotate_bytes = rotate_bytes
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._state = _State()
        self._bar: Any = None
        self._done = 0
        self._lock: Any = None

    def _path(self, n: int, gz: bool = False) -> Path:
        return self.dir / f"audit-{n:06d}.jsonl{'.gz' if gz else ''}"

    async def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # One writer per directory: two would each record their own file length in state.json,
        # and a restart cuts the file back to a stale one (acknowledged events lost from it).
        # The lock goes with the process, also on SIGKILL.
        self._lock = open(self.dir / ".lock", "a")  # noqa: SIM115 - held until the process ends
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise Conflict(f"another audit is writing to {self.dir}: run one per directory") from None
        state_path = self.dir / _STATE
        if state_path.exists():
            self._state = msgspec.json.decode(state_path.read_bytes(), type=_State)
        current = self._path(self._state.file)
        if current.exists() and current.stat().st_size > self._state.offset:
            with open(current, "r+b") as f:  # lines written after the last state: written again
                f.truncate(self._state.offset)
        for old in self.dir.glob("audit-*.jsonl"):  # rotated, compressed, not yet removed
            if old != current and self._path(int(old.name[6:12]), gz=True).exists():
                old.unlink()

    async def made_again(self, source: Source) -> None:
        """The stream was deleted and made again: its sequences start anew, so the last one
        written of the old stream no longer tells what is written (every event of the new one
        was skipped as written already). Its events are written from the new stream's first (their
        ids, stream:seq, may repeat ids of the old one's)."""
        self._state.seqs.pop(source.stream, None)
        self._save()

    async def handle(self, source: Source, msgs: list[Msg], caught_up: bool) -> None:
        done = self._state.seqs.get(source.stream, 0)
        lines = [
            msgspec.json.encode(event_record(source, m)) + b"\n" for m in msgs if m.metadata.sequence.stream > done
        ]
        if lines:
            path = self._path(self._state.file)
            with open(path, "ab") as f:
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
                self._state.offset = f.tell()
        self._state.seqs[source.stream] = max(done, msgs[-1].metadata.sequence.stream)
        self._save()
        for m in msgs:
            await m.ack()
        if self._state.offset >= self.rotate_bytes:
            self._rotate()
        self._show(len(msgs), msgs[-1].metadata.num_pending, caught_up)

    def _save(self) -> None:
        tmp = self.dir / (_STATE + ".tmp")
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(self._state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / _STATE)

    def _rotate(self) -> None:
        n = self._state.file
        path = self._path(n)
        if self.compress:
            tmp = self.dir / (path.name + ".gz.tmp")
            with open(path, "rb") as src, gzip.open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, self._path(n, gz=True))
        self._state.file, self._state.offset = n + 1, 0
        self._save()
        if self.compress:
            path.unlink()

    def _show(self, n: int, pending: int, caught_up: bool) -> None:
        """A progress bar while catching up on a backlog (tqdm, on stderr)."""
        if not self.progress:
            return
        if self._bar is None and not caught_up:
            from tqdm import tqdm

            self._bar = tqdm(total=n + pending, unit="event", desc="audit catching up", file=sys.stderr)
        if self._bar is not None:
            self._bar.total = max(self._bar.total, self._bar.n + n + pending)
            self._bar.update(n)
            if caught_up:
                self._bar.close()
                self._bar = None

    async def finish(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the directory's lock
            self._lock = None
        if self._bar is not None:
            self._bar.close()
