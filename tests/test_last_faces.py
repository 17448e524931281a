"""The sync face and LangChain's ``BotWireChatHistory`` read in one request too (issue 17).

``ChatHistory.messages(last=N)`` runs the async core on the portal's loop: one request once this
process has seen the conversation. LangChain's ``RunnableWithMessageHistory`` reads the whole
history (``aget_messages``) on entering and again on leaving every turn: a whole read of a
conversation of up to 10,000 messages is one request. Requests are counted with the client's
own socket writes (requests sent together count once: one round trip), on a real server.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from botwire_stream import AsyncChatHistory, ChatHistory
from tests.test_last import _sent as _round_trips


def _sent(core: AsyncChatHistory) -> int:
    """Round trips so far (see ``tests.test_last._sent``): read from any thread, a counter."""
    return _round_trips(core)


async def _fill(url: str, ns: str, sid: str, n: int) -> None:
    """``n`` messages in ``sid``, interleaved with as many of 20 other conversations."""
    async with AsyncChatHistory(sid, namespace=ns, url=url) as chat:
        others = [AsyncChatHistory(f"{sid}-o{i}", namespace=ns, url=url) for i in range(20)]
        for i in range(0, n, 10):
            await chat.extend([{"role": "user", "content": f"m{j}"} for j in range(i, min(i + 10, n))])
            await others[i % 20].extend([{"role": "user", "content": "x"}] * 10)
        for o in others:
            await o.close()


def test_sync_face_last_n_in_one_request(url: str, namespace: str) -> None:
    sid = "s-" + uuid.uuid4().hex[:8]
    asyncio.run(_fill(url, namespace, sid, 500))
    with ChatHistory(sid, namespace=namespace, url=url) as chat:
        want = [{"role": "user", "content": f"m{j}"} for j in range(480, 500)]
        assert chat.messages(last=20) == want
        chat.append({"role": "assistant", "content": "a"})
        want = want[1:] + [{"role": "assistant", "content": "a"}]
        before = _sent(chat._core)
        assert chat.messages(last=20) == want
        assert _sent(chat._core) - before == 1
        before = _sent(chat._core)
        assert [e.message for e in chat.entries(last=20)] == want
        assert _sent(chat._core) - before == 1


async def test_langchain_history_reads_in_one_request(url: str, namespace: str) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.messages import AIMessage, HumanMessage

    from botwire_stream.integrations.langchain import BotWireChatHistory

    sid = "lc-" + uuid.uuid4().hex[:8]
    history = BotWireChatHistory(sid, namespace=namespace, url=url)
    try:
        for turn in range(30):  # a turn as RunnableWithMessageHistory runs it: read, answer, read, append
            before = await history.aget_messages()
            core = history._cores.get()
            start = _sent(core)
            again = await history.aget_messages()
            assert _sent(core) - start == 1
            assert again == before and len(before) == 2 * turn
            await history.aadd_messages([HumanMessage(f"q{turn}"), AIMessage(f"a{turn}")])
        assert [m.content for m in await history.aget_messages()][-2:] == ["q29", "a29"]
    finally:
        await history.aclose()
