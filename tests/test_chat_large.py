"""Conversations larger than one batch reply of the server: every read path is exact at any size.

nats-server ends one batch (and multi-last) direct get reply after ``max_pending`` bytes
(``MAX_PENDING_SIZE``, 64 MiB by default, ``server/const.go``; ``getDirectRequest`` in
``server/stream.go``), whatever batch size was asked. Each test writes a conversation just below
or above that cap, or several times it, and checks ``messages()``, ``entries()``,
``messages(last=N)``, ``len()``, ``fork`` and ``sessions()`` against what was written. Volumes are
kept to about 70-100 MB per test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from botwire_stream import AsyncChatHistory
from tests.servers import NatsServer

pytestmark = pytest.mark.slow

CAP = 64 * 1024 * 1024  # the server's default max_pending: the most one reply carries
MB = 1_000_000


@pytest.fixture(scope="module")
def big_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that takes 8 MiB messages, as the embedded server does (``embedded.MAX_PAYLOAD``)."""
    server = NatsServer(tmp_path_factory.mktemp("nats8"), max_payload=8 * 1024 * 1024).start()
    yield server.url
    server.stop()


def _message(i: int, size: int) -> dict[str, Any]:
    return {"i": i, "blob": chr(ord("a") + i % 26) * size}


async def _write(chat: AsyncChatHistory, n: int, size: int) -> list[int]:
    seqs = []
    for i in range(n):
        seqs.append(await chat.append(_message(i, size)))
    return seqs


async def _check_reads(chat: AsyncChatHistory, n: int, size: int, seqs: list[int]) -> None:
    assert await chat.count() == n
    got = await chat.messages()
    assert [m["i"] for m in got] == list(range(n))
    assert all(m == _message(m["i"], size) for m in got)
    del got
    entries = await chat.entries()
    assert [e.seq for e in entries] == seqs
    assert [e.message["i"] for e in entries] == list(range(n))
    del entries
    after = await chat.entries(after=seqs[0])
    assert [e.seq for e in after] == seqs[1:]
    del after
    for last in {n, n - 1, n // 2 + 1, 3}:
        assert [m["i"] for m in await chat.messages(last=last)] == list(range(n - last, n))
    assert [e.seq for e in await chat.entries(last=n + 5)] == seqs


@pytest.mark.parametrize("n", [67, 69], ids=["just-below-64MiB", "just-above-64MiB"])
async def test_a_conversation_around_the_reply_cap_reads_whole(url: str, namespace: str, n: int) -> None:
    """1 MB messages on the default 1 MiB server. A reply ends after the message that reaches the
    cap: 67 MB fits one reply; in 69 MB the 68th message reaches it, so the 69th needs another."""
    async with AsyncChatHistory("big", namespace=namespace, url=url) as chat:
        seqs = await _write(chat, n, MB - 100)
        assert ((n - 1) * MB < CAP) == (n == 67)
        await _check_reads(chat, n, MB - 100, seqs)


async def test_a_thousand_100kb_messages_read_whole(url: str, namespace: str) -> None:
    """100 MB in 1000 messages: the reply cap falls inside the first page of 10,000 messages."""
    async with AsyncChatHistory("many", namespace=namespace, url=url) as chat:
        seqs: list[int] = []
        for start in range(0, 1000, 100):
            seqs += await chat.extend([_message(i, 100_000) for i in range(start, start + 100)])
        await _check_reads(chat, 1000, 100_000, seqs)
        assert [m["i"] for m in await chat.messages(last=800)] == list(range(200, 1000))


async def test_twenty_4mb_messages_read_and_fork_whole(big_url: str, namespace: str) -> None:
    """80 MB in 4 MB messages on an 8 MiB server (the embedded server's limit): 16 fit one reply."""
    async with AsyncChatHistory("photos", namespace=namespace, url=big_url) as chat:
        seqs = await _write(chat, 20, 4 * MB)
        await _check_reads(chat, 20, 4 * MB, seqs)
        async with await chat.fork("photos-copy") as copy:
            assert await copy.count() == 20
            assert [m["i"] for m in await copy.messages()] == list(range(20))


async def test_sessions_lists_conversations_whose_last_messages_pass_the_cap(url: str, namespace: str) -> None:
    """70 conversations whose last message is 1 MB: one multi-last reply carries 64 MiB of them."""
    chats = [AsyncChatHistory(f"c:{i:02d}", namespace=namespace, url=url) for i in range(70)]
    try:
        for i, chat in enumerate(chats):
            await chat.append({"small": i})
            await chat.append(_message(i, MB - 100))
        listed = await AsyncChatHistory.sessions(namespace, "c:*", limit=None, url=url)
        assert [s.session_id for s in listed] == [f"c:{i:02d}" for i in reversed(range(70))]
        assert all(s.message_count == 2 for s in listed)
    finally:
        await asyncio.gather(*(c.close() for c in chats))


async def test_langchain_history_of_large_multimodal_turns_reads_whole(big_url: str, namespace: str) -> None:
    """20 turns with a 3.5 MB image each (about 70 MB): all 40 messages come back, equal."""
    from langchain_core.messages import AIMessage, HumanMessage

    from botwire_stream.integrations.langchain import BotWireChatHistory

    history = BotWireChatHistory("multimodal", namespace=namespace, url=big_url)
    written = []
    try:
        for turn in range(20):
            image = "data:image/png;base64," + chr(ord("A") + turn) * 3_500_000
            human = HumanMessage(
                content=[
                    {"type": "text", "text": f"what is in picture {turn}?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ]
            )
            ai = AIMessage(content=f"picture {turn} shows the letter {chr(ord('A') + turn)}")
            await history.aadd_messages([human, ai])
            written += [human, ai]
        got = await history.aget_messages()
        assert len(got) == 40
        assert got == written
    finally:
        await history.aclose()


async def test_sessions_counts_past_100k_conversations(url: str, namespace: str) -> None:
    """A stream info reply carries the counts of at most 100,000 subjects; past that, sessions()
    pages them, so every conversation is listed with its true count."""
    n = 100_050
    sem = asyncio.Semaphore(256)

    async def create(i: int) -> None:
        async with sem:
            chat = AsyncChatHistory(f"u:{i:06d}", namespace=namespace, url=url)
            await chat.append({"i": i})
            if i % 1000 == 0:
                await chat.append({"i": i, "again": True})
            await chat.close()

    await asyncio.gather(*(create(i) for i in range(n)))
    listed = await AsyncChatHistory.sessions(namespace, "u:*", limit=None, url=url)
    assert len(listed) == n
    counts = {s.session_id: s.message_count for s in listed}
    assert counts == {f"u:{i:06d}": 2 if i % 1000 == 0 else 1 for i in range(n)}
    top = await AsyncChatHistory.sessions(namespace, "u:*", limit=5, url=url)
    assert all(s.message_count >= 1 for s in top)
