"""A namespace whose streams another client deleted (an operator's ``nats stream rm``,
``js.delete_stream`` from a second connection) while this process holds it open: its next write
makes the stream again, as the first write to a new namespace does, and is stored there.

The contract (../shared/CONTRACT.md) promises nothing about deleting a namespace, and the library
has no call for it: the README already says a namespace deleted meanwhile is "made anew" by a
write (the cache follows the new one). Before, the connection remembered that it had made the
stream and every write was retried until its timeout, then raised ``OutcomeUnknown`` (also for a
new ``Memory`` of that namespace in the same process: they share the pooled connection)."""

from __future__ import annotations

from collections.abc import Iterator

import nats
import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory
from botwire_stream.nats.chatlog import stream_name
from tests.cluster import Cluster
from tests.servers import NatsServer


@pytest.fixture
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("deleted-namespace"))
    try:
        yield c.start()
    finally:
        c.stop()


async def _delete(url: str, *streams: str) -> None:
    """Delete ``streams`` from a connection of the test's own (another client)."""
    nc = await nats.connect(url.split(","), connect_timeout=2)
    try:
        js = nc.jetstream()
        for stream in streams:
            assert await js.delete_stream(stream)
    finally:
        await nc.close()


async def _every_write_makes_it_again(url: str, namespace: str) -> None:
    kv, chat = f"KV_botwire_{namespace}", stream_name(namespace)
    async with (
        AsyncMemory(namespace, url=url, timeout=5) as m,
        AsyncChatHistory("c", namespace=namespace, url=url, timeout=5) as h,
        AsyncChatHistory("t", namespace=namespace, url=url, timeout=5, ttl=3600) as timed,
    ):
        await m.set("old", 1)
        await h.append({"n": "old"})
        await timed.append({"n": "old"})

        await _delete(url, kv, chat)
        await m.set("k", 2)  # one publish
        assert await m.get("k") == 2 and await m.get("old") is None and await m.list_keys() == ["k"]
        await h.append({"n": 1})  # one publish
        assert await h.messages() == [{"n": 1}] and await timed.messages() == []

        await _delete(url, chat)
        await h.extend([{"n": 2}, {"n": 3}])  # an atomic batch
        assert await h.messages() == [{"n": 2}, {"n": 3}] and await h.count() == 2

        await _delete(url, chat)
        await timed.append({"n": 4})  # its expiry schedule and the message, pipelined
        assert await timed.messages() == [{"n": 4}] and await h.messages() == []

        await _delete(url, kv)
        async with AsyncMemory(namespace, url=url, timeout=5) as again:  # opened on the same connection
            await again.set("new", 3)
            assert await again.get("new") == 3
        assert await m.list_keys() == ["new"]


async def test_writes_make_a_namespace_deleted_by_another_client_again(nats_server: NatsServer, namespace: str) -> None:
    await _every_write_makes_it_again(nats_server.url, namespace)


@pytest.mark.slow
async def test_writes_make_a_namespace_deleted_by_another_client_again_on_a_cluster(
    three: Cluster, namespace: str
) -> None:
    """The same on a 3-node cluster (3 replicas), where a write finding no stream is also what
    a leader election looks like: the stream is made again only once the servers say it is gone."""
    await _every_write_makes_it_again(three.url, namespace)
