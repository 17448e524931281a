"""QA of the LangGraph checkpointer when two processes resume the same thread at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

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


# The other process: reads every item with refresh_on_read, 40 at once, until the stop file exists.
_READER = r"""
import asyncio, os, sys
from botwire_stream.integrations.langgraph import BotWireStore

async def main():
    url, namespace, stop = sys.argv[1:4]
    async with BotWireStore(namespace, url=url, ttl={"refresh_on_read": True}) as store:
        for n in range(100_000):
            if os.path.exists(stop):
                break
            await asyncio.gather(*(store.aget(("race",), f"k{i}") for i in range(40)))
            if n == 1:
                print("ready", flush=True)  # reading (and refreshing) at full speed

asyncio.run(main())
"""


@pytest.mark.slow
async def test_a_read_refreshing_a_ttl_never_puts_it_back_on_an_item_put_without_one(
    url: str, namespace: str, tmp_path: Path
) -> None:
    """Another process reads the items (``refresh_on_read``) while this one puts them with a TTL,
    then with ``ttl=None``: a refresh in flight across the second put wrote the item again with
    the old TTL, so an item put to live for ever expired. The stored messages must end with no
    TTL at all."""
    import subprocess
    import sys

    import nats

    from botwire_stream import keys
    from botwire_stream.integrations.langgraph import BotWireStore
    from tests.procs import ROOT

    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, url, namespace, str(stop)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    nc = await nats.connect(url)
    try:
        async with BotWireStore(namespace, url=url) as store:
            for i in range(40):
                await store.aput(("race",), f"k{i}", {"v": -1}, ttl=5)
            assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
            js = nc.jetstream()
            for rnd in range(20):
                await asyncio.gather(*(store.aput(("race",), f"k{i}", {"v": rnd}, ttl=5) for i in range(40)))
                await asyncio.gather(*(store.aput(("race",), f"k{i}", {"v": rnd}, ttl=None) for i in range(40)))
            stop.touch()
            assert reader.wait(30) == 0
            stale = []
            for i in range(40):
                subject = f"$KV.botwire_{namespace}." + keys.encode_key(f"race:k{i}")
                msg = await js.get_msg(f"KV_botwire_{namespace}", subject=subject, direct=True)
                if "Nats-TTL" in (msg.headers or {}):
                    stale.append(i)
            assert stale == [], f"items put with ttl=None carry a TTL again: {stale}"
            for i in range(40):
                item = await store.aget(("race",), f"k{i}", refresh_ttl=False)
                assert item is not None and item.value == {"v": 19}
    finally:
        stop.touch()
        if reader.poll() is None:
            reader.kill()
            reader.wait(5)
        await nc.close()
