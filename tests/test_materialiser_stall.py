"""The history materialiser rides out a NATS server that stalls longer than its 10 s write timeout
(issue 10): it keeps running, and once the server goes on it catches up with every conversation's
chain equal to the raw log (each message once, no gap) and every summary exact."""

from __future__ import annotations

import os
import signal
import time

import msgspec
import pytest

from botwire_stream import AsyncChatHistory, keys
from botwire_stream.nats import materialised as mat
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve

from .servers import NatsServer
from .test_qa_10c_materialiser import _caught_up, _chunks_hold_each_message_once, _exact, _materialiser, _truth, _write
from .test_qa_p10 import _mat_count
from .waits import sigstop, until

pytestmark = [pytest.mark.nats_only, pytest.mark.slow]

HOT, COLD = 4, 36
SESSIONS = [f"h{i}" for i in range(HOT)] + [f"c{i:02d}" for i in range(COLD)]


async def test_server_stopped_13_s_while_the_materialiser_flushes_it_rides_it_out(
    own_server: NatsServer, namespace: str
) -> None:
    """40 interleaved conversations written while the materialiser runs (caught up), then a backlog
    of 2,500 more appends piled up while it is SIGSTOPped; SIGCONT, and as soon as it writes
    chunks again its nats-server is SIGSTOPped for 13 s (longer than a write's 10 s timeout: the
    flush in hand, or the next one, times out). SIGCONT: the materialiser is still running (before:
    exit 2, "the NATS server did not answer within 10 s"), catches up, and every conversation's
    chunks hold each message once, reads and summaries exact; appends written after are
    materialised too."""
    url = own_server.url
    conn = await acquire(resolve(url))
    try:
        with _materialiser(url, namespace) as proc:

            async def running_and_caught_up() -> bool:
                assert proc.poll() is None, proc.communicate()
                return await _caught_up(url, namespace)

            _write(url, namespace, 36, HOT, COLD)  # while it runs: every conversation has a chain
            await until(running_and_caught_up, "the materialiser to catch up", 60)
            before = await _mat_count(url, namespace)
            sigstop(proc.pid)  # the materialiser (this test's process): a backlog piles up
            try:
                _write(url, namespace, 500, HOT, COLD)
            finally:
                os.kill(proc.pid, signal.SIGCONT)

            async def writing_again() -> bool:
                assert proc.poll() is None, proc.communicate()
                return await _mat_count(url, namespace) > before

            await until(writing_again, "chunks of the backlog", 60, every=0.002)
            sigstop(own_server.pid)  # this test's own server
            try:
                time.sleep(13)  # nothing to wait on: the stall itself
            finally:
                os.kill(own_server.pid, signal.SIGCONT)
            await until(running_and_caught_up, "the materialiser to catch up after SIGCONT", 120)
            truth = await _truth(conn, namespace, SESSIONS)
            assert sum(len(r) for r in truth.values()) == 536 * (HOT + 1)
            await _chunks_hold_each_message_once(conn, namespace, truth)
            await _exact(url, namespace, truth)
            listed = await AsyncChatHistory.sessions(namespace, limit=None, url=url)
            assert len(listed) == len(SESSIONS) and all(i.title is not None for i in listed)  # summaries exact

            _write(url, namespace, 10, HOT, COLD)  # and it goes on
            await until(running_and_caught_up, "the later appends materialised", 60)
            truth = await _truth(conn, namespace, SESSIONS)
            await _chunks_hold_each_message_once(conn, namespace, truth)
            await _exact(url, namespace, truth)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            # the stall was met mid-work (not while idle): a read or write timed out, was tried again
            assert "trying again while this process holds its lease" in err and "answers again" in err, err
    finally:
        await release(conn)


@pytest.mark.parametrize("landed", ["chunk", "summary"])
async def test_a_chunk_and_its_summary_not_both_stored_are_counted_once_restarted(
    url: str, namespace: str, landed: str
) -> None:
    """A materialiser stopped between a chunk and the summary written with it (SIGKILL, or a stop
    while the server stalls: the bytes of a pipelined group that reached the server are stored,
    the rest are not) leaves one without the other. Made here as such a run leaves it, for the 3
    messages after the first 4: their chunk stored and the summary still counting 4, or the
    summary counting 7 and no chunk. Restarted, the materialiser counts the conversation from the
    chain (before: its summary stayed 3 short, or counted the 3 twice once they were materialised
    again, for good: each later summary adds to it, and ``sessions()`` never showed the
    conversation's title again)."""
    token = keys.encode_key("s")
    async with AsyncChatHistory("s", namespace=namespace, url=url) as h:
        await h.extend([{"role": "user", "content": "first question"}, {"role": "assistant", "content": "a"}] * 2)
        conn = await acquire(resolve(url))
        try:
            with _materialiser(url, namespace) as proc:
                await until(lambda: _caught_up(url, namespace), "the materialiser to catch up", 60)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
            await h.extend([{"role": "user", "content": f"later {i}"} for i in range(3)])
            _, chunks, _ = await mat.read_chain(conn, namespace, token, 10.0)
            rows = (await _truth(conn, namespace, ["s"]))["s"]
            later = [r for r in rows if r[0] > chunks[-1].last]
            assert len(later) == 3
            if landed == "chunk":
                chunk = mat.Chunk(
                    chunks[-1].last, [q for q, _, _ in later], [t for _, t, _ in later], [d for _, _, d in later]
                )
                await conn.publish(mat.chunk_subject(namespace, 0, token), msgspec.msgpack.encode(chunk), {}, 10.0)
            else:
                tokens = sum(len(d) for _, _, d in rows) // 4
                summary = mat.Summary("s", 7, rows[0][1], rows[-1][1], "first question", tokens, rows[-1][0])
                subject = mat.summary_subject(namespace, token)
                await conn.publish(subject, msgspec.json.encode(summary), {"Nats-Rollup": "sub"}, 10.0)
            with _materialiser(url, namespace) as proc:
                await until(lambda: _caught_up(url, namespace), "the restarted materialiser to catch up", 60)
                [info] = await AsyncChatHistory.sessions(namespace, url=url)
                assert (info.message_count, info.title) == (7, "first question")  # its summary counts all 7
                await h.append({"role": "assistant", "content": "and on"})
                await until(lambda: _caught_up(url, namespace), "the next append materialised", 60)
                [info] = await AsyncChatHistory.sessions(namespace, url=url)
                assert (info.message_count, info.title) == (8, "first question")
                await _chunks_hold_each_message_once(conn, namespace, await _truth(conn, namespace, ["s"]))
        finally:
            await release(conn)
