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


def _decided(messages: list[list[str]]) -> str:
    """The decision of a finished run of the approval graph, after checking that ``messages`` is
    one: the question, one draft, one decision and the answer sending that decision."""
    assert len(messages) == 4, messages
    (q, _), (d, draft), (h, decision), (a, answer) = messages
    assert (q, d, h, a) == ("human", "ai", "human", "ai") and draft == "Draft: refund order 42 in full.", messages
    assert decision in ("decision: yes", "decision: no") and answer == "Sent: " + decision[10:], messages
    return decision[10:]


@pytest.mark.slow
@pytest.mark.parametrize("order", ["together", "after"])
def test_two_processes_resuming_one_interrupted_thread_leave_a_consistent_history(
    order: str, url: str, namespace: str, tmp_path: Path
) -> None:
    """A real LangGraph graph stopped at ``interrupt()``; this process resumes it with "yes" and
    another one with "no", at the same moment (``together``) or once the other has finished
    (``after``). Whichever way the race goes, both calls return a finished run of one decision,
    stored; nothing runs twice in a process; the history is closed and ``get_tuple`` answers its
    highest id, a finished run.

    Which outcomes are right is LangGraph's own business, and its SqliteSaver shows the same ones
    in the same race (30 races with each saver under 3 CPU burners): a resume loads the thread's
    latest checkpoint once, at its start, and goes on from there. Loaded before the other
    process stored its decision, it runs its own ("yes"/"no" each sent). Loaded after the other's
    decision (or its answer) was stored, it finishes that run, or returns it as it is: it returns
    the other's decision. Only both returning the other's is impossible. The first version of this
    test expected the first case only, and failed once in CI on a loaded machine when the other
    process finished before this one had read the thread."""
    from langgraph.types import Command

    from tests.langgraph_workers import Counting, Sending, build

    thread = f"race-{uuid.uuid4().hex[:6]}"
    go = tmp_path / "go"
    drafter, sender = Counting(["Draft: refund order 42 in full."]), Sending()
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
        assert list(graph.get_state(config).next) == ["review"] and drafter.calls == 1
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        go.touch()
        if order == "after":
            out, _ = other.communicate(timeout=60)
        mine_out = graph.invoke(Command(resume="yes"), config)
        if order == "together":
            out, _ = other.communicate(timeout=60)
        assert other.returncode == 0
        theirs_out = json.loads(out.strip().splitlines()[-1])
        mine_msgs = [[m.type, m.content] for m in mine_out["messages"]]
        mine, theirs = _decided(mine_msgs), _decided(theirs_out["messages"])
        assert (mine, theirs) != ("no", "yes"), "each process returned the other's decision"
        if order == "after":
            assert (mine, theirs) == ("no", "no") and sender.calls == 0  # the finished run, not run again
        # no draft again anywhere; a process sends at most once, and its own decision itself
        assert drafter.calls == 1 and theirs_out["calls"][0] == 0
        assert sender.calls <= 1 and theirs_out["calls"][1] <= 1
        assert sender.calls == 1 or mine == "no"
        assert theirs_out["calls"][1] == 1 or theirs == "yes"
        items = list(saver.list(_cfg(thread)))
        ids = [t.checkpoint["id"] for t in items]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
        stored = []
        for t in items:
            if t.parent_config is not None:
                assert t.parent_config["configurable"]["checkpoint_id"] in ids
            msgs = t.checkpoint["channel_values"].get("messages", [])
            assert len({m.id for m in msgs}) == len(msgs)  # no message stored twice
            stored.append([[m.type, m.content] for m in msgs])
            if len(msgs) == 4:
                _decided(stored[-1])  # no checkpoint mixes the two runs
        latest = saver.get_tuple(_cfg(thread))
        assert latest is not None and latest.checkpoint["id"] == ids[0]
        state = graph.get_state(config)
        assert state.next == () and state.config["configurable"]["checkpoint_id"] == ids[0]
        final = [[m.type, m.content] for m in state.values["messages"]]
        assert final in (mine_msgs, theirs_out["messages"])
        # what each call returned is stored (an answer a user saw is never lost)
        assert mine_msgs in stored and theirs_out["messages"] in stored
    finally:
        if other.poll() is None:
            other.kill()
            other.wait(5)
        saver.close()
        graph.checkpointer.close()
        graph.store.close()
