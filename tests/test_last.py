"""``messages(last=N)`` / ``entries(last=N)``: exactly the newest N, in one request to the server.

Once this process has written or read a conversation, reading its newest N costs one request
whatever its length and however its messages interleave with other conversations' (the issue-17
target: a chat turn at the cost of its writes). Requests are counted with the client's own
counter of messages it sent (``nc.stats["out_msgs"]``) on a real server. Exactness is checked
against a full read, with writers in this process and in other OS processes, after ``clear`` and
after a TTL expiry.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botwire_stream import AsyncChatHistory, ChatHistory, Entry
from tests import procs


def _sent(chat: AsyncChatHistory) -> int:
    """How many messages (requests and publishes) the chat's connection has sent so far."""
    conn = chat._conn
    assert conn is not None
    sent: int = conn.conn.nc.stats["out_msgs"]  # type: ignore[attr-defined]
    return sent


async def _counted(chat: AsyncChatHistory, op: Any) -> tuple[Any, int]:
    """``await op``'s result and how many messages the chat's connection sent meanwhile."""
    before = _sent(chat)
    result = await op
    return result, _sent(chat) - before


def _in_other_process(url: str, ns: str, sid: str, body: str) -> Any:
    """Run ``body`` (async code using ``chat``, an ``AsyncChatHistory`` of ``sid``) in a child
    OS process; the value of its last expression line ``result = ...`` is returned."""
    script = (
        "import asyncio, json, sys\n"
        "from botwire_stream import AsyncChatHistory\n"
        "async def main():\n"
        "    async with AsyncChatHistory(sys.argv[3], namespace=sys.argv[2], url=sys.argv[1]) as chat:\n"
        + "".join(f"        {line}\n" for line in body.strip().splitlines())
        + "        return result\n"
        "print(json.dumps(asyncio.run(main())))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, url, ns, sid],
        capture_output=True,
        text=True,
        timeout=procs.WAIT,
        cwd=procs.ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


async def _interleaved(url: str, ns: str, sid: str, length: int, others: int, per_other: int) -> None:
    """``length`` messages in ``sid``, each followed by ``per_other`` messages of one of ``others``
    other conversations (round robin), so the conversation's messages are spread over the stream."""
    async with AsyncChatHistory(sid, namespace=ns, url=url) as chat:
        rest = [AsyncChatHistory(f"{sid}-o{i}", namespace=ns, url=url) for i in range(others)]
        try:
            for i in range(length):
                await chat.append({"role": "user", "i": i})
                other = rest[i % others]
                await other.extend([{"role": "other", "i": i, "j": j} for j in range(per_other)])
        finally:
            await asyncio.gather(*(o.close() for o in rest))


@pytest.mark.parametrize(("length", "others", "per_other"), [(40, 100, 1), (2_000, 100, 10)])
async def test_last_n_is_one_request_at_any_length(
    url: str, namespace: str, length: int, others: int, per_other: int
) -> None:
    sid = "conv-" + uuid.uuid4().hex[:8]
    await _interleaved(url, namespace, sid, length, others, per_other)
    # A new object: what this process learned when it wrote the conversation is shared.
    async with AsyncChatHistory(sid, namespace=namespace, url=url) as chat:
        await chat.open()
        full = await chat.entries()
        assert [e.message["i"] for e in full] == list(range(length))
        for n in (1, 20, 200, length, length + 5):
            got, sent = await _counted(chat, chat.messages(last=n))
            assert got == [e.message for e in full[-n:]]
            assert sent == 1, f"messages(last={n}) sent {sent} requests"
            entries, sent = await _counted(chat, chat.entries(last=n))
            assert entries == full[-n:]
            assert sent == 1, f"entries(last={n}) sent {sent} requests"
        # after= and last= together: the newest N after that sequence
        mid = full[length // 2].seq
        entries, sent = await _counted(chat, chat.entries(after=mid, last=20))
        assert entries == [e for e in full if e.seq > mid][-20:]
        assert sent == 1
        got, sent = await _counted(chat, chat.messages(last=0))
        assert got == [] and sent == 0


async def test_a_reader_that_did_not_write(url: str, namespace: str) -> None:
    """A process that only reads while another one writes: from its second read on, one request
    and exact, also after the writer appended more (up to a few hundred messages in between)."""
    sid = "conv-" + uuid.uuid4().hex[:8]

    def write(first: int, end: int) -> None:
        _in_other_process(url, namespace, sid, f"result = [await chat.append({{'i': i}}) for i in range({first}, {end})]")

    write(0, 300)
    async with AsyncChatHistory(sid, namespace=namespace, url=url) as chat:
        assert [m["i"] for m in await chat.messages(last=20)] == list(range(280, 300))  # the first read probes
        got, sent = await _counted(chat, chat.messages(last=20))
        assert [m["i"] for m in got] == list(range(280, 300)) and sent == 1
        end = 300
        for more in (1, 10, 60, 150, 2, 1000, 5):
            write(end, end + more)
            end += more
            got, sent = await _counted(chat, chat.messages(last=20))
            assert [m["i"] for m in got] == list(range(end - 20, end))
            if more <= 150:
                assert sent == 1, f"{sent} requests after the writer appended {more}"
