"""QA of the LangGraph checkpointer when two processes resume the same thread at once."""

from __future__ import annotations

import pytest

pytest.importorskip("langgraph")
from langchain_core.runnables import RunnableConfig  # noqa: E402

from botwire_stream.integrations.langgraph import BotWireSaver  # noqa: E402
from tests.test_langgraph import _cfg as _conf  # noqa: E402
from tests.test_langgraph import _checkpoint  # noqa: E402


def _cfg(thread: str, checkpoint_id: str | None = None) -> RunnableConfig:
    return {"configurable": _conf(thread, checkpoint_id)["configurable"]}


async def test_two_resumes_of_one_thread_agree_on_the_latest_checkpoint(url: str, namespace: str) -> None:
    """Two processes resume the same interrupted thread: the one whose checkpoint id is older
    (ids are time-ordered uuid6) may store last. ``get_tuple`` (no id), ``list`` and
    ``prune("keep_latest")`` must agree on which one is the latest, and both stay readable."""
    a, b = BotWireSaver(namespace, url=url), BotWireSaver(namespace, url=url)
    try:
        parent = _checkpoint({"n": 0})
        stored = await a.aput(_cfg("t"), parent, {"source": "input", "step": -1}, {})
        older, newer = _checkpoint({"n": 1}), _checkpoint({"n": 2})
        assert older["id"] < newer["id"]
        await b.aput(stored, newer, {"source": "loop", "step": 0}, {"n": 1})
        await a.aput(stored, older, {"source": "loop", "step": 0}, {"n": 1})  # stored last
        for s in (a, b):
            assert (await s.aget_tuple(_cfg("t", older["id"]))) is not None
            assert (await s.aget_tuple(_cfg("t", newer["id"]))) is not None
        listed = [t.checkpoint["id"] async for t in a.alist(_cfg("t"))]
        assert sorted(listed, reverse=True) == listed and listed[0] == newer["id"]
        latest = await b.aget_tuple(_cfg("t"))
        assert latest is not None and latest.checkpoint["id"] == listed[0]
        await a.aprune(["t"], strategy="keep_latest")
        after = await b.aget_tuple(_cfg("t"))
        assert after is not None and after.checkpoint["id"] == latest.checkpoint["id"]
    finally:
        await a.aclose()
        await b.aclose()
