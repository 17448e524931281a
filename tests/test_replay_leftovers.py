"""Issue 10's leftovers: a compaction published twice is one summary; ..."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from typing import Any

import nats
import pytest

from botwire_stream import AsyncChatHistory, SessionInfo, areplay
from botwire_stream.nats.chatlog import open_chat
from botwire_stream.settings import resolve
from consumers.materialiser import Materialiser

from .test_consumers_events import _caught_up, _Running
from .waits import until

pytestmark = pytest.mark.nats_only


async def test_the_same_compaction_published_twice_is_stored_once(url: str, namespace: str) -> None:
    # A caller retrying compact() after an OutcomeUnknown (or a compaction run repeated over the
    # same range) publishes the same summary again: the server keeps one, the retry gets its sequence.
    async with AsyncChatHistory("c", namespace=namespace, url=url) as chat:
        seqs = await chat.extend([{"role": "user", "content": str(i)} for i in range(5)])
        first = await chat.compact("five messages", upto=seqs[-1])
        again = await chat.compact("five messages (summarised again)", upto=seqs[-1])
        assert again == first
        summaries = [e async for e in areplay(namespace, url=url, keys=None) if e.kind == "summary"]
        assert [(e.seq, e.upto, e.value["content"]) for e in summaries] == [(first, seqs[-1], "five messages")]
        last = await chat.last_summary()
        assert last is not None and (last.seq, last.upto) == (first, seqs[-1])
        assert await chat.messages(window=1) == [
            {"role": "system", "content": "five messages"},
        ]
        # a later range is a new summary
        more = await chat.append({"role": "user", "content": "5"})
        later = await chat.compact("six", upto=more)
        assert later > first
        assert await chat.messages(window=5) == [{"role": "system", "content": "six"}]


async def test_an_age_limit_set_by_another_process_is_seen_without_reconnecting(url: str, namespace: str) -> None:
    # This process reads last=N (it then remembers the conversation's newest messages); another
    # process sets log_age; once the messages have aged out, last=N must not answer from memory.
    async with AsyncChatHistory("c", namespace=namespace, url=url) as chat:
        await chat.extend([{"n": 0}, {"n": 1}])
        assert await chat.messages(last=2) == [{"n": 0}, {"n": 1}]
        code = (
            "import sys; from botwire_stream import retention\n"
            "print(retention(sys.argv[1], log_age=1, url=sys.argv[2]).log_age)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, namespace, url], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "1.0", out.stderr

        async def aged_out() -> bool:
            # through replay (a consumer): a read of the conversation would replace what it remembers
            return [e async for e in areplay(namespace, url=url, keys=None) if e.kind == "append"] == []

        await until(aged_out, "the messages age out", bound=30)
        assert await chat.messages(last=2) == []
        assert await chat.messages(last=1) == []


def _brief(listed: list[SessionInfo]) -> list[tuple[str, int, datetime]]:
    return [(s.session_id, s.message_count, s.last_activity) for s in listed]


async def test_sessions_list_from_current_summaries_and_equal_the_log_listing(url: str, namespace: str) -> None:
    # With the materialiser current, sessions() pages from its summaries (the server is not asked
    # for every matching conversation); running, lagging, stopped after a clear: always what the
    # log's own listing says.
    stream = f"BOTWIRE_CHAT_{namespace}"
    ids = [f"a:{i}" for i in range(12)] + [f"b:{i}" for i in range(6)]
    chats = {i: AsyncChatHistory(i, namespace=namespace, url=url) for i in ids}
    backend = await open_chat(resolve(url), namespace, replicas=None, timeout=5.0)
    spy = await nats.connect(url)
    requests: list[tuple[str, dict[str, Any]]] = []

    async def seen(msg: Any) -> None:
        requests.append((msg.subject, json.loads(msg.data) if msg.data else {}))

    await spy.subscribe("$JS.API.>", cb=seen)

    async def compare(via_summaries: bool | None) -> None:
        first = await AsyncChatHistory.sessions(namespace, url=url, limit=5)
        for kw in (
            {"limit": 5},
            {"limit": 5, "offset": 4},
            {"pattern": "b:*", "limit": 3},
            {"limit": 4, "before": first[-1]},
            {"limit": 100},
        ):
            await spy.flush()
            requests.clear()
            listed = await AsyncChatHistory.sessions(namespace, url=url, **kw)  # type: ignore[arg-type]
            await spy.flush()
            asked = list(requests)  # what the listing asked, before the log's listing below asks more
            before = kw.get("before")
            cursor = None if before is None else (before.last_activity, before.session_id)  # type: ignore[union-attr]
            log = await backend._sessions_from_log(
                str(kw.get("pattern", "*")), limit=int(kw["limit"]), offset=int(kw.get("offset", 0)), before=cursor  # type: ignore[call-overload]
            )
            assert _brief(listed) == _brief(log), kw
            wide = [b for s, b in asked if s == f"$JS.API.STREAM.INFO.{stream}" and any(c in b.get("subjects_filter", "") for c in "*>")]
            windowed = [b for s, b in asked if s.startswith(f"$JS.API.DIRECT.GET.BOTWIRE_MAT_{namespace}") and "start_time" in b]
            if via_summaries is True:
                assert wide == [] and windowed, kw  # the summaries, not every matching conversation
                assert all(s.title is not None for s in listed)
            elif via_summaries is False:
                assert wide, kw  # the log's listing

    running = _Running(url, Materialiser(namespace))
    try:
        for n in range(2):
            for i in ids if n == 0 else reversed(ids):
                await chats[i].append({"role": "user", "content": f"{i} #{n}"})
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 30)
        await compare(via_summaries=True)
        await running.stop()
        await chats["a:3"].append({"role": "user", "content": "while it is stopped"})  # lagging
        await compare(via_summaries=False)
        running = _Running(url, Materialiser(namespace))
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 30)
        await compare(via_summaries=True)
        await running.stop()
        await chats["b:1"].clear()  # recorded, then done: the stopped materialiser never sees the purge
        await chats["a:7"].clear()
        await compare(via_summaries=None)
        assert "b:1" not in [s.session_id for s in await AsyncChatHistory.sessions(namespace, url=url, limit=100)]
    finally:
        if not running.task.done():
            await running.stop()
        await spy.close()
        await backend.close()
        for c in chats.values():
            await c.close()
