"""QA of the per-thread pending state that keeps BotWireSaver's latest-checkpoint cache exact
(``_Pending`` in nats/checkpoints.py): special writes that replace rather than append, a
checkpoint put again under its id with another value, and more threads changed than it keeps."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import pytest

pytest.importorskip("langgraph")
from langgraph.checkpoint.base import WRITES_IDX_MAP  # noqa: E402

from botwire_stream.integrations.langgraph import BotWireSaver  # noqa: E402
from botwire_stream.nats import checkpoints  # noqa: E402
from tests.test_qa_11c_races import _cfg, _ids, saver_process  # noqa: E402


def _view(saver: BotWireSaver, thread: str) -> tuple[str, Any, list[tuple[str, str, Any]]] | None:
    t = saver.get_tuple(_cfg(thread))
    if t is None:
        return None
    return t.checkpoint["id"], t.checkpoint["channel_values"]["n"], sorted(t.pending_writes)


def test_special_writes_replace_and_regular_ones_keep_the_first_in_the_very_next_read(url: str, namespace: str) -> None:
    """Another process stores LangGraph's special writes (error, interrupt, scheduled, resume:
    a negative index, each replacing the one stored) and regular ones (the first kept) for the
    checkpoint this process has cached: every next ``get_tuple`` answers exactly what is stored,
    and the answer after it (from the cache) the same."""
    specials = sorted(WRITES_IDX_MAP)
    saver = BotWireSaver(namespace, url=url)
    try:
        with saver_process(url, namespace) as other:
            (cid,) = _ids(1)
            other.do(op="put", thread="t", id=cid, n=0)
            assert _view(saver, "t") == _view(saver, "t") == (cid, 0, [])
            stored: dict[tuple[str, str], Any] = {}
            for rnd in range(6):
                for channel in specials:
                    value = f"{channel}-{rnd}"
                    other.do(op="writes", thread="t", id=cid, task="A", writes=[[channel, value]])
                    stored[("A", channel)] = value
                    want = (cid, 0, sorted((t, c, v) for (t, c), v in stored.items()))
                    assert _view(saver, "t") == want
                    assert _view(saver, "t") == want  # cached
                other.do(op="writes", thread="t", id=cid, task="B", writes=[["c", rnd]])
                stored.setdefault(("B", "c"), rnd)  # the first regular write is kept
                want = (cid, 0, sorted((t, c, v) for (t, c), v in stored.items()))
                assert _view(saver, "t") == _view(saver, "t") == want
            # a task's regular and special writes of one call: all shown
            other.do(op="writes", thread="t", id=cid, task="C", writes=[["x", 1], [specials[0], "s"], ["y", 2]])
            view = _view(saver, "t")
            assert view is not None and [w for w in view[2] if w[0] == "C"] == sorted(
                [("C", "x", 1), ("C", "y", 2), ("C", specials[0], "s")]
            )
    finally:
        saver.close()


def test_a_checkpoint_put_again_under_its_id_is_read_with_its_new_value(url: str, namespace: str) -> None:
    saver = BotWireSaver(namespace, url=url)
    try:
        with saver_process(url, namespace) as other:
            older, cid = _ids(2)
            other.do(op="put", thread="t", id=cid, n=0)
            other.do(op="writes", thread="t", id=cid, task="A", writes=[["c", "kept"]])
            for n in range(1, 25):
                other.do(op="put", thread="t", id=cid, n=n)
                assert _view(saver, "t") == _view(saver, "t") == (cid, n, [("A", "c", "kept")])
                if n % 5 == 0:  # an older id stored last changes nothing
                    other.do(op="put", thread="t", id=older, n=-n)
                    assert _view(saver, "t") == (cid, n, [("A", "c", "kept")])
            other.do(op="put", thread="t", id=cid, n=0)  # back to an earlier value
            assert _view(saver, "t") == _view(saver, "t") == (cid, 0, [("A", "c", "kept")])
    finally:
        saver.close()


@pytest.mark.slow
async def test_more_threads_changed_than_the_pending_bound_while_reads_race_stay_exact(
    url: str, namespace: str
) -> None:
    """Another process creates more threads than the watch keeps pending state for, then changes
    the last 512 of them again, while this process reads them at random (caching some, an
    absent thread too): once it returns, every thread reads its newest value, and the cache and
    pending state stay within their bounds."""
    count = checkpoints._PENDING_KEPT + 200
    saver = BotWireSaver(namespace, url=url)
    prefix = f"b{uuid.uuid4().hex[:4]}-"
    stop = asyncio.Event()
    reads = 0

    async def read() -> None:
        nonlocal reads
        rng = random.Random(7)
        while not stop.is_set():
            await asyncio.gather(*(saver.aget_tuple(_cfg(f"{prefix}{rng.randrange(count)}")) for _ in range(16)))
            reads += 16

    try:
        backend: Any = await saver._cores.get().backend()
        with saver_process(url, namespace) as other:
            first = _fast_ids(count)
            again = first[: count - 512] + _fast_ids(512)
            for n, ids in ((1, first), (2, again)):
                reader = asyncio.create_task(read())
                try:
                    await other.ado(op="bulk", prefix=prefix, ids=ids, n=n, start=0 if n == 1 else count - 512)
                finally:
                    stop.set()
                    await reader
                    stop.clear()
                checked = range(count - checkpoints._CACHED if n == 1 else 0, count)  # the cache's worth, then all
                got: list[Any] = []
                for i in range(checked.start, count, 64):
                    got += await asyncio.gather(
                        *(saver.aget_tuple(_cfg(f"{prefix}{j}")) for j in range(i, min(i + 64, count)))
                    )
                want = [(ids[i], 1 if n == 1 or i < count - 512 else 2) for i in checked]
                wrong = [
                    i
                    for i, t, w in zip(checked, got, want, strict=True)
                    if t is None or (t.checkpoint["id"], t.checkpoint["channel_values"]["n"]) != w
                ]
                assert wrong == [], f"{len(wrong)} threads read stale, e.g. {wrong[:5]}"
                assert len(backend._unconfirmed) <= checkpoints._PENDING_KEPT
                assert backend._watch is not None and len(backend._watch.entries) <= checkpoints._CACHED
                assert len(checkpoints._latest_ids) <= checkpoints._LATEST_KEPT
            assert reads > 0
    finally:
        await saver.aclose()


def _fast_ids(n: int) -> list[str]:
    """``n`` distinct checkpoint ids, increasing (a time-ordered prefix and a counter)."""
    base = _ids(1)[0]
    return [f"{base}-{i:06d}" for i in range(n)]
