"""Raw deliveries (botwire_stream/nats/rawsub.py), which replay and the materialiser read through:
bytes as the server sent them, on a connection whose other subscriptions keep nats-py's Msgs,
across a reconnect, and the header and status reads they rely on."""

from __future__ import annotations

import asyncio

import msgspec
import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from botwire_stream.nats.rawsub import RawSubscription, header, status
from botwire_stream.nats.replies import parse_headers
from tests.servers import NatsServer

Got = list[tuple[bytes, bytes, bytes, "bytes | None"]]


async def _until(cond: object, what: str, bound: float = 10.0) -> None:
    async with asyncio.timeout(bound):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_raw_and_ordinary_subscriptions_share_one_connection(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        raw_got: Got = []
        msgs: list[Msg] = []

        async def on_msg(m: Msg) -> None:
            msgs.append(m)

        raw = await RawSubscription(nc, "rawsub.raw", lambda s, r, d, h: raw_got.append((s, r, d, h))).start()
        await nc.subscribe("rawsub.plain", cb=on_msg)
        hdr = {"Botwire-Origin": "host: a/1", "Other": "x"}
        await nc.publish("rawsub.raw", b"one", reply="r.1", headers=hdr)
        await nc.publish("rawsub.plain", b"two", headers=hdr)
        await nc.publish("rawsub.raw", b"three")
        await _until(lambda: len(raw_got) == 2 and len(msgs) == 1, "both deliveries")
        assert [(s, r, d) for s, r, d, _ in raw_got] == [(b"rawsub.raw", b"r.1", b"one"), (b"rawsub.raw", b"", b"three")]
        assert header(raw_got[0][3], b"Botwire-Origin") == "host: a/1"  # a value holding ": " kept whole
        assert parse_headers(raw_got[0][3]) == hdr  # the one full header parser
        assert raw_got[1][3] is None and header(raw_got[1][3], b"Other") is None
        assert msgs[0].data == b"two" and msgs[0].headers == hdr  # nats-py's path unchanged
        await raw.stop()
        await nc.publish("rawsub.raw", b"after stop")
        await nc.publish("rawsub.plain", b"sentinel")  # one connection: delivered in this order
        await _until(lambda: len(msgs) == 2, "the sentinel")
        assert len(raw_got) == 2
    finally:
        await nc.close()


async def test_a_raw_subscription_receives_again_after_a_reconnect(own_server: NatsServer) -> None:
    nc = await nats.connect(own_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        got: Got = []
        await RawSubscription(nc, "rawsub.x", lambda s, r, d, h: got.append((s, r, d, h))).start()
        own_server.restart()
        async with asyncio.timeout(15):
            while nc.stats["reconnects"] == 0 or not nc.is_connected:
                await asyncio.sleep(0.05)
        await nc.flush()  # the subscription is re-sent on reconnect before this returns
        await nc.publish("rawsub.x", b"after")
        await _until(lambda: got, "the delivery after the reconnect")
        assert got[0][2] == b"after"
    finally:
        await nc.close()


async def test_a_batch_pull_onto_a_raw_inbox_gives_messages_then_the_no_messages_status(
    nats_server: NatsServer, namespace: str
) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    stream = f"RAWSUB_{namespace}"
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[f"rawsub.{namespace}.>"]))
        await js.publish(f"rawsub.{namespace}.a", b"m1", headers={"Botwire-Origin": "h/1"})
        await js.publish(f"rawsub.{namespace}.b", b"", headers={"Botwire-Event": "clear"})
        info = await js.add_consumer(stream, ConsumerConfig(ack_policy=AckPolicy.NONE))
        got: Got = []
        sub = await RawSubscription(nc, nc.new_inbox(), lambda s, r, d, h: got.append((s, r, d, h))).start()
        req = msgspec.json.encode({"batch": 5, "no_wait": True})
        await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{info.name}", req, reply=sub.subject)
        await _until(lambda: len(got) == 3, "two messages and a status")
        (s1, r1, d1, h1), (s2, r2, d2, h2), (_, r3, d3, h3) = got
        assert (s1, d1, status(h1, d1), header(h1, b"Botwire-Origin")) == (f"rawsub.{namespace}.a".encode(), b"m1", 0, "h/1")
        # an empty stored message with headers is a message, not a status
        assert (d2, status(h2, d2), header(h2, b"Botwire-Event")) == (b"", 0, "clear")
        assert r1.startswith(b"$JS.ACK.") and r2.startswith(b"$JS.ACK.")
        assert (r3, d3, status(h3, d3)) == (b"", b"", 404)
        await sub.stop()
    finally:
        await js.delete_stream(stream)
        await nc.close()
