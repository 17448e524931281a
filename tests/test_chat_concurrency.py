"""Conversation logs shared by several OS processes, live watches, and a server killed with -9.

Writers run in child processes (``tests.chat_workers``) released at the same moment; every wait
is bounded.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from botwire_stream import AsyncChatHistory, ChatHistory, Entry
from botwire_stream.errors import ServerUnavailable
from tests import chat_workers, procs
from tests.servers import NatsServer

PROCESSES = 8


def _check_writer_order(messages: list[dict[str, Any]], per_writer: int) -> dict[str, list[int]]:
    """Every writer's messages, in log order: exactly 0..per_writer-1, increasing."""
    by_writer: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        by_writer[m["writer"]].append(m["i"])
    for writer, seen in by_writer.items():
        assert seen == list(range(per_writer)), f"writer {writer}: {seen[:20]}..."
    return by_writer


def test_eight_processes_appending_to_one_conversation(url: str, namespace: str, tmp_path: Path) -> None:
    """8 processes x 500 appends (5 concurrent writers of 100 each): none lost, none doubled, order kept."""
    go = tmp_path / "go"
    commands = [["append", url, namespace, "shared", f"p{k}", "500", "5", str(go)] for k in range(PROCESSES)]
    results = chat_workers.run_together(commands, go)
    acked = {(w, i): seq for rows in results for w, i, seq in rows}
    assert len(acked) == PROCESSES * 500
    assert len(set(acked.values())) == PROCESSES * 500

    with ChatHistory("shared", namespace=namespace, url=url) as chat:
        entries = chat.entries()
        assert len(entries) == PROCESSES * 500
        assert len(chat) == PROCESSES * 500
        assert chat.messages() == [e.message for e in entries]
    assert {(e.message["writer"], e.message["i"]): e.seq for e in entries} == acked
    by_writer = _check_writer_order([e.message for e in entries], 100)
    assert len(by_writer) == PROCESSES * 5


def test_eight_processes_extending_one_conversation(url: str, namespace: str, tmp_path: Path) -> None:
    """8 processes x 10 batches of 50 (2 concurrent writers each): every batch whole and contiguous."""
    go = tmp_path / "go"
    commands = [["extend", url, namespace, "shared", f"p{k}", "10", "50", "2", str(go)] for k in range(PROCESSES)]
    results = chat_workers.run_together(commands, go)
    batches = [(w, seqs) for rows in results for w, seqs in rows]
    assert len(batches) == PROCESSES * 10
    for _w, seqs in batches:
        assert seqs == list(range(seqs[0], seqs[0] + 50))

    with ChatHistory("shared", namespace=namespace, url=url) as chat:
        entries = chat.entries()
    assert len(entries) == PROCESSES * 500
    assert len({e.seq for e in entries}) == len(entries)
    at = {e.seq: e.message for e in entries}
    for w, seqs in batches:  # each batch is stored exactly where its sequences say, in order
        first = at[seqs[0]]["i"]
        assert first % 50 == 0
        assert [at[s] for s in seqs] == [{"writer": w, "i": first + j} for j in range(50)]
    _check_writer_order([e.message for e in entries], 250)


async def _next(watch: Any, n: int, timeout: float = 20.0) -> list[Entry]:
    async def pull() -> list[Entry]:
        return [await watch.__anext__() for _ in range(n)]

    return await asyncio.wait_for(pull(), timeout)


async def test_watch_delivers_live_entries_written_by_another_process(url: str, namespace: str) -> None:
    async with (
        AsyncChatHistory("watched", namespace=namespace, url=url) as chat,
        AsyncChatHistory("other", namespace=namespace, url=url) as other,
    ):
        await chat.append({"old": True})  # written before the watch: not delivered
        async with chat.watch() as watch:
            await other.append({"not": "this conversation"})
            sent = [{"role": "user", "content": f"from child {i}", "i": i} for i in range(5)]
            seqs = await asyncio.to_thread(chat_workers.run, "write", url, namespace, "watched", json.dumps(sent))
            got = await _next(watch, 5)
            assert [(e.seq, e.message) for e in got] == list(zip(seqs, sent, strict=True))
            mine = await chat.append({"own": True})  # and the watcher's own writes too
            (entry,) = await _next(watch, 1)
            assert (entry.seq, entry.message) == (mine, {"own": True})


async def test_watch_after_a_sequence_replays_then_follows(url: str, namespace: str) -> None:
    async with AsyncChatHistory("watched", namespace=namespace, url=url) as chat:
        seqs = await chat.extend([{"i": i} for i in range(6)])
        watch = chat.watch(after=seqs[2])
        try:
            replayed = await _next(watch, 3)
            assert [(e.seq, e.message) for e in replayed] == [(seqs[i], {"i": i}) for i in (3, 4, 5)]
            sent = [{"i": 6}, {"i": 7}]
            live = await asyncio.to_thread(chat_workers.run, "write", url, namespace, "watched", json.dumps(sent))
            got = await _next(watch, 2)
            assert [(e.seq, e.message) for e in got] == list(zip(live, sent, strict=True))
        finally:
            await watch.aclose()
        watch0 = chat.watch(after=0)  # after=0: the whole conversation, then live
        try:
            assert [e.message for e in await _next(watch0, 8)] == [{"i": i} for i in range(8)]
        finally:
            await watch0.aclose()


def test_sync_watch_replays_and_follows_another_process(url: str, namespace: str) -> None:
    with ChatHistory("watched", namespace=namespace, url=url) as chat:
        first = chat.append({"i": 0})
        chat.append({"i": 1})
        with chat.watch(after=first) as watch, chat.watch() as live_only:
            assert [e.message for e in chat_workers.take(watch, 1)] == [{"i": 1}]
            sent = [{"i": 2}, {"i": 3}, {"i": 4}]
            seqs = chat_workers.run("write", url, namespace, "watched", json.dumps(sent))
            got = chat_workers.take(watch, 3)
            assert [(e.seq, e.message) for e in got] == list(zip(seqs, sent, strict=True))
            assert [e.message for e in chat_workers.take(live_only, 3)] == sent
            assert all(isinstance(e, Entry) for e in got)


async def test_acknowledged_appends_survive_kill_9_of_the_server(own_server: NatsServer, namespace: str) -> None:
    """Everything acknowledged before and while the server is killed with -9 is there after a
    restart on the same port and store; an append retried across the restart is stored once."""
    url = own_server.url
    async with AsyncChatHistory("durable", namespace=namespace, url=url) as chat:
        acked: list[tuple[int, int]] = [(i, await chat.append({"i": i})) for i in range(100)]
        seqs = await chat.extend([{"i": 100 + j} for j in range(100)])
        acked += [(100 + j, s) for j, s in enumerate(seqs)]
        failed: list[int] = []
        stop = asyncio.Event()

        async def writer() -> None:
            for i in range(200, 5000):  # bounded; stopped long before
                if stop.is_set():
                    return
                try:
                    acked.append((i, await chat.append({"i": i})))
                except ServerUnavailable:
                    failed.append(i)  # outcome unknown: stored at most once

        async def until(cond: Any, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not cond():
                assert time.monotonic() < deadline, f"timed out: {len(acked)} acked, {len(failed)} failed"
                await asyncio.sleep(0.01)

        task = asyncio.create_task(writer())
        try:
            await until(lambda: len(acked) >= 300, 20)
            await asyncio.to_thread(own_server.kill)
            at_kill = len(acked)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(own_server.start)
            await until(lambda: len(acked) >= at_kill + 100, 30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    async with AsyncChatHistory("durable", namespace=namespace, url=url) as reader:
        entries = await reader.entries()
        assert await reader.count() == len(entries)
    stored = [(e.message["i"], e.seq) for e in entries]
    numbers = [i for i, _ in stored]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)  # in order, no duplicates
    assert set(acked) <= set(stored)  # every acknowledged append, at its sequence
    assert set(numbers) - {i for i, _ in acked} <= set(failed)


@pytest.mark.slow
@pytest.mark.parametrize(("conversations", "limit"), [(300, 40), (1200, 100)], ids=["multi-last", "consumer"])
def test_sessions_cursor_pages_are_stable_while_another_process_writes(
    url: str, namespace: str, tmp_path: Path, conversations: int, limit: int
) -> None:
    """Paging with ``before=page[-1]`` while a child process appends to random old conversations:
    no conversation is listed twice, and none that the writer did not touch is missed. (Offset
    paging repeated and skipped conversations that moved to the top while it paged.) 1200
    conversations take the headers-only consumer path, 300 the multi-last get."""
    ids = [f"c:{i:04d}" for i in range(conversations)]

    async def create() -> None:
        chats = [AsyncChatHistory(sid, namespace=namespace, url=url) for sid in ids]
        await asyncio.gather(*(c.append({"created": True}) for c in chats))
        await asyncio.gather(*(c.close() for c in chats))

    asyncio.run(create())
    started, stop = tmp_path / "started", tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.chat_workers", "touch", url, namespace, str(conversations)]
        + [str(started), str(stop)],
        cwd=procs.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.01)
        pages = []
        page = ChatHistory.sessions(namespace, "c:*", limit=limit, url=url)
        while page:
            assert len(pages) <= conversations // limit + 1, "paging did not end"
            pages.append(page)
            time.sleep(0.05)  # the writer moves conversations between the pages too
            page = ChatHistory.sessions(namespace, "c:*", limit=limit, before=page[-1], url=url)
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err[-2000:]
    touched = set(json.loads(out.strip().splitlines()[-1]))
    listed = [s for p in pages for s in p]
    names = [s.session_id for s in listed]
    assert len(names) == len(set(names)), "a conversation was listed twice"
    missed = set(ids) - touched - set(names)
    assert not missed, f"{len(missed)} conversations nobody wrote were missed"
    keys = [(s.last_activity, s.session_id) for s in listed]
    assert keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)
    assert len(touched) >= 10, f"the writer touched only {len(touched)} conversations"
