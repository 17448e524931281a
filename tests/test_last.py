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
import json
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botwire_stream import AsyncChatHistory, Entry
from tests import procs
from tests.servers import NatsServer


def _sent(chat: AsyncChatHistory) -> int:
    """How many round trips (writes to the server carrying a request or a publish) the chat's
    connection has made so far: requests sent together (a read from the kept tail pipelines a
    check of its oldest served message with its read) go out in one write and cost one round
    trip, which is the cost a turn pays; counted on the client's real socket transport."""
    conn = chat._conn_
    assert conn is not None
    nc: Any = conn.conn.nc  # type: ignore[attr-defined]
    transport = nc._transport
    if not hasattr(transport, "_botwire_writes"):
        transport._botwire_writes = 0
        write = transport.writelines

        def counting(payload: list[bytes]) -> None:
            if any(b"PUB " in p for p in payload):
                transport._botwire_writes += 1
            write(payload)

        transport.writelines = counting
    writes: int = transport._botwire_writes
    return writes


async def _counted(chat: AsyncChatHistory, op: Any) -> tuple[Any, int]:
    """``await op``'s result and how many round trips the chat's connection made meanwhile."""
    _sent(chat)  # counting from here on
    before = _sent(chat)
    result = await op
    return result, _sent(chat) - before


def _script(body: str) -> str:
    """A child's program: ``body`` (async code using ``chat``, the ``AsyncChatHistory`` of
    ``argv[3]`` in namespace ``argv[2]`` at ``argv[1]``, that sets ``result``), whose ``result``
    it prints as JSON on its last line."""
    return (
        "import asyncio, json, sys\n"
        "from botwire_stream import AsyncChatHistory\n"
        "async def main():\n"
        "    async with AsyncChatHistory(sys.argv[3], namespace=sys.argv[2], url=sys.argv[1]) as chat:\n"
        + "".join(f"        {line}\n" for line in body.strip().splitlines())
        + "        return result\n"
        "print(json.dumps(asyncio.run(main())))\n"
    )


def _in_other_process(url: str, ns: str, sid: str, body: str) -> Any:
    """Run ``_script(body)`` in a child OS process to completion; its ``result``."""
    proc = subprocess.run(
        [sys.executable, "-c", _script(body), url, ns, sid],
        capture_output=True,
        text=True,
        timeout=procs.WAIT,
        cwd=procs.ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


async def _interleaved(url: str, ns: str, sid: str, length: int, chunk: int, others: int, per_other: int) -> None:
    """``length`` messages in ``sid``, ``chunk`` at a time, each chunk followed by ``per_other``
    messages of one of ``others`` other conversations (round robin), so that the conversation's
    messages are spread over the whole stream."""
    async with AsyncChatHistory(sid, namespace=ns, url=url) as chat:
        rest = [AsyncChatHistory(f"{sid}-o{i}", namespace=ns, url=url) for i in range(others)]
        try:
            for c, i in enumerate(range(0, length, chunk)):
                await chat.extend([{"role": "user", "i": j} for j in range(i, min(i + chunk, length))])
                await rest[c % others].extend([{"role": "other", "j": j} for j in range(per_other)])
        finally:
            await asyncio.gather(*(o.close() for o in rest))


@pytest.mark.parametrize(("length", "chunk", "others", "per_other"), [(40, 1, 100, 1), (2_000, 10, 100, 100)])
async def test_last_n_is_one_request_at_any_length(
    url: str, namespace: str, length: int, chunk: int, others: int, per_other: int
) -> None:
    sid = "conv-" + uuid.uuid4().hex[:8]
    await _interleaved(url, namespace, sid, length, chunk, others, per_other)
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
        _in_other_process(
            url, namespace, sid, f"result = [await chat.append({{'i': i}}) for i in range({first}, {end})]"
        )

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


# -- exact under random interleavings -----------------------------------------------------------
# An operation: (writer 0-2, conversation 0-1, what, n): append one, extend n, clear, or read the
# last n (compared with a full read). Three writers per conversation share this process's hint.
OPS = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.integers(0, 1),
        st.sampled_from(["append", "append", "append", "extend", "clear", "read", "read"]),
        st.integers(0, 30),
    ),
    min_size=1,
    max_size=40,
)


@pytest.fixture(scope="module")
def shared_ns() -> str:
    """One namespace for the module (hypothesis runs many examples; each uses new conversations)."""
    return "t" + uuid.uuid4().hex[:16]


@given(OPS)
@settings(max_examples=25, deadline=None)
def test_last_n_matches_a_full_read_for_random_interleavings(
    nats_server: NatsServer, shared_ns: str, ops: list[Any]
) -> None:
    asyncio.run(_run_ops(nats_server.url, shared_ns, ops))


async def _run_ops(url: str, ns: str, ops: list[tuple[int, int, str, int]]) -> None:
    run = uuid.uuid4().hex[:8]
    chats = [[AsyncChatHistory(f"{run}-{c}", namespace=ns, url=url) for _ in range(3)] for c in range(2)]
    n_written = 0
    seen = [False, False]
    try:
        for row in chats:
            for c in row:
                await c.open()
        for writer, conv, what, n in ops:
            chat = chats[conv][writer]
            seen[conv] = seen[conv] or what == "clear"
            if what == "append":
                await chat.append({"w": writer, "k": n_written})
                n_written += 1
            elif what == "extend":
                await chat.extend([{"w": writer, "k": n_written + j} for j in range(n + 1)])
                n_written += n + 1
            elif what == "clear":
                await chat.clear()
            else:
                got, sent = await _counted(chat, chat.entries(last=n))
                full = await chat.entries()
                assert got == (full[-n:] if n else [])
                # One request once this process has read (or cleared) the conversation. A first
                # read asks for its oldest messages and its last one at once: enough when short.
                if not n:
                    assert sent == 0
                elif seen[conv]:
                    assert sent == 1
                elif len(full) <= n:
                    assert sent <= 2
                seen[conv] = seen[conv] or n > 0
                assert await chat.messages(last=n + 3) == [e.message for e in full[-(n + 3) :]]
        for row in chats:  # and at the end, every N from 0 to beyond the length
            full = await row[0].entries()
            for n in range(len(full) + 2):
                assert await row[1].entries(last=n) == (full[-n:] if n else [])
    finally:
        await asyncio.gather(*(c.close() for row in chats for c in row))


# -- other processes: concurrent appends, clear, expiry ---------------------------------------------
_APPEND_UNTIL_STOP = """
import os, time
other = AsyncChatHistory(sys.argv[3] + "-other", namespace=sys.argv[2], url=sys.argv[1])
n, deadline = 0, time.monotonic() + 60
print("ready", flush=True)
while not os.path.exists(sys.argv[4]) and time.monotonic() < deadline:
    await chat.append({"writer": os.getpid(), "i": n})
    await other.append({"writer": os.getpid(), "i": n})
    n += 1
await other.close()
result = n
"""


@pytest.mark.slow
async def test_last_n_is_exact_during_appends_from_other_processes(url: str, namespace: str, tmp_path: Any) -> None:
    """Two other processes append to the conversation (and to another one) without pause while
    this one, between appends of its own, reads the last N: every read is N consecutive messages
    of the final log ending at or after this process's own acknowledged append."""
    sid = "conv-" + uuid.uuid4().hex[:8]
    stop = tmp_path / "stop"
    script = _script(_APPEND_UNTIL_STOP)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", script, url, namespace, sid, str(stop)],
            cwd=procs.ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]
    reads: list[tuple[int, int, list[Entry]]] = []
    requests = 0
    try:
        for w in writers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        async with AsyncChatHistory(sid, namespace=namespace, url=url) as chat:
            deadline = time.monotonic() + 10
            for i in range(300):
                if time.monotonic() > deadline:
                    break
                mine = await chat.append({"writer": "reader", "i": i})
                n = (1, 5, 20, 100)[i % 4]
                got, sent = await _counted(chat, chat.entries(last=n))
                reads.append((n, mine, got))
                requests += sent
            stop.touch()
            counts = [json.loads(w.communicate(timeout=procs.WAIT)[0].strip().splitlines()[-1]) for w in writers]
            assert all(c > 0 for c in counts)
            full = await chat.entries()
    finally:
        stop.touch()
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait(5)
    assert len(full) == len(reads) + sum(counts)
    # one request each, but when the others appended more than a few hundred since the last read
    assert requests <= 1.5 * len(reads)
    index = {e.seq: i for i, e in enumerate(full)}
    for n, mine, got in reads:
        assert got[-1].seq >= mine  # nothing acknowledged before the read is missing
        end = index[got[-1].seq] + 1
        assert got == full[max(0, end - n) : end]


@pytest.mark.parametrize("new", [0, 3, 20, 45])
async def test_last_n_after_another_process_cleared_and_wrote(url: str, namespace: str, new: int) -> None:
    """What this process learned before the clear never brings old messages back, nor hides new ones."""
    sid = "conv-" + uuid.uuid4().hex[:8]
    async with AsyncChatHistory(sid, namespace=namespace, url=url) as chat:
        await chat.extend([{"old": i} for i in range(50)])
        assert [m["old"] for m in await chat.messages(last=20)] == list(range(30, 50))
        _in_other_process(
            url, namespace, sid, f"await chat.clear()\nresult = [await chat.append({{'new': i}}) for i in range({new})]"
        )
        for n in (1, 20, 100):
            want = [{"new": i} for i in range(new)][-n:]
            assert await chat.messages(last=n) == want
            assert [e.message for e in await chat.entries(last=n)] == want
        assert await chat.messages() == [{"new": i} for i in range(new)]
        got, sent = await _counted(chat, chat.messages(last=20))  # relearned: one request again
        assert got == [{"new": i} for i in range(new)][-20:] and sent == 1


@pytest.mark.slow
async def test_last_n_across_a_ttl_expiry(url: str, namespace: str) -> None:
    """A conversation that expired (server-side, no reader running) reads as empty, then as only
    what was appended after, from this process and from another one, for N below and above."""
    sid = "conv-" + uuid.uuid4().hex[:8]
    async with AsyncChatHistory(sid, namespace=namespace, url=url, ttl=1) as chat:
        await chat.extend([{"old": i} for i in range(30)])
        for i in range(30, 40):
            await chat.append({"old": i})
        assert [m["old"] for m in await chat.messages(last=20)] == list(range(20, 40))
        deadline = time.monotonic() + 15  # expires 1-2 s after the last write
        while await chat.messages(last=20) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await chat.messages(last=20) == []
        assert await chat.entries(last=5) == []
        async with AsyncChatHistory(sid, namespace=namespace, url=url) as plain:  # no ttl: no new expiry
            for i in range(3):
                await plain.append({"new": i})
        assert await chat.messages(last=20) == [{"new": i} for i in range(3)]
        assert await chat.messages(last=2) == [{"new": 1}, {"new": 2}]
        _in_other_process(url, namespace, sid, "result = [await chat.append({'new': i}) for i in range(3, 30)]")
        assert await chat.messages(last=20) == [{"new": i} for i in range(10, 30)]
        assert await chat.messages(last=100) == [{"new": i} for i in range(30)]
        got, sent = await _counted(chat, chat.messages(last=20))  # relearned: one request again
        assert got == [{"new": i} for i in range(10, 30)] and sent == 1


async def test_kept_messages_are_not_served_after_another_process_rewrote_them(url: str, namespace: str) -> None:
    """This process keeps the newest messages it read; another one clears the conversation and
    writes the same bodies again, the first of them equal to the newest kept one: reads give the
    new messages (their new sequences), not the kept ones."""
    sid = "conv-" + uuid.uuid4().hex[:8]
    async with AsyncChatHistory(sid, namespace=namespace, url=url) as chat:
        await chat.extend([{"i": i} for i in range(50)])
        old = await chat.entries(last=20)
        assert await chat.entries(last=20) == old  # from what it kept
        rewrite = "await chat.clear()\nresult = await chat.extend([{'i': 49}, {'i': 50}])"
        _in_other_process(url, namespace, sid, rewrite)
        got = await chat.entries(last=20)
        full = await chat.entries()
        assert [e.message for e in full] == [{"i": 49}, {"i": 50}]
        assert got == full and got[0].seq > old[-1].seq
        assert await chat.messages(last=20) == [{"i": 49}, {"i": 50}]
        again, sent = await _counted(chat, chat.entries(last=20))
        assert again == got and sent == 1
