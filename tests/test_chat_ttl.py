"""Sliding TTL of conversation logs, kept by the server: a conversation expires whole, ``ttl``
seconds after its last write, and never in part.

Each test sleeps a few seconds at most; every wait is a poll with a bounded deadline.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from botwire_stream import AsyncChatHistory, ChatHistory

POLL = 0.2


async def _until_gone(chat: AsyncChatHistory, whole: list[dict[str, Any]], deadline: float) -> list[int]:
    """Poll until the conversation is empty; every observation must be all of it or nothing."""
    seen: list[int] = []
    stop = time.monotonic() + deadline
    while time.monotonic() < stop:
        msgs = await chat.messages()
        seen.append(len(msgs))
        assert msgs in (whole, []), f"partial history observed: {len(msgs)} of {len(whole)}"
        if not msgs:
            return seen
        await asyncio.sleep(POLL)
    raise AssertionError(f"{chat.session_id!r} did not expire within {deadline} s (seen {seen})")


async def test_sliding_ttl_keeps_active_conversations_and_drops_idle_ones_whole(url: str, namespace: str) -> None:
    active = AsyncChatHistory("active", namespace=namespace, url=url, ttl=2)
    idle = AsyncChatHistory("idle", namespace=namespace, url=url, ttl=timedelta(seconds=2))
    forever = AsyncChatHistory("forever", namespace=namespace, url=url)
    try:
        kept = [{"turn": -1, "j": j} for j in range(3)]
        await active.extend(kept)
        idle_whole = [{"idle": j} for j in range(4)]
        await idle.extend(idle_whole[:3])
        await idle.append(idle_whole[3])
        await forever.append({"forever": True})
        watcher = asyncio.create_task(_until_gone(idle, idle_whole, deadline=8.0))

        for turn in range(4):  # a write about every second for about four seconds
            await asyncio.sleep(1.0)
            kept.append({"turn": turn})
            await active.append(kept[-1])
            assert await active.messages() == kept
        seen = await asyncio.wait_for(watcher, 10)
        assert seen[-1] == 0 and seen[0] == 4  # it was whole, then gone at once

        assert await idle.count() == 0
        assert await idle.entries() == []
        listed = {s.session_id: s.message_count for s in await AsyncChatHistory.sessions(namespace, url=url)}
        assert listed == {"active": len(kept), "forever": 1}

        await _until_gone(active, kept, deadline=6.0)  # left alone now: gone whole too
        assert await active.count() == 0
        assert [s.session_id for s in await AsyncChatHistory.sessions(namespace, url=url)] == ["forever"]
        assert await forever.messages() == [{"forever": True}]

        # an expired conversation can be written again, and starts afresh
        seq = await active.append({"again": True})
        assert await active.messages() == [{"again": True}]
        assert [e.seq for e in await active.entries()] == [seq]
        assert await active.count() == 1
        await asyncio.sleep(1.0)  # ttl=2: the new message must outlive the old expiry
        assert await active.messages() == [{"again": True}]
    finally:
        for chat in (active, idle, forever):
            await chat.close()


def test_sync_ttl_expiry_of_a_conversation_and_its_fork(url: str, namespace: str) -> None:
    """The sync face, a 1 s ttl, and a fork that inherits the ttl; both vanish whole."""

    async def gone(namespace: str, sid: str, whole: list[dict[str, Any]]) -> list[int]:
        async with AsyncChatHistory(sid, namespace=namespace, url=url) as reader:
            return await _until_gone(reader, whole, deadline=6.0)

    with ChatHistory("s", namespace=namespace, url=url, ttl=1) as chat:
        whole = [{"i": i} for i in range(5)]
        seqs = chat.extend(whole)
        branch = chat.fork("s-branch", upto=seqs[2])
        try:
            assert branch.messages() == whole[:3]
            assert asyncio.run(gone(namespace, "s", whole))[-1] == 0
            assert asyncio.run(gone(namespace, "s-branch", whole[:3]))[-1] == 0
            assert len(chat) == 0 and len(branch) == 0
            assert chat.messages(last=3) == []
        finally:
            branch.close()


async def test_an_expired_conversation_written_again_is_listed_with_its_new_count(url: str, namespace: str) -> None:
    """Right after expiry the server's empty expiry marker still sits on the subject for about a
    second; a conversation written again in that window holds one message, and must be listed so."""
    async with AsyncChatHistory("again", namespace=namespace, url=url, ttl=1) as chat:
        whole = [{"i": i} for i in range(3)]
        await chat.extend(whole)
        await _until_gone(chat, whole, deadline=6.0)
        await chat.append({"new": 1})
        assert await chat.count() == 1
        assert await chat.messages() == [{"new": 1}]
        listed = await AsyncChatHistory.sessions(namespace, url=url)
        assert [(s.session_id, s.message_count) for s in listed] == [("again", 1)]


async def test_a_message_appended_while_clear_runs_still_expires(url: str, namespace: str) -> None:
    """An append (its schedule, then its message) racing ``clear()``, many times: whatever the
    interleaving, every message that survives the clear expires with the conversation. Clearing
    used to purge the messages and then the schedule, so a message landing between the two stayed
    without an expiry, forever. Appender and clearer use two connections, so that the server
    handles them in parallel; the append starts 0 to 15 event-loop turns after the clear."""
    trials = 40
    ids = [f"race-{i}" for i in range(trials)]
    appenders = [AsyncChatHistory(sid, namespace=namespace, url=url, ttl=1) for sid in ids]
    clearers = [AsyncChatHistory(sid, namespace=namespace, url=url + "/") for sid in ids]

    async def append_later(chat: AsyncChatHistory, turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        await chat.append({"late": turns})

    try:
        for chat in appenders + clearers:
            await chat.open()
        assert appenders[0]._conn.conn is not clearers[0]._conn.conn
        for i in range(trials):
            await asyncio.gather(clearers[i].clear(), append_later(appenders[i], i % 16))
        deadline = time.monotonic() + 10  # ttl 1 s, rounded up to the schedule's next whole second
        left: list[str] = []
        while time.monotonic() < deadline:
            left = [s.session_id for s in await AsyncChatHistory.sessions(namespace, limit=None, url=url)]
            if not left:
                break
            await asyncio.sleep(POLL)
        assert left == [], f"{len(left)} of {trials} conversations never expired: {left[:5]}"
    finally:
        for chat in appenders + clearers:
            await chat.close()


async def test_clear_keeps_the_pending_expiry(url: str, namespace: str) -> None:
    """After ``clear()`` the expiry armed by the last write with a ttl still fires: it removes
    what was written since without a ttl, and a write with a ttl moves it as usual."""
    async with (
        AsyncChatHistory("kept", namespace=namespace, url=url, ttl=1) as timed,
        AsyncChatHistory("kept", namespace=namespace, url=url) as untimed,
    ):
        await timed.append({"old": 1})
        await timed.clear()
        assert await timed.messages() == []
        await untimed.append({"after-clear": 1})
        await _until_gone(untimed, [{"after-clear": 1}], deadline=6.0)
