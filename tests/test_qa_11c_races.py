"""QA of BotWireSaver's ``copy_thread``, ``prune`` and ``delete_thread`` racing writers of the same
thread (another task, another OS process), and of its per-process latest-checkpoint cache across
them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langgraph")
from langgraph.checkpoint.base import CheckpointTuple, empty_checkpoint  # noqa: E402

from botwire_stream.integrations.langgraph import BotWireSaver  # noqa: E402
from tests.procs import ROOT, commanded  # noqa: E402

_WRITES = 200  # pending writes of each task of a chain (4 rounds of 64): copies land among them


def _cfg(thread: str, checkpoint_id: str | None = None, ns: str = "") -> Any:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def _ids(n: int) -> list[str]:
    """``n`` checkpoint ids in increasing order (LangGraph's are time-ordered uuid6 strings)."""
    out = []
    for _ in range(n):
        out.append(empty_checkpoint()["id"])
        time.sleep(0.001)  # ids of one millisecond may tie on their time part
    assert out == sorted(out)
    return out


class Saver:
    """A ``python -m tests.qa11c_workers saver`` process: one call at a time, run there."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # the child's own timeouts bound this
        assert line == "ok", line

    def do(self, **cmd: Any) -> None:
        """Run one call in the other process; returns once it has returned there."""
        self.send(**cmd)
        self.answer()

    async def ado(self, **cmd: Any) -> None:
        self.send(**cmd)
        await asyncio.to_thread(self.answer)


@contextmanager
def saver_process(url: str, namespace: str) -> Iterator[Saver]:
    with commanded([sys.executable, "-m", "tests.qa11c_workers", "saver", url, namespace]) as proc:
        yield Saver(proc)


@contextmanager
def chain_process(
    url: str, namespace: str, thread: str, stop: Path, writes: int, most: int = 5000
) -> Iterator[tuple[subprocess.Popen[str], list[list[str]]]]:
    """A process storing a chain of at most ``most`` checkpoints (each with a task of ``writes``
    writes) on ``thread`` until ``stop`` exists; the list it yields gets the ids it stored at the end."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.qa11c_workers",
            "chain",
            url,
            namespace,
            thread,
            str(stop),
            str(most),
            str(writes),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    out: list[list[str]] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc, out
        stop.touch()
        stdout, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        stop.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _check_history(items: list[CheckpointTuple], what: str) -> None:
    """Every listed checkpoint's parent is listed too, and each task shows all its writes or none."""
    ids = {t.config["configurable"]["checkpoint_id"] for t in items}
    for t in items:
        if t.parent_config is not None:
            assert t.parent_config["configurable"]["checkpoint_id"] in ids, f"{what}: a parent is missing"
        per_task: dict[str, int] = {}
        for task, _, _ in t.pending_writes:
            per_task[task] = per_task.get(task, 0) + 1
        assert all(n == _WRITES for n in per_task.values()), f"{what}: a task shown with {per_task} of {_WRITES} writes"


@pytest.fixture
async def asaver(url: str, namespace: str) -> AsyncIterator[BotWireSaver]:
    s = BotWireSaver(namespace, url=url)
    yield s
    await s.aclose()


@pytest.mark.slow
async def test_copies_of_a_thread_another_process_writes_are_whole_snapshots(
    asaver: BotWireSaver, url: str, namespace: str, tmp_path: Path
) -> None:
    """While another process stores checkpoints and their tasks' writes, each ``copy_thread``
    makes a thread whose history is closed (every parent copied) and whose tasks show all their
    writes or none: a copy taken while a task's writes were being stored kept only part of them
    for good, and LangGraph resuming the copy takes such a task as done."""
    copies: list[str] = []
    assert await asaver.aget_tuple(_cfg("src")) is None  # connected before the writer starts
    with chain_process(url, namespace, "src", tmp_path / "stop", _WRITES, most=12) as (proc, stored):
        for i in range(30):
            if proc.poll() is not None:
                break
            target = f"copy{i}"
            await asaver.acopy_thread("src", target)
            copies.append(target)
    final = stored[0]
    source = [t async for t in asaver.alist(_cfg("src"))]
    assert [t.checkpoint["id"] for t in source] == final[::-1]
    _check_history(source, "source")
    for target in copies:
        items = [t async for t in asaver.alist(_cfg(target))]
        assert items, target
        copied = [t.checkpoint["id"] for t in items]
        assert copied == final[: len(copied)][::-1]  # a prefix of the writer's chain, newest first
        _check_history(items, target)
        latest = await asaver.aget_tuple(_cfg(target))
        assert latest is not None and latest.checkpoint["id"] == copied[0]
        assert latest.pending_writes == items[0].pending_writes


@pytest.mark.slow
async def test_prune_racing_a_writer_in_another_process_never_removes_the_newest(
    asaver: BotWireSaver, url: str, namespace: str, tmp_path: Path
) -> None:
    with chain_process(url, namespace, "t", tmp_path / "stop", 3) as (_, stored):
        seen = ""
        for _ in range(30):
            await asaver.aprune(["t"], strategy="keep_latest")
            latest = await asaver.aget_tuple(_cfg("t"))
            assert latest is not None and latest.checkpoint["id"] >= seen
            seen = latest.checkpoint["id"]
    final = stored[0]
    latest = await asaver.aget_tuple(_cfg("t"))
    assert latest is not None and latest.checkpoint["id"] == final[-1]
    assert len(latest.pending_writes) == 3
    await asaver.aprune(["t"], strategy="keep_latest")
    listed = [t async for t in asaver.alist(_cfg("t"))]
    assert [t.checkpoint["id"] for t in listed] == [final[-1]] and len(listed[0].pending_writes) == 3
    for old in final[:-1][-5:]:
        assert await asaver.aget_tuple(_cfg("t", old)) is None


@pytest.mark.slow
@pytest.mark.parametrize("deleter", ["task", "process"])
async def test_a_delete_racing_a_writer_leaves_nothing_stored_before_it(deleter: str, url: str, namespace: str) -> None:
    """A task of this process writes a chain; another saver (a task of this process, or another
    process) deletes the thread now and then. Once a delete returns, no checkpoint whose put
    returned before it began is listed or read, also by a reader that had the thread's latest
    in its cache."""
    writer, reader, other = (BotWireSaver(namespace, url=url) for _ in range(3))
    returned: list[str] = []
    stop = asyncio.Event()

    async def write() -> None:
        parent: str | None = None
        n = 0
        while not stop.is_set():
            cfg = await writer.aput(_cfg("t", parent), empty_checkpoint(), {"step": n}, {})
            await writer.aput_writes(cfg, [("c", n)], f"task{n}")
            parent = cfg["configurable"]["checkpoint_id"]
            returned.append(parent)
            n += 1

    try:
        with saver_process(url, namespace) as proc:
            task = asyncio.create_task(write())
            for _ in range(8):
                while len(returned) < 3:
                    await asyncio.sleep(0.001)
                assert await reader.aget_tuple(_cfg("t")) is not None  # cached
                gone = set(returned)
                if deleter == "task":
                    await other.adelete_thread("t")
                else:
                    await proc.ado(op="delete", thread="t")
                latest = await reader.aget_tuple(_cfg("t"))
                assert latest is None or latest.checkpoint["id"] not in gone
                listed = {t.checkpoint["id"] async for t in reader.alist(_cfg("t"))}
                assert not listed & gone
                for old in list(gone)[-3:]:
                    assert await reader.aget_tuple(_cfg("t", old)) is None
                returned.clear()
            stop.set()
            await task
    finally:
        for s in (writer, reader, other):
            await s.aclose()


def test_the_cache_never_serves_a_checkpoint_another_process_removed(url: str, namespace: str) -> None:
    """The latest checkpoint of a thread, cached here, removed in another process by
    ``delete_for_runs``, ``prune`` (either strategy) or ``delete_thread``: the very next
    ``get_tuple`` answers what is left."""
    saver = BotWireSaver(namespace, url=url)

    def latest(thread: str = "t", ns: str = "") -> str | None:
        t = saver.get_tuple(_cfg(thread, ns=ns))
        return None if t is None else str(t.checkpoint["id"])

    try:
        with saver_process(url, namespace) as other:
            ids = _ids(6)
            for i, cid in enumerate(ids[:4]):
                other.do(op="put", thread="t", id=cid, n=i, run=f"run{i}", parent=ids[i - 1] if i else None)
            assert latest() == latest() == ids[3]  # read, then cached
            other.do(op="delete_runs", runs=["run3"])
            assert latest() == latest() == ids[2]
            other.do(op="delete_runs", runs=["run1", "run2"])
            assert latest() == latest() == ids[0]
            other.do(op="put", thread="t", id=ids[4], n=4, run="run4")
            assert latest() == latest() == ids[4]
            other.do(op="prune", threads=["t"], strategy="keep_latest")
            assert latest() == ids[4]
            assert saver.get_tuple(_cfg("t", ids[0])) is None
            other.do(op="prune", threads=["t"], strategy="delete")
            assert latest() is None
            other.do(op="put", thread="t", id=ids[5], n=5)
            assert latest() == latest() == ids[5]
            other.do(op="copy", src="t", dst="u")
            assert latest("u") == ids[5]
            other.do(op="delete", thread="t")
            assert latest() is None and latest("u") == ids[5]
    finally:
        saver.close()


@pytest.mark.slow
@pytest.mark.skip(reason="flaky in fresh-ci (one resume saw 'Sent: no'); under investigation, see the closing note")
def test_two_processes_resuming_one_interrupted_thread_leave_a_consistent_history(
    url: str, namespace: str, tmp_path: Path
) -> None:
    """A real LangGraph graph stopped at ``interrupt()``; this process and another one resume
    it at the same moment with different decisions. Both finish; every stored checkpoint's
    parent is stored, ``get_tuple`` answers the highest id, and that state is a finished run of
    one of them."""
    from langgraph.types import Command

    from tests.langgraph_workers import Counting, build

    thread = f"race-{uuid.uuid4().hex[:6]}"
    go = tmp_path / "go"
    drafter, sender = Counting(["Draft: refund order 42 in full."]), Counting(["Sent: yes"])
    graph = build(url, namespace, drafter, sender)
    config: Any = {"configurable": {"thread_id": thread}}
    saver = BotWireSaver(namespace, url=url)
    other = subprocess.Popen(
        [sys.executable, "-m", "tests.qa11c_workers", "resume", url, namespace, thread, "no", str(go)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        graph.invoke({"messages": [("human", "Can I get a refund for order 42?")]}, config)
        assert list(graph.get_state(config).next) == ["review"]
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        go.touch()
        mine = graph.invoke(Command(resume="yes"), config)
        out, _ = other.communicate(timeout=60)
        assert other.returncode == 0
        theirs = json.loads(out.strip().splitlines()[-1])
        assert mine["messages"][-1].content == "Sent: yes" and drafter.calls == sender.calls == 1
        assert theirs["messages"][-1] == ["ai", "Sent: no"] and theirs["calls"] == [0, 1]  # no second draft
        items = list(saver.list(_cfg(thread)))
        ids = [t.checkpoint["id"] for t in items]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
        for t in items:
            if t.parent_config is not None:
                assert t.parent_config["configurable"]["checkpoint_id"] in ids
        latest = saver.get_tuple(_cfg(thread))
        assert latest is not None and latest.checkpoint["id"] == ids[0]
        final = latest.checkpoint["channel_values"]["messages"]
        assert final[-1].content in ("Sent: yes", "Sent: no")
        # both runs are kept: each one's final answer is in some checkpoint
        answers = {
            m.content for t in items for m in t.checkpoint["channel_values"].get("messages", []) if m.type == "ai"
        }
        assert {"Sent: yes", "Sent: no"} <= answers
    finally:
        if other.poll() is None:
            other.kill()
            other.wait(5)
        saver.close()
        graph.checkpointer.close()
        graph.store.close()
