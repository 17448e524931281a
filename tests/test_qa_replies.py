"""QA of s17: replies to the shared inbox routed past nats-py (``nats/replies.py``
``route_replies``), and the ``last=N`` tail read that starts just after the newest kept message
(``nats/chatlog.py`` ``_read_tail``, ``jetstream.direct_batch_and_get``).

Attacks on one connection shared by many callers: replies after their caller's timeout, cancelled
callers, strays on inbox-like subjects, a server stopped, killed and restarted under load; and
``last=N`` reads racing appends from other OS processes and purges through the stream API."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import nats
import nats.aio.msg
import pytest
from nats.aio.client import Client as NATS

from botwire_stream import AsyncChatHistory, AsyncMemory
from botwire_stream.errors import InvalidArgument, ServerUnavailable
from botwire_stream.nats.chatlog import stream_name
from botwire_stream.nats.jetstream import Connection
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve
from tests import waits
from tests.procs import ROOT
from tests.servers import NatsServer


async def _echo(nc: NATS, subject: str) -> None:
    """Answer ``subject`` on ``nc`` with the request's body after the delay (seconds) it starts
    with (``"0.5:..."``), each reply in its own task so a slow one delays no other."""

    async def later(m: nats.aio.msg.Msg) -> None:
        await asyncio.sleep(float(m.data.split(b":", 1)[0]))
        await m.respond(m.data)

    tasks: set[asyncio.Task[None]] = set()

    async def on(m: nats.aio.msg.Msg) -> None:
        task = asyncio.ensure_future(later(m))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe(subject, cb=on)
    await nc.flush()


async def _ask(conn: Connection, subject: str, body: str, timeout: float) -> str:
    """A request through the shared inbox: its reply's body, or the error's class name."""
    try:
        msg = await conn.call(lambda: conn.request(subject, body.encode(), None, timeout), timeout=timeout)
        return msg.data.decode()
    except ServerUnavailable as exc:
        return type(exc).__name__


async def test_late_replies_and_cancelled_callers_leave_every_later_request_its_own_reply(url: str) -> None:
    """Replies arriving after their caller timed out or was cancelled go nowhere: the 300
    concurrent requests that follow on the same connection each get exactly their own reply, and
    the router keeps nothing for the requests it gave up."""
    conn = await acquire(resolve(url))
    other = await nats.connect(url)
    subject = "qa.echo." + uuid.uuid4().hex
    try:
        await _echo(other, subject)
        late = await asyncio.gather(*(_ask(conn, subject, f"0.6:late-{i}", 0.3) for i in range(50)))
        assert set(late) == {"ServerUnavailable"}
        cancelled = [asyncio.ensure_future(_ask(conn, subject, f"0.3:gone-{i}", 5.0)) for i in range(50)]
        await asyncio.sleep(0.1)
        for task in cancelled:
            task.cancel()
        # the late and the cancelled replies arrive while these wait for theirs
        got = await asyncio.gather(*(_ask(conn, subject, f"0.{i % 7}:now-{i}", 5.0) for i in range(300)))
        assert got == [f"0.{i % 7}:now-{i}" for i in range(300)]
        assert all(t.cancelled() for t in cancelled)
        mux = conn._mux
        assert mux is not None
        await waits.until(lambda: _idle(mux), "the router forgetting given-up requests", bound=5.0)
    finally:
        await other.close()
        await release(conn)


async def _idle(mux: object) -> bool:
    return not getattr(mux, "waiting") and not getattr(mux, "batches")


async def test_strays_and_a_subscription_that_matches_the_inbox_do_not_disturb_the_routing(
    url: str, namespace: str
) -> None:
    """Another client publishing to inbox-like subjects (an unknown token, a token already
    answered, a fake end-of-batch status) changes no reply, drops no connection; and a
    subscription of the user's own on ``_INBOX.>`` on the same connection still gets nats-py
    messages, headers parsed, while every read keeps its answer."""
    memory = AsyncMemory(namespace, url=url)
    chat = AsyncChatHistory("s", namespace=namespace, url=url)
    other = await nats.connect(url)
    try:
        await memory.set("k", "v")
        for i in range(5):
            await chat.append({"role": "user", "content": f"m{i}"})
        assert len(await chat.messages(last=3)) == 3  # a tail kept: the next reads are tail reads
        conn = await acquire(resolve(url))
        try:
            mux = conn._mux
            assert mux is not None
            seen: list[nats.aio.msg.Msg] = []

            async def on(m: nats.aio.msg.Msg) -> None:
                seen.append(m)

            await conn.nc.subscribe("_INBOX.>", cb=on)
            # nats-py 2.16's flush() writes its PING ahead of the queued SUB, so its PONG does not
            # prove the server has the subscription: a probe it delivers does.
            probe = f"_INBOX.probe-{uuid.uuid4().hex}"

            async def probed() -> bool:
                await other.publish(probe, b"probe")
                await other.flush()
                await asyncio.sleep(0.05)
                return any(m.subject == probe for m in seen)

            await waits.until(probed, "the inbox-wide subscription")
            reconnects = conn.nc.stats["reconnects"]
            for subject, hdr in [
                (mux.prefix + "999999999", None),
                (mux.prefix + "1", None),
                (mux.prefix + "not-a-token", {"Nats-Num-Pending": "0"}),
                (mux.prefix + "x.y", None),
            ]:
                await other.publish(subject, b"stray", headers=hdr)
            await other.flush()
            for _ in range(20):
                assert await memory.get("k") == "v"
                assert [m["content"] for m in await chat.messages(last=2)] == ["m3", "m4"]
            await waits.until(lambda: _has_stray(seen), "the inbox-wide subscription's messages")
            assert any(m.headers == {"Nats-Num-Pending": "0"} for m in seen)
            assert conn.nc.stats["reconnects"] == reconnects and conn.nc.is_connected
        finally:
            await release(conn)
    finally:
        await other.close()
        await memory.close()
        await chat.close()


async def _has_stray(seen: list[nats.aio.msg.Msg]) -> bool:
    return sum(m.data == b"stray" for m in seen) >= 3


@pytest.mark.slow
async def test_many_callers_through_a_stopped_then_killed_and_restarted_server(
    own_server: NatsServer, namespace: str
) -> None:
    """100 callers share one connection (gets and ``last=N`` tail reads) while the server is
    SIGSTOPped past their timeout, resumed, SIGKILLed and restarted: every call returns within 3x
    its timeout, with the right answer or ``ServerUnavailable``, and once the server is back the
    same connection answers every call right."""
    timeout = 1.0
    memory = AsyncMemory(namespace, url=own_server.url, timeout=timeout)
    chat = AsyncChatHistory("s", namespace=namespace, url=own_server.url, timeout=timeout)
    try:
        for i in range(20):
            await memory.set(f"k{i}", i)
            await chat.append({"role": "user", "content": f"m{i}"})
        expected = [f"m{i}" for i in range(15, 20)]
        stop = asyncio.Event()

        async def caller(i: int) -> list[str]:
            out = []
            for _ in range(200):
                if stop.is_set():
                    break
                t0 = time.monotonic()
                try:
                    assert await memory.get(f"k{i % 20}") == i % 20
                    assert [m["content"] for m in await chat.messages(last=5)] == expected
                    out.append("ok")
                except ServerUnavailable:
                    out.append("unavailable")
                assert time.monotonic() - t0 < 2 * 3 * timeout  # two calls, each within 3x its timeout
            return out

        callers = [asyncio.ensure_future(caller(i)) for i in range(100)]
        await asyncio.sleep(0.2)
        waits.sigstop(own_server.pid)
        await asyncio.sleep(1.5 * timeout)  # stopped past the timeout of the calls in flight
        os.kill(own_server.pid, signal.SIGCONT)
        await asyncio.sleep(0.3)
        assert own_server.proc is not None
        os.kill(own_server.pid, signal.SIGKILL)
        own_server.proc.wait(10)
        own_server.start()
        await asyncio.sleep(1.0)
        stop.set()
        outcomes = [o for result in await asyncio.wait_for(asyncio.gather(*callers), 60) for o in result]
        assert "ok" in outcomes and "unavailable" in outcomes
        for i in range(20):  # back: every call right, on the same connection
            assert await memory.get(f"k{i}") == i
            assert [m["content"] for m in await chat.messages(last=5)] == expected
    finally:
        await memory.close()
        await chat.close()


_WRITER = """
import asyncio, sys
from botwire_stream import AsyncChatHistory

async def main(url, ns, tag, n):
    chat = AsyncChatHistory("s", namespace=ns, url=url)
    for i in range(int(n)):
        await chat.append({"role": "user", "content": f"{tag}-{i}"})
    await chat.close()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.slow
async def test_last_n_while_other_processes_append_is_always_a_gapless_newest_run(url: str, namespace: str) -> None:
    """While two other OS processes append, every ``last=N`` read (N from 1 past the kept tail's
    64) is N consecutive messages of the final log, none missing between them, ending at the
    newest one stored when it was read (so never older than what this process appended)."""
    chat = AsyncChatHistory("s", namespace=namespace, url=url)
    writers: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(3):
            await chat.append({"role": "user", "content": f"own-{i}"})
        writers = [
            subprocess.Popen([sys.executable, "-c", _WRITER, url, namespace, f"w{k}", "80"], cwd=ROOT) for k in range(2)
        ]
        reads: list[tuple[int, list[int], int]] = []
        deadline = time.monotonic() + 60
        while any(w.poll() is None for w in writers) and time.monotonic() < deadline:
            own = await chat.append({"role": "user", "content": "own"})
            for n in (1, 2, 5, 64, 65):
                reads.append((n, [e.seq for e in await chat.entries(last=n)], own))
        for w in writers:
            assert w.wait(30) == 0
        final = [e.seq for e in await chat.entries()]
        at = {seq: i for i, seq in enumerate(final)}
        assert len(final) == 3 + 160 + len(reads) // 5
        for n, seqs, own in reads:
            assert seqs and seqs[-1] >= own, (n, seqs, own)
            end = at[seqs[-1]] + 1
            assert seqs == final[max(0, end - n) : end], (n, seqs)
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
        await chat.close()


async def test_last_n_after_stream_api_purges_and_at_its_boundaries(url: str, namespace: str) -> None:
    """With a tail kept, a purge through the stream API (keeping the newest 3, then all) and a
    clear are seen by the next ``last=N`` read; N at 0, 1, len, len+1, the tail's 64 and 65 and
    beyond any sequence gives the newest N; a negative, bool, float or str N is refused."""
    chat = AsyncChatHistory("s", namespace=namespace, url=url)
    nc = await nats.connect(url)
    try:
        sent = [f"m{i}" for i in range(70)]
        await chat.extend([{"role": "user", "content": c} for c in sent])
        for n in (0, 1, 69, 70, 71, 64, 65, 2**64):
            assert [m["content"] for m in await chat.messages(last=n)] == (sent[-n:] if n else []), n
        for bad in (-1, True, 1.0, "3"):
            with pytest.raises(InvalidArgument):
                await chat.messages(last=bad)  # type: ignore[arg-type]
        newest = (await chat.entries(last=1))[0].seq
        js = nc.jetstream()
        subject = (await js.get_msg(stream_name(namespace), seq=newest)).subject
        await js.purge_stream(stream_name(namespace), subject=subject, keep=3)
        assert [m["content"] for m in await chat.messages(last=5)] == sent[-3:]
        assert [m["content"] for m in await chat.messages(last=2)] == sent[-2:]
        await js.purge_stream(stream_name(namespace), subject=subject)
        assert await chat.messages(last=5) == []
        await chat.append({"role": "user", "content": "after"})
        assert [m["content"] for m in await chat.messages(last=5)] == ["after"]
        await chat.clear()
        assert await chat.messages(last=1) == [] and await chat.messages(last=5) == []
    finally:
        await nc.close()
        await chat.close()


async def test_cancelled_tail_reads_leave_the_others_and_the_router_right(url: str, namespace: str) -> None:
    """Half of 300 concurrent ``last=3`` tail reads (a batch and a direct get in one round trip)
    are cancelled at once, or a moment after they were sent: the other half each get the newest
    3, and the router keeps nothing for the cancelled ones."""
    chat = AsyncChatHistory("s", namespace=namespace, url=url)
    try:
        for i in range(10):
            await chat.append({"role": "user", "content": f"m{i}"})
        await chat.messages(last=5)  # a tail kept: the reads below are tail reads
        for delay in (0.0, 0.001, 0.003):
            reads = [asyncio.ensure_future(chat.messages(last=3)) for _ in range(300)]
            await asyncio.sleep(delay)
            for read in reads[::2]:
                read.cancel()
            got = await asyncio.gather(*reads, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in got[::2])
            assert all(isinstance(r, list) and [m["content"] for m in r] == ["m7", "m8", "m9"] for r in got[1::2])
        log = chat._conn
        assert log is not None
        mux = log.conn._mux  # type: ignore[attr-defined]  # the reads' connection's router
        assert mux is not None
        await waits.until(lambda: _idle(mux), "the router forgetting cancelled reads", bound=5.0)
    finally:
        await chat.close()
