"""Pins the nats-py hook that reply routing leans on (``botwire_stream.nats.replies``): a
subscription given ``future=obj`` has every message handed to ``obj.set_result`` by nats-py's
reader, with no queue and no task of its own. A nats-py release that changes this fails here."""

from __future__ import annotations

import asyncio

import nats

from botwire_stream.nats.replies import _ReplyMux


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
