"""Pins the nats-py hook that reply routing leans on (``botwire_stream.nats.replies``): a
subscription given ``future=obj`` has every message handed to ``obj.set_result`` by nats-py's
reader, with no queue and no task of its own. A nats-py release that changes this fails here."""

from __future__ import annotations

import asyncio

import nats
import nats.aio.msg
import pytest

from botwire_stream.nats.rawsub import RawSubscription
from botwire_stream.nats.replies import _ReplyMux, parse_headers, route_replies


async def test_replies_reach_their_futures_through_the_subscription_hook(url: str) -> None:
    nc = await nats.connect(url)
    try:
        mux = _ReplyMux(nc.new_inbox() + ".", asyncio.get_running_loop(), nc)
        sub = await nc.subscribe(mux.prefix + "*", future=mux)  # type: ignore[arg-type]
        assert sub._wait_for_msgs_task is None  # no per-subscription task: the reader calls set_result
        replies = [mux.expect(5.0) for _ in range(3)]
        for i, (reply, _) in reversed(list(enumerate(replies))):
            await nc.publish(reply, str(i).encode())
        got = await asyncio.wait_for(asyncio.gather(*(f for _, f in replies)), 5.0)
        assert [m.data for m in got] == [b"0", b"1", b"2"]
        assert mux.waiting == {}
        assert sub.pending_msgs == 0  # nothing queued on the subscription
    finally:
        await nc.close()


# Header blocks as the server sends them, and malformed ones: parse_headers must read each as
# nats-py 2.16 does, since every reply to the shared inbox is parsed by it instead (route_replies).
_BLOCKS = [
    b"NATS/1.0\r\nNats-Stream: S\r\nNats-Subject: a.b\r\nNats-Sequence: 12\r\n"
    b"Nats-Time-Stamp: 2026-11-30T23:00:00.123456789Z\r\nNats-Msg-Id: x-1\r\n\r\n",
    b"NATS/1.0 204 EOB\r\nNats-Num-Pending: 0\r\nNats-Last-Sequence: 123\r\n\r\n",
    b"NATS/1.0 404 Message Not Found\r\n\r\n",
    b"NATS/1.0 503\r\n\r\n",
    b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\n\r\n",
    b"NATS/1.0\r\nName:NoSpace\r\nTabbed:\tvalue \r\nRepeated: 1\r\nRepeated: 2\r\n\r\n",
    b"NATS/1.0\r\nBad Name: dropped\r\nUtf8: caf\xc3\xa9 \xe2\x9c\x93\r\nBroken: \xff\xfe\r\n\r\n",
    b"NATS/1.0\r\nNon\xc3\xa9Ascii: dropped\r\nNoColon\r\nEmpty:\r\n\r\n",
]


async def test_reply_headers_parse_as_nats_py_parses_them() -> None:
    nc = nats.NATS()
    for raw in _BLOCKS:
        theirs = await nc._process_headers(raw)
        assert parse_headers(raw) == (theirs or {}), raw


async def test_routed_replies_skip_nats_py_and_other_subscriptions_do_not(url: str) -> None:
    """``route_replies``: a reply to a ``_ReplyMux`` inbox reaches its request (headers parsed,
    batch replies collected to their end status); any other subscription still gets nats-py's
    ``Msg`` through its own callback."""
    nc = await nats.connect(url)
    try:
        mux = _ReplyMux(nc.new_inbox() + ".", asyncio.get_running_loop(), nc)
        await route_replies(nc, mux)
        assert getattr(nc._process_msg, "botwire_routes", False)
        plain: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()

        async def on_plain(m: nats.aio.msg.Msg) -> None:
            await plain.put(m)

        await nc.subscribe("plain.subject", cb=on_plain)
        reply, future = mux.expect(5.0)
        batch_reply, collector = mux.expect_batch(5.0)
        await nc.publish(reply, b"one", headers={"Nats-Sequence": "7", "Botwire-Origin": "h/1"})
        await nc.publish(batch_reply, b"m1", headers={"Nats-Sequence": "8"})
        await nc.publish(batch_reply, b"m2")
        await nc.publish("plain.subject", b"p", headers={"K": "v"})
        got = await asyncio.wait_for(future, 5.0)
        assert (got.data, got.headers) == (b"one", {"Nats-Sequence": "7", "Botwire-Origin": "h/1"})
        m = await asyncio.wait_for(plain.get(), 5.0)
        assert (m.data, m.headers) == (b"p", {"K": "v"})
        assert [(x.data, x.headers) for x in collector.batch.msgs] == [
            (b"m1", {"Nats-Sequence": "8"}),
            (b"m2", None),
        ]
        assert not collector.done_future.done()
        # the end of a batch is a status line, which only the server sends: parsed as it is
        collector.add(nc, b"", parse_headers(b"NATS/1.0 204 EOB\r\nNats-Num-Pending: 3\r\nNats-Last-Sequence: 9\r\n\r\n"))
        await asyncio.wait_for(collector.done_future, 5.0)
        assert (collector.batch.pending, collector.batch.last_seq) == (3, 9)
        assert mux.waiting == {}
    finally:
        await nc.close()


@pytest.mark.parametrize("raw_first", [False, True])
async def test_one_dispatch_serves_the_reply_inbox_raw_subscriptions_and_nats_py(url: str, raw_first: bool) -> None:
    """Replay/materialiser reads (``RawSubscription``) and the shared reply inbox
    (``route_replies``) on one connection, set up in either order: one ``_process_msg``
    replacement over nats-py's own routes each message by sid, so the reply reaches its request,
    the raw subscription gets its bytes, an ordinary subscription still gets nats-py's ``Msg``,
    and the client's message counters count every message once."""
    nc = await nats.connect(url)
    raw_got: list[tuple[bytes, bytes, bytes, bytes | None]] = []
    mux = _ReplyMux(nc.new_inbox() + ".", asyncio.get_running_loop(), nc)
    try:
        nats_py_own = nc._process_msg
        raw = RawSubscription(nc, nc.new_inbox(), lambda s, r, d, h: raw_got.append((s, r, d, h)))
        if raw_first:
            await raw.start()
            await route_replies(nc, mux)
        else:
            await route_replies(nc, mux)
            await raw.start()
        hook = nc._process_msg
        await RawSubscription(nc, nc.new_inbox(), lambda *a: None).start()  # a second: same hook
        assert nc._process_msg is hook
        # one layer: the hook falls back to nats-py's own method, not to another hook
        fallback = [c.cell_contents for c in hook.__closure__ or () if callable(c.cell_contents)]
        assert nats_py_own in fallback and not any(getattr(f, "botwire_routes", False) for f in fallback)
        plain: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()

        async def on_plain(m: nats.aio.msg.Msg) -> None:
            await plain.put(m)

        await nc.subscribe("plain.subject", cb=on_plain)
        before = nc.stats["in_msgs"]
        reply, future = mux.expect(5.0)
        await nc.publish(raw.subject, b"raw", reply="r.1", headers={"Botwire-Origin": "h/1"})
        await nc.publish(reply, b"answer", headers={"Nats-Sequence": "3"})
        await nc.publish("plain.subject", b"p", headers={"K": "v"})
        got = await asyncio.wait_for(future, 5.0)
        assert (got.data, got.headers) == (b"answer", {"Nats-Sequence": "3"})
        m = await asyncio.wait_for(plain.get(), 5.0)
        assert (m.data, m.headers) == (b"p", {"K": "v"})
        assert [(s, r, d, parse_headers(h or b"")) for s, r, d, h in raw_got] == [
            (raw.subject.encode(), b"r.1", b"raw", {"Botwire-Origin": "h/1"})
        ]
        assert nc.stats["in_msgs"] - before == 3
        await raw.stop()  # back to nats-py, which drops it once unsubscribed; the rest unchanged
        reply, future = mux.expect(5.0)
        await nc.publish(reply, b"again")
        assert (await asyncio.wait_for(future, 5.0)).data == b"again"
        assert len(raw_got) == 1
    finally:
        await nc.close()
