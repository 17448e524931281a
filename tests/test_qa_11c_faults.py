"""QA of BotWireSaver's pending writes when nats-server is SIGKILLed in the middle of a task's save.

LangGraph takes a task that has any of its writes stored as finished when a graph resumes (its
``_reapply_writes_to_succeeded_nodes``): half a task's writes shown by ``get_tuple`` would lose
the other half for good. A call cut short must therefore show none of them until a retry has
stored them all, once each.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import pytest

pytest.importorskip("langgraph")
from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402

from botwire_stream.errors import BotWireError  # noqa: E402
from botwire_stream.integrations.langgraph import BotWireSaver  # noqa: E402
from tests.servers import NatsServer  # noqa: E402

_WRITES = 400  # 7 rounds of 64 publishes: the server dies during the second round


def _cfg(thread: str, checkpoint_id: str | None = None) -> Any:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ""}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


async def _stored_writes(url: str, namespace: str) -> int:
    """How many pending-write records the namespace's stream holds (the server's own count)."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(
            f"BOTWIRE_LG_{namespace}", subjects_filter=f"botwire.{namespace}.lg.*.*.w.>"
        )
        return len(info.state.subjects or {})
    finally:
        await nc.close()


@pytest.mark.slow
async def test_a_task_cut_short_by_a_killed_server_is_never_shown_half_done(
    own_server: NatsServer, namespace: str
) -> None:
    url = own_server.url
    saver = BotWireSaver(namespace, url=url, timeout=1.0)
    watcher = await nats.connect(url, allow_reconnect=False)
    try:
        stored = await saver.aput(_cfg("t"), empty_checkpoint(), {"step": 0}, {})
        seen = 0

        async def on_record(msg: Any) -> None:
            nonlocal seen
            seen += 1
            if seen == 100:  # mid-call: the first 64 acknowledged, the rest of the task not sent
                own_server.kill()

        await watcher.subscribe(f"botwire.{namespace}.lg.*.*.w.>", cb=on_record)
        await watcher.flush()
        writes = [(f"ch{i}", i) for i in range(_WRITES)]
        started = time.monotonic()
        with pytest.raises(BotWireError):
            await saver.aput_writes(stored, writes, "task-1")
        assert time.monotonic() - started < 3 * 1.0 + 10  # does not hang
        assert seen >= 100

        own_server.start()  # same port and store
        partial = await _stored_writes(url, namespace)
        assert 0 < partial < _WRITES  # the cut really left part of the task stored

        fresh = BotWireSaver(namespace, url=url, timeout=2.0)
        try:
            shown = await fresh.aget_tuple(_cfg("t"))
            assert shown is not None and shown.pending_writes == [], (
                f"{len(shown.pending_writes) if shown else 0} of the task's {_WRITES} writes are shown"
            )
            listed = [t async for t in fresh.alist(_cfg("t"))]
            assert [t.pending_writes for t in listed] == [[]]

            # The retry (LangGraph runs the task again) stores every write exactly once.
            await fresh.aput_writes(stored, writes, "task-1")
            assert await _stored_writes(url, namespace) == _WRITES
            done = await fresh.aget_tuple(_cfg("t"))
            assert done is not None
            assert [(t, c, v) for t, c, v in done.pending_writes] == [("task-1", c, v) for c, v in writes]
            # ... and the process that saw the cut answers the same after its reconnect.
            await asyncio.sleep(0)
            again = await saver.aget_tuple(_cfg("t"))
            assert again is not None and len(again.pending_writes) == _WRITES
        finally:
            await fresh.aclose()
    finally:
        await watcher.close()
        await saver.aclose()


async def test_writes_stored_before_records_carried_their_count_still_show(url: str, namespace: str) -> None:
    """A pending-write record of an earlier version (four fields, no count) reads as before."""
    import msgspec

    from botwire_stream.keys import _encode_segment

    saver = BotWireSaver(namespace, url=url)
    nc = await nats.connect(url)
    try:
        stored = await saver.aput(_cfg("t"), empty_checkpoint(), {"step": 0}, {})
        cid = stored["configurable"]["checkpoint_id"]
        vtype, vdata = saver.serde.dumps_typed("old")
        subject = f"botwire.{namespace}.lg.t.{_encode_segment('')}.w.{_encode_segment(cid)}.old-task.0"
        await nc.jetstream().publish(subject, msgspec.msgpack.encode(["c", vtype, vdata, ""]))
        await saver.aput_writes(stored, [("d", "new"), ("e", "new")], "new-task")
        got = await saver.aget_tuple(_cfg("t"))
        assert got is not None
        assert sorted(got.pending_writes) == [
            ("new-task", "d", "new"),
            ("new-task", "e", "new"),
            ("old-task", "c", "old"),
        ]
    finally:
        await nc.close()
        await saver.aclose()


@pytest.mark.slow
async def test_a_copy_cut_short_by_a_killed_server_leaves_an_earlier_state_and_a_retry_completes_it(
    own_server: NatsServer, namespace: str
) -> None:
    """nats-server SIGKILLed in the middle of ``copy_thread``: the call raises; the target is the
    source as it was at an earlier checkpoint (every parent there, each task with all its writes
    or none, never part of a task that LangGraph would take as done); repeating the copy makes
    it the source's equal."""
    url = own_server.url
    saver = BotWireSaver(namespace, url=url, timeout=1.0)
    watcher = await nats.connect(url, allow_reconnect=False)
    writes = 20
    try:
        parent: Any = _cfg("src")
        for n in range(60):  # 1,260 records: copied in pages of 1,000 (the first one cut 13 records into a task)
            parent = await saver.aput(parent, empty_checkpoint(), {"step": n}, {})
            await saver.aput_writes(parent, [(f"c{i}", n) for i in range(writes)], f"task{n}")
        seen = 0

        async def on_record(msg: Any) -> None:
            nonlocal seen
            seen += 1
            if seen == 300:  # while the first page is stored
                own_server.kill()

        await watcher.subscribe(f"botwire.{namespace}.lg.dst.>", cb=on_record)
        await watcher.flush()
        with pytest.raises(BotWireError):
            await saver.acopy_thread("src", "dst")
        own_server.start()

        fresh = BotWireSaver(namespace, url=url, timeout=2.0)
        try:
            source = [t async for t in fresh.alist(_cfg("src"))]
            target = [t async for t in fresh.alist(_cfg("dst"))]
            assert 0 < len(target) < len(source)
            ids = [t.checkpoint["id"] for t in target]
            assert ids == [t.checkpoint["id"] for t in source][-len(target) :]  # the oldest ones
            for t in target:
                if t.parent_config is not None:
                    assert t.parent_config["configurable"]["checkpoint_id"] in ids
                assert len(t.pending_writes) in (0, writes), f"a task shown with {len(t.pending_writes)} of {writes}"
            await fresh.acopy_thread("src", "dst")
            again = [t async for t in fresh.alist(_cfg("dst"))]
            assert [(t.checkpoint["id"], t.pending_writes) for t in again] == [
                (t.checkpoint["id"], t.pending_writes) for t in source
            ]
        finally:
            await fresh.aclose()
    finally:
        await watcher.close()
        await saver.aclose()


async def test_a_task_interrupted_then_finished_in_part_shows_only_its_interrupt(url: str, namespace: str) -> None:
    """A task stopped at ``interrupt()`` (its INTERRUPT write stored), resumed, and its finishing
    writes stored but one, as a server dying mid-save leaves them (the missing one removed on the
    server): the records of the other call must not make up the count, so only the interrupt
    shows and LangGraph runs the task again; the retry stores the missing write, once."""
    from langgraph.checkpoint.base import WRITES_IDX_MAP

    from botwire_stream.keys import _encode_segment

    interrupt = next(c for c, i in WRITES_IDX_MAP.items() if i == -3)
    saver = BotWireSaver(namespace, url=url)
    nc = await nats.connect(url)
    try:
        stored = await saver.aput(_cfg("t"), empty_checkpoint(), {"step": 0}, {})
        cid = stored["configurable"]["checkpoint_id"]
        await saver.aput_writes(stored, [(interrupt, "approve?")], "task")
        await saver.aput_writes(stored, [("a", 1), ("b", 2)], "task")
        subject = f"botwire.{namespace}.lg.t.{_encode_segment('')}.w.{_encode_segment(cid)}.task.1"
        await nc.jetstream().purge_stream(f"BOTWIRE_LG_{namespace}", subject=subject)
        for reader in (saver, BotWireSaver(namespace, url=url)):
            got = await reader.aget_tuple(_cfg("t"))
            assert got is not None and got.pending_writes == [("task", interrupt, "approve?")]
            if reader is not saver:
                await reader.aclose()
        await saver.aput_writes(stored, [("a", 1), ("b", 2)], "task")
        got = await saver.aget_tuple(_cfg("t"))
        assert got is not None
        assert sorted(got.pending_writes) == sorted(
            [("task", interrupt, "approve?"), ("task", "a", 1), ("task", "b", 2)]
        )
    finally:
        await nc.close()
        await saver.aclose()
