"""QA of the conversation-log fixes of issue 18, against a real nats-server: deep messages read
from deep code, event loops closed without ``shutdown_asyncgens``, reads racing other processes,
and ``sessions()`` cursors."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from botwire_stream import AsyncChatHistory, AsyncMemory, ChatHistory, Memory, SessionInfo
from botwire_stream.errors import ChangedWhileRead, InvalidArgument, InvalidMessage, WrongEventLoop
from botwire_stream.integrations.langchain import BotWireChatHistory
from tests.resources import live_event_loops, open_sockets


def _nested(depth: int) -> dict[str, Any]:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return {"deep": value}


def test_the_deepest_message_append_accepts_reads_back_from_deeper_code(url: str, namespace: str) -> None:
    """How deep a message may nest is Python's recursion limit counted from the caller's stack: a
    message ``append`` accepted must read back through ``messages``, ``entries`` and ``watch`` when
    they are called 60 calls deeper (a web framework's handler), not raise ``RecursionError``."""

    async def main() -> tuple[int, list[Any]]:
        async with AsyncChatHistory("deep", namespace=namespace, url=url) as chat:
            depth = 1000
            while True:  # the deepest message append accepts here; deeper: InvalidMessage, unwritten
                try:
                    await chat.append(_nested(depth))
                    break
                except InvalidMessage:
                    depth -= 1
            assert depth > 900

            async def from_deeper(calls: int) -> list[Any]:
                if calls:
                    return await from_deeper(calls - 1)
                watch = chat.watch(after=0)
                try:
                    watched = await asyncio.wait_for(anext(aiter(watch)), 10)
                finally:
                    await watch.aclose()
                return [await chat.messages(), [e.message for e in await chat.entries()], [watched.message]]

            return depth, await from_deeper(60)

    depth, reads = asyncio.run(main())
    for read in reads:
        assert read == [_nested(depth)]


@pytest.mark.parametrize(
    "before",
    [
        SessionInfo("c1", 1, datetime.now()),  # a naive time
        SessionInfo("c1", 1, "2030-01-01T00:00:00Z"),  # type: ignore[arg-type]
        SessionInfo(1, 1, datetime.now().astimezone()),  # type: ignore[arg-type]
    ],
)
def test_a_hand_made_session_info_cursor_with_a_naive_time_is_an_invalid_argument(
    url: str, namespace: str, before: SessionInfo
) -> None:
    """A cursor rebuilt by hand (from a page token, say) is checked as a tuple cursor is: a naive
    or missing time is ``InvalidArgument``, not the ``TypeError`` of comparing datetimes."""
    with ChatHistory("c0", namespace=namespace, url=url) as chat:
        chat.append({"n": 0})
    with pytest.raises(InvalidArgument, match="aware datetime"):
        ChatHistory.sessions(namespace, url=url, before=before)


# The garbage collector frees the shut sockets with asyncio's "unclosed transport" warning: the
# loop that could have closed them cleanly was closed under them.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_loops_closed_without_shutdown_asyncgens_leave_no_sockets(
    url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``new_event_loop()``, ``run_until_complete()``, ``close()`` per request (no
    ``shutdown_asyncgens``, as much older code does), objects left open: each loop used to keep its
    socket for good (20 loops, 20 sockets). Now the next loop closes them, quietly (no "Task was
    destroyed but it is pending!"), the loops are freed, and the sync face still works."""

    async def request(i: int) -> None:
        chat = AsyncChatHistory(f"plain-{i}", namespace=namespace, url=url)
        await chat.append({"i": i})
        history = BotWireChatHistory(f"lc-{i}", namespace=namespace, url=url)
        await history.aadd_messages([HumanMessage(f"turn {i}")])
        memory = AsyncMemory(namespace, url=url)
        await memory.set("k", i)

    def run(i: int) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(request(i))
        finally:
            loop.close()

    run(0)
    gc.collect()
    before, loops_before = open_sockets(), live_event_loops()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for i in range(1, 21):
            run(i)
        gc.collect()
    assert open_sockets() - before <= 2
    assert live_event_loops() - loops_before <= 2
    assert not [r for r in caplog.records if r.name == "asyncio"]
    assert ChatHistory("plain-20", namespace=namespace, url=url).messages() == [{"i": 20}]
    assert Memory(namespace, url=url).get("k") == 20


# A writer process: generation after generation, clear() the conversation, then extend it with
# {"g": generation, "i": 0..size-1} in atomic batches of 1000 (stopped by the test, by PID).
_CLEARER = """
import asyncio, sys
from botwire_stream import AsyncChatHistory

async def main(url, namespace, size):
    async with AsyncChatHistory("raced", namespace=namespace, url=url) as chat:
        for g in range(1, 10_000):
            await chat.clear()
            for b in range(0, size, 1000):
                await chat.extend([{"g": g, "i": i} for i in range(b, b + 1000)])
            if g == 1:
                print("ready", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.slow
def test_reads_racing_clears_in_another_process_never_mix_old_and_new_messages(url: str, namespace: str) -> None:
    """While another process clears a conversation of 25,000 messages (3 pages) and fills it
    again, every read gives a run of one generation from its start (``messages``, ``entries``),
    or its newest messages (``last=N``): never messages from before a clear followed by messages
    written after it."""
    size = 25_000
    writer = subprocess.Popen(
        [sys.executable, "-c", _CLEARER, url, namespace, str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read() if writer.stderr else ""

        async def main() -> tuple[int, list[str]]:
            bad: list[str] = []
            reads = 0  # those that got more than one reply (over 10,000 messages)
            # ends at 15 multi-page reads; the bound only stops a starved run (2 reads in 15 s
            # with 4 xdist workers on 2 loaded cores)
            deadline = time.monotonic() + 60
            async with AsyncChatHistory("raced", namespace=namespace, url=url) as chat:
                while reads < 15 and time.monotonic() < deadline:
                    try:
                        got = [
                            ("messages", await chat.messages()),
                            ("entries", [e.message for e in await chat.entries()]),
                            ("last", await chat.messages(last=size - 100)),
                        ]
                    except ChangedWhileRead:
                        continue  # cleared on every one of its tries (a loaded machine): said, not mixed
                    reads += sum(len(msgs) > 10_000 for _, msgs in got)
                    for how, msgs in got:
                        gens = {m["g"] for m in msgs}
                        ids = [m["i"] for m in msgs]
                        first = ids[0] if ids and how == "last" else 0
                        if len(gens) > 1 or ids != list(range(first, first + len(ids))):
                            bad.append(f"{how}: generations {sorted(gens)}, {len(ids)} messages from i={first}")
            return reads, bad

        reads, bad = asyncio.run(main())
        assert writer.poll() is None, writer.stderr.read() if writer.stderr else ""
    finally:
        writer.kill()
        writer.wait(10)
    assert reads >= 5
    assert bad == []


@pytest.mark.slow
@pytest.mark.parametrize(("size", "attempts"), [(9_000, 30), (25_000, 12)])
def test_a_read_racing_a_clear_and_an_append_gives_all_old_or_the_new_never_a_mix(
    url: str, namespace: str, size: int, attempts: int
) -> None:
    """A read racing a ``clear()`` and an append on another connection gives all the old messages,
    none, or the new one: of 9,000 messages (one reply, then the request that finds nothing
    more), was the old ones followed by the new one in 9 of 40 reads; of 25,000 (three replies),
    was the first 10,000 or 20,000 old ones, with or without the new one, in most reads."""
    other = ChatHistory("raced", namespace=namespace, url=url)  # the sync face: its own connection
    old = [{"old": i} for i in range(size)]

    def clear_and_append() -> None:
        other.clear()
        other.append({"new": True})

    async def main() -> list[str]:
        bad = []
        async with AsyncChatHistory("raced", namespace=namespace, url=url) as chat:
            for attempt in range(attempts):
                await asyncio.to_thread(other.clear)
                for i in range(0, len(old), 1000):
                    await asyncio.to_thread(other.extend, old[i : i + 1000])

                async def race(delay: float) -> None:
                    await asyncio.sleep(delay)
                    await asyncio.to_thread(clear_and_append)

                racer = asyncio.create_task(race(random.uniform(0, 0.03)))
                got = await chat.messages()
                await racer
                if got not in (old, [], [{"new": True}]):
                    bad.append(f"attempt {attempt}: {len(got)} messages, {sum('new' in m for m in got)} new")
        return bad

    try:
        assert asyncio.run(main()) == []
    finally:
        other.close()


def test_ints_python_cannot_write_out_are_refused_as_bad_input(url: str, namespace: str) -> None:
    """An int of over 4300 digits (Python's limit for int to str) is bad input like any value JSON
    cannot hold: ``InvalidMessage`` (chat, LangChain) or ``TypeError`` (``Memory.set``), nothing
    written (was: a bare ``ValueError``)."""
    huge = 10**5000
    with ChatHistory("huge", namespace=namespace, url=url) as chat:
        with pytest.raises(InvalidMessage):
            chat.append({"n": huge})
        with pytest.raises(InvalidMessage):
            chat.extend([{"ok": 1}, {"n": [-huge]}])
        assert chat.messages() == []
    with BotWireChatHistory("huge-lc", namespace=namespace, url=url) as history:
        with pytest.raises(InvalidMessage):
            history.add_messages([HumanMessage("hi", additional_kwargs={"n": huge})])
        assert history.messages == []
    with Memory(namespace, url=url) as memory:
        with pytest.raises(TypeError):
            memory.set("k", {"n": huge})
        assert memory.get("k") is None


@pytest.mark.parametrize("upto", [True, -1, "2", 2.5, 2**63])
def test_fork_upto_that_is_no_sequence_number_is_an_invalid_argument(url: str, namespace: str, upto: Any) -> None:
    """``upto`` is checked as ``after`` is: ``upto=True`` used to fork up to sequence 1, 2.5 up to
    2, and ``"2"`` raised a bare ``TypeError``; now ``InvalidArgument``, nothing written."""
    with ChatHistory("src", namespace=namespace, url=url) as chat:
        seqs = chat.extend([{"i": i} for i in range(3)])
        with pytest.raises(InvalidArgument, match="upto"):
            chat.fork("copy", upto=upto)
        assert chat.fork("copy", upto=seqs[1]).messages() == [{"i": 0}, {"i": 1}]


@pytest.mark.parametrize(
    "options",
    [{"timeout": "5"}, {"timeout": -1}, {"timeout": 0}, {"timeout": float("nan")}, {"timeout": True}]
    + [{"replicas": True}, {"replicas": 0}, {"replicas": 6}, {"replicas": 1.0}],
)
def test_bad_timeout_or_replicas_is_an_invalid_argument_when_the_object_is_made(options: dict[str, Any]) -> None:
    """Was: ``timeout="5"`` a bare ``TypeError`` at the first write, ``timeout=-1``/``0``/NaN
    accepted, ``replicas=True`` a server JSON error; nothing is connected to find out."""
    makers = [
        lambda: AsyncChatHistory("s", **options),
        lambda: ChatHistory("s", **options),
        lambda: AsyncMemory("ns", **options),
        lambda: Memory("ns", **options),
        lambda: BotWireChatHistory("s", **options),
    ]
    for make in makers:
        with pytest.raises(InvalidArgument):
            make()


def test_async_calls_outside_asyncio_raise_wrong_event_loop(url: str, namespace: str) -> None:
    """A coroutine driven with no asyncio loop running, as trio drives them, gets a
    ``WrongEventLoop`` that says what to do (was: asyncio's bare "no running event loop")."""
    calls: list[Callable[[], Coroutine[Any, Any, Any]]] = [
        lambda: AsyncChatHistory("s", namespace=namespace, url=url).append({"n": 1}),
        lambda: AsyncChatHistory("s", namespace=namespace, url=url).messages(),
        lambda: AsyncChatHistory.sessions(namespace, url=url),
        lambda: AsyncMemory(namespace, url=url).get("k"),
        lambda: BotWireChatHistory("s", namespace=namespace, url=url).aget_messages(),
    ]
    for make in calls:
        coro = make()
        try:
            with pytest.raises(WrongEventLoop, match="asyncio"):
                coro.send(None)
        finally:
            coro.close()
    assert ChatHistory("s", namespace=namespace, url=url).messages() == []
