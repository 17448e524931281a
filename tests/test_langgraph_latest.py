"""BotWireSaver's latest checkpoint across processes: exact right after another process's write
returns (the cached answer is proven by a ping), and never stale across a stopped or restarted
nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import nats
import pytest

pytest.importorskip("langgraph")
from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402

from botwire_stream.errors import BotWireError  # noqa: E402
from botwire_stream.integrations.langgraph import BotWireSaver  # noqa: E402
from botwire_stream.nats.checkpoints import _ping  # noqa: E402
from tests import waits  # noqa: E402
from tests.procs import commanded  # noqa: E402
from tests.servers import NatsServer  # noqa: E402

# The other process: one JSON command a line on stdin, "ok" (or the error) on stdout once done.
_CHILD = r"""
import json, sys
from langgraph.checkpoint.base import empty_checkpoint
from botwire_stream.integrations.langgraph import BotWireSaver
saver = BotWireSaver(sys.argv[2], url=sys.argv[1], timeout=2.0)
print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        cfg = {"configurable": {"thread_id": cmd["thread"], "checkpoint_ns": ""}}
        if cmd["op"] == "put":
            cp = empty_checkpoint()
            cp["id"] = cmd["id"]
            cp["channel_values"] = {"n": cmd["n"]}
            saver.put(cfg, cp, {"step": cmd["n"]}, {})
        elif cmd["op"] == "writes":
            cfg["configurable"]["checkpoint_id"] = cmd["id"]
            saver.put_writes(cfg, [("n", cmd["n"])], cmd["task"])
        elif cmd["op"] == "delete":
            saver.delete_thread(cmd["thread"])
        print("ok", flush=True)
    except Exception as exc:
        print(f"error {type(exc).__name__}: {exc}", flush=True)
"""


class Child:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def do(self, **cmd: Any) -> None:
        """Run one command in the other process; returns once its call has returned there."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()  # the child's own timeouts bound this
        assert line == "ok", line


@contextmanager
def child(url: str, namespace: str) -> Iterator[Child]:
    with commanded([sys.executable, "-c", _CHILD, url, namespace]) as proc:
        yield Child(proc)


def _ids(n: int) -> list[str]:
    """``n`` checkpoint ids in increasing order (LangGraph's are time-ordered uuid6 strings)."""
    out = []
    for _ in range(n):
        out.append(empty_checkpoint()["id"])
        time.sleep(0.001)  # uuid6 ids of one millisecond may tie on their time part
    assert out == sorted(out) and len(set(out)) == n
    return out


def _latest(saver: BotWireSaver, thread: str) -> tuple[str, int, list[Any]] | None:
    t = saver.get_tuple({"configurable": {"thread_id": thread, "checkpoint_ns": ""}})
    if t is None:
        return None
    return t.checkpoint["id"], t.checkpoint["channel_values"]["n"], [w[2] for w in t.pending_writes]


def test_another_process_write_is_seen_right_after_it_returns(url: str, namespace: str) -> None:
    """Each write of the other process (a newer checkpoint, an older id stored last, a pending
    write, a delete) is in this process's very next ``get_tuple``, which has just answered from
    its cache; the latest is the highest id, whatever the order stored."""
    saver = BotWireSaver(namespace, url=url)
    thread = f"t-{uuid.uuid4().hex[:8]}"
    try:
        with child(url, namespace) as other:
            assert _latest(saver, thread) is None
            ids = _ids(41)
            for i in range(0, 40, 2):
                other.do(op="put", thread=thread, id=ids[i + 1], n=i + 1)
                assert _latest(saver, thread) == (ids[i + 1], i + 1, [])
                assert _latest(saver, thread) == (ids[i + 1], i + 1, [])  # the cached answer
                other.do(op="put", thread=thread, id=ids[i], n=i)  # an older id, stored last
                assert _latest(saver, thread) == (ids[i + 1], i + 1, [])
                other.do(op="writes", thread=thread, id=ids[i + 1], task=f"task{i}", n=i)
                assert _latest(saver, thread) == (ids[i + 1], i + 1, [i])
            listed = [t.checkpoint["id"] for t in saver.list({"configurable": {"thread_id": thread}}, limit=1)]
            assert listed == [ids[39]]
            other.do(op="delete", thread=thread)
            assert _latest(saver, thread) is None
            other.do(op="put", thread=thread, id=ids[40], n=40)
            assert _latest(saver, thread) == (ids[40], 40, [])
    finally:
        saver.close()


@pytest.mark.slow
def test_a_stopped_or_restarted_server_never_makes_get_tuple_stale(own_server: NatsServer) -> None:
    """A write acknowledged just before the server is SIGSTOPped, or made while this process is
    still reconnecting after a restart, is what ``get_tuple`` answers next (or it raises while the
    server is stopped, within a bound): a cached answer is never served unproven."""
    url, namespace = own_server.url, "lgcache"
    saver = BotWireSaver(namespace, url=url, timeout=1.0)
    thread = "t"
    ids = _ids(3)
    try:
        with child(url, namespace) as other:
            other.do(op="put", thread=thread, id=ids[0], n=0)
            assert _latest(saver, thread) == (ids[0], 0, [])
            assert _latest(saver, thread) == (ids[0], 0, [])  # cached
            other.do(op="put", thread=thread, id=ids[1], n=1)
            waits.sigstop(own_server.pid)
            try:
                started = time.monotonic()
                try:
                    assert _latest(saver, thread) == (ids[1], 1, [])
                except BotWireError:
                    assert time.monotonic() - started < 3 * 1.0 + 2  # does not hang
            finally:
                os.kill(own_server.pid, signal.SIGCONT)
            assert _latest(saver, thread) == (ids[1], 1, [])  # cached again

            own_server.restart()
            other.do(op="put", thread=thread, id=ids[2], n=2)  # the child reconnects first
            assert _latest(saver, thread) == (ids[2], 2, [])
    finally:
        saver.close()


def test_list_paging_with_before_while_another_process_writes(url: str, namespace: str) -> None:
    """Paging a thread with ``before`` and ``limit`` while another process stores newer
    checkpoints and deletes none: every page is newest first, no checkpoint is returned twice,
    and every one stored before paging began is returned once."""
    saver = BotWireSaver(namespace, url=url)
    thread = f"p-{uuid.uuid4().hex[:8]}"
    ids = _ids(60)
    try:
        with child(url, namespace) as other:
            for n, cid in enumerate(ids[:30]):
                other.do(op="put", thread=thread, id=cid, n=n)
            seen: list[str] = []
            before: dict[str, Any] | None = None
            for n in range(30, 60):  # one newer checkpoint stored between each two pages
                page = [
                    t.checkpoint["id"]
                    for t in saver.list({"configurable": {"thread_id": thread}}, before=before, limit=3)
                ]
                assert page == sorted(page, reverse=True)
                seen += page
                if not page:
                    break
                before = {"configurable": {"thread_id": thread, "checkpoint_id": page[-1]}}
                other.do(op="put", thread=thread, id=ids[n], n=n)
            assert len(seen) == len(set(seen))
            assert seen == sorted(ids[:30], reverse=True)[: len(seen)] and set(ids[:30]) <= set(seen)
    finally:
        saver.close()


class _SlowSubscriber:
    """A raw client of the server on the namespace's checkpoint subjects that never reads, its
    outbound buffer filled past 75 % of ``max_pending``: nats-server then stalls every publisher's
    fan-out at it (a "fast producer stall", 2 ms a message). When the server happens to hand a
    record to the stream before this client and to the watching process after it, the stream
    stores and acknowledges the record while the watcher's copy is still held back: a writer's
    acknowledged put is then not yet at the watcher (the window that under CI load served an
    older checkpoint)."""

    def __init__(self, server: NatsServer, subject: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.recv(4096)  # INFO
        self.sock.sendall(
            b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"name":"slow"}\r\n'
            + f"SUB {subject} 1\r\nSUB fill 2\r\nPING\r\n".encode()
        )
        got = b""
        while b"PONG" not in got:
            got += self.sock.recv(4096)
        monitor = json.loads(next(server.ports_dir.glob("*.ports")).read_text())["monitoring"][0]
        self.connz = f"{monitor}/connz"

    def pending(self) -> int:
        with urllib.request.urlopen(self.connz, timeout=5) as reply:
            conns = json.load(reply)["connections"]
        return int(next(c["pending_bytes"] for c in conns if c.get("name") == "slow"))

    def fill(self, url: str, limit: int) -> None:
        """Publish to ``fill`` until the server holds more than 80 % of ``limit`` for this client."""

        async def run() -> None:
            nc = await nats.connect(url)
            try:
                for _ in range(1000):  # the kernel's socket buffers take the first megabytes
                    pending = self.pending()
                    if pending > limit * 0.8:
                        return
                    step = 16384 if pending else 262144
                    await nc.publish("fill", b"x" * step)
                    await nc.flush()
                raise AssertionError("the slow subscriber's outbound never filled")
            finally:
                await nc.close()

        asyncio.run(run())

    def close(self) -> None:
        self.sock.close()


_MAX_PENDING = 1 << 20


def _stallable_server(tmp_path: Any) -> NatsServer:
    """A private server whose clients may fall _MAX_PENDING behind (a stalled subscriber) without
    being cut off, with its monitoring port (the tests watch the stall's pending bytes there)."""
    return NatsServer(
        tmp_path / "own",
        extra_config=f'max_pending: {_MAX_PENDING}\nwrite_deadline: "60s"\nhttp: "127.0.0.1:-1"',
    ).start()


@pytest.mark.slow
def test_a_write_is_seen_even_when_the_server_acks_it_before_handing_it_to_the_watcher(tmp_path: Any) -> None:
    """nats-server acknowledges a stored record from the stream's own goroutine while the
    publisher's connection may still be handing the record to other subscribers: here a stalled
    subscriber holds that hand-off back 2 ms a record. Every write of the other process is still
    in this process's very next ``get_tuple``."""
    server = _stallable_server(tmp_path)
    namespace, thread = "amp", "t"
    try:
        with child(server.url, namespace) as other:
            other.do(op="put", thread="other", id=_ids(1)[0], n=0)  # the stream (its subscription first)
            slow = _SlowSubscriber(server, f"botwire.{namespace}.lg.>")
            try:
                slow.fill(server.url, _MAX_PENDING)
                saver = BotWireSaver(namespace, url=server.url)
                try:
                    assert _latest(saver, thread) is None  # the watch subscribes after the slow one
                    ids = _ids(40)
                    for i in range(0, 40, 2):
                        other.do(op="put", thread=thread, id=ids[i], n=i)  # an older id first
                        assert _latest(saver, thread) == (ids[i], i, [])
                        assert _latest(saver, thread) == (ids[i], i, [])  # the cached answer
                        other.do(op="put", thread=thread, id=ids[i + 1], n=i + 1)
                        assert _latest(saver, thread) == (ids[i + 1], i + 1, [])
                        other.do(op="writes", thread=thread, id=ids[i + 1], task=f"task{i}", n=i)
                        assert _latest(saver, thread) == (ids[i + 1], i + 1, [i])
                    assert slow.pending() <= _MAX_PENDING  # still stalling, never dropped
                finally:
                    saver.close()
            finally:
                slow.close()
    finally:
        server.stop()


def test_the_ping_that_proves_a_hand_off_follows_the_commands_sent_before_it(url: str) -> None:
    """A delete's notice and the watch's subscriptions are proven by a ping right after them:
    the ping must reach the server after them (nats-py writes a PING to the socket ahead of the
    commands still queued for its flusher). A message published right before the ping is back
    on this connection's own subscription when the ping returns, every time."""

    async def run() -> int:
        nc = await nats.connect(url)
        try:
            got: list[Any] = []

            async def cb(msg: Any) -> None:
                got.append(msg)

            sub = await nc.subscribe("lg.ping.order", cb=cb)
            assert await _ping(nc, 5.0)
            late = 0
            for i in range(500):
                await nc.publish("lg.ping.order", b"x")
                assert await _ping(nc, 5.0)
                if len(got) + sub.pending_msgs != i + 1:
                    late += 1
                    await waits.until(lambda: _async_true(len(got) + sub.pending_msgs == i + 1), "the message")
            return late
        finally:
            await nc.close()

    assert asyncio.run(run()) == 0


async def _async_true(value: bool) -> bool:
    return value


@pytest.mark.slow
def test_a_read_racing_a_write_the_watch_saw_before_the_stream_stored_it_is_not_kept(tmp_path: Any) -> None:
    """The server may hand a record to this process's watch before the stream has stored it
    (the stalled subscriber, subscribed after the watch, holds the store back 2 ms a record when
    it comes between them). Reads made while the other process's write is in flight may answer
    the older state, but none of them is kept: the very next ``get_tuple`` after the write
    returns answers it, every time."""
    server = _stallable_server(tmp_path)
    namespace, thread = "gap", "t"
    try:
        with child(server.url, namespace) as other:
            ids = _ids(61)
            other.do(op="put", thread=thread, id=ids[0], n=0)  # the stream (its subscription first)
            saver = BotWireSaver(namespace, url=server.url)
            try:
                assert _latest(saver, thread) == (ids[0], 0, [])  # the watch, before the slow one
                slow = _SlowSubscriber(server, f"botwire.{namespace}.lg.>")
                try:
                    slow.fill(server.url, _MAX_PENDING)
                    assert other.proc.stdin is not None and other.proc.stdout is not None
                    for i in range(1, 61):
                        task = i % 2 == 0
                        cmd = (
                            {"op": "writes", "thread": thread, "id": ids[i - 1], "task": f"task{i}", "n": i}
                            if task
                            else {"op": "put", "thread": thread, "id": ids[i], "n": i}
                        )
                        other.proc.stdin.write(json.dumps(cmd) + "\n")
                        other.proc.stdin.flush()
                        # Read again and again while the write is in flight (bounded: the child's
                        # own timeout answers within seconds).
                        for _ in range(10_000):
                            _latest(saver, thread)
                            if select.select([other.proc.stdout], [], [], 0)[0]:
                                break
                        assert other.proc.stdout.readline().strip() == "ok"
                        expected = (ids[i - 1], i - 1, [i]) if task else (ids[i], i, [])
                        assert _latest(saver, thread) == expected, i
                    assert slow.pending() <= _MAX_PENDING  # still stalling, never dropped
                finally:
                    slow.close()
            finally:
                saver.close()
    finally:
        server.stop()
