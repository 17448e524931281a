"""``ChatHistory.sessions`` from the server's subject index agrees with reading every conversation.

The reference reads each conversation the test wrote (``entries()``): a conversation is listed
when it holds messages, with their count and the time of the last one. Interleaved writes, clears,
more matches than one multi-last get answers (1024), TTL expiry and pages are covered.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botwire_stream import AsyncChatHistory
from botwire_stream.models import SessionInfo
from tests.servers import NatsServer


async def _expected(url: str, namespace: str, ids: set[str], pattern: str) -> list[tuple[datetime, str, int]]:
    """(last activity, id, count) of each matching conversation that holds messages, newest first."""
    out = []
    for sid in ids:
        if not fnmatchcase(sid, pattern):
            continue
        async with AsyncChatHistory(sid, namespace=namespace, url=url) as chat:
            entries = await chat.entries()
        if entries:
            out.append((entries[-1].time, sid, len(entries)))
    return sorted(out, reverse=True)


def _rows(page: list[SessionInfo]) -> list[tuple[datetime, str, int]]:
    return [(s.last_activity, s.session_id, s.message_count) for s in page]


async def _paged(url: str, namespace: str, pattern: str, limit: int) -> list[SessionInfo]:
    out: list[SessionInfo] = []
    before = None
    for _ in range(10_000):
        page = await AsyncChatHistory.sessions(namespace, pattern, limit=limit, before=before, url=url)
        if not page:
            return out
        out.extend(page)
        before = page[-1]
    raise AssertionError("paging did not end")


IDS = st.sampled_from([f"{p}:{i}" for p in ("a", "a:x", "b", "ab") for i in range(3)])
OPS = st.lists(st.tuples(st.sampled_from(["append", "append", "extend", "clear"]), IDS), min_size=1, max_size=20)
PATTERNS = ["*", "a:*", "a:x:*", "b:?", "a*", "b:1"]


@given(OPS)
@settings(max_examples=25, deadline=None)
def test_sessions_equal_reading_each_conversation(nats_server: NatsServer, ops: list[tuple[str, str]]) -> None:
    url, ns = nats_server.url, "t" + uuid.uuid4().hex[:16]

    async def main() -> None:
        for i, (op, sid) in enumerate(ops):
            async with AsyncChatHistory(sid, namespace=ns, url=url) as chat:
                if op == "append":
                    await chat.append({"i": i})
                elif op == "extend":
                    await chat.extend([{"i": i}, {"i": -i}])
                else:
                    await chat.clear()
        ids = {sid for _, sid in ops}
        for pattern in PATTERNS:
            expected = await _expected(url, ns, ids, pattern)
            assert _rows(await AsyncChatHistory.sessions(ns, pattern, limit=None, url=url)) == expected, pattern
            assert _rows(await _paged(url, ns, pattern, 2)) == expected, pattern

    asyncio.run(main())


@pytest.mark.slow
async def test_more_than_1024_interleaved_conversations(url: str, namespace: str) -> None:
    """1,100 matching conversations written among 1,100 others, some cleared: all listed, paged."""
    mine = [f"tenant:1:c{i:04d}" for i in range(1100)]
    others = [f"tenant:2:c{i:04d}" for i in range(1100)]
    order = [sid for pair in zip(mine, others, strict=True) for sid in pair]

    async def write(sid: str, n: int) -> None:
        # timeout=30: this proves listings, not speed; 200 writers at once on a loaded CI machine
        # took over the default 5 s (OutcomeUnknown, twice in full runs)
        async with AsyncChatHistory(sid, namespace=namespace, url=url, timeout=30) as chat:
            await chat.extend([{"n": k} for k in range(n)])

    for i in range(0, len(order), 200):
        await asyncio.gather(*(write(sid, 1 + j % 3) for j, sid in enumerate(order[i : i + 200])))
    for sid in mine[::50]:
        async with AsyncChatHistory(sid, namespace=namespace, url=url, timeout=30) as chat:
            await chat.clear()
    expected = await _expected(url, namespace, set(mine), "*")
    assert len(expected) == 1100 - 22
    assert _rows(await AsyncChatHistory.sessions(namespace, "tenant:1:*", limit=None, url=url)) == expected
    assert _rows(await _paged(url, namespace, "tenant:1:*", 500)) == expected
    top = await AsyncChatHistory.sessions(namespace, "tenant:1:*", limit=10, offset=5, url=url)
    assert _rows(top) == expected[5:15]


@pytest.mark.slow
async def test_expired_conversations_are_never_listed(url: str, namespace: str) -> None:
    for i in range(30):
        async with AsyncChatHistory(f"s:{i:02d}", namespace=namespace, url=url, ttl=1 if i % 2 else None) as chat:
            await chat.append({"i": i})
    keep = {f"s:{i:02d}" for i in range(0, 30, 2)}
    for _ in range(200):  # bounded: the ttl=1 conversations expire within a few seconds
        listed = await AsyncChatHistory.sessions(namespace, "s:*", limit=None, url=url)
        if {s.session_id for s in listed} == keep:
            break
        assert keep <= {s.session_id for s in listed}
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("conversations with ttl=1 were still listed after 20 s")
    for _ in range(3):  # right after the expiry (markers still there) and a moment later
        assert _rows(await AsyncChatHistory.sessions(namespace, "s:*", limit=None, url=url)) == await _expected(
            url, namespace, keep | {f"s:{i:02d}" for i in range(1, 30, 2)}, "*"
        )
        await asyncio.sleep(0.7)
