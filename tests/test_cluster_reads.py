"""Read consistency on a 3-node cluster (tests/cluster.py): ``?reads=leader`` sees every write
acknowledged to another connection before the read; and a connection's own writes, deletes and
clears are seen by its next listing, count and read, on a follower whose replica lags (CPU
burners, another writer), where any replica may answer a direct get."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory
from botwire_stream.errors import InvalidArgument
from botwire_stream.nats.chatlog import stream_name
from botwire_stream.settings import resolve
from tests.cluster import Cluster, stream_info


@pytest.fixture(scope="module")
def reads_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("reads-cluster")).start()
    yield c
    c.stop()


def _burners(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` CPU-bound processes (killed by the caller, by their own handles): replicas then lag."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


async def _leader_and_follower(cluster: Cluster, stream: str) -> tuple[str, str]:
    leader = (await stream_info(cluster.url, stream))["cluster"]["leader"]
    follower = next(n for n in cluster.nodes if n.name != leader)
    return cluster.node(leader).url, follower.url


class _Load:
    """CPU burners and another client appending on the leader's node, for the test's duration."""

    def __init__(self, namespace: str, leader_url: str) -> None:
        self.namespace, self.url = namespace, leader_url
        self.stop = asyncio.Event()
        self.burners: list[subprocess.Popen[bytes]] = []
        self.task: asyncio.Task[None] | None = None

    async def _noise(self) -> None:
        async with AsyncChatHistory("noise", namespace=self.namespace, url=self.url, timeout=30) as h:
            while not self.stop.is_set():
                await h.extend([{"x": i} for i in range(20)])

    async def __aenter__(self) -> _Load:
        self.burners = _burners(3)
        self.task = asyncio.create_task(self._noise())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.burners:
            p.kill()
            p.wait()
        assert self.task is not None
        await self.task


# -- settings (no server) ---------------------------------------------------------------------
def test_reads_option_comes_from_the_url_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BOTWIRE_READS", raising=False)
    opts = resolve("nats://a:4222?reads=leader,nats://b:4222")
    assert opts.reads == "leader" and opts.servers == ("nats://a:4222", "nats://b:4222")
    assert resolve("nats://a:4222").reads == "any"
    monkeypatch.setenv("BOTWIRE_READS", "leader")
    assert resolve("nats://a:4222").reads == "leader"
    assert resolve("nats://a:4222?reads=any").reads == "any"  # the URL first
    for url, env, message in (
        ("nats://a:4222?reads=primary", "", "option reads= must be one of any, leader"),
        ("nats://a:4222", "fast", "BOTWIRE_READS must be one of any, leader"),
    ):
        monkeypatch.setenv("BOTWIRE_READS", env)
        with pytest.raises(InvalidArgument, match=message):
            resolve(url)


# -- another connection -----------------------------------------------------------------------
@pytest.mark.slow
async def test_reads_leader_sees_writes_acknowledged_to_another_connection(
    reads_cluster: Cluster, namespace: str
) -> None:
    """A writer on the stream leader's node and a reader with ``?reads=leader`` on a follower,
    under CPU burners and another writer: each of 100 rounds reads right after the writer's ack
    (a ``set``, a new key, an append, a second append), and every read sees it: ``get``,
    ``list_keys``, ``messages(last=1)``, ``count()``. With the default reads a replica a few ms
    behind answered (benchmarks/cluster_reads.py: 1-3 of 100 gets)."""
    async with (
        AsyncMemory(namespace, url=reads_cluster.url, timeout=30) as m,
        AsyncChatHistory("c", namespace=namespace, url=reads_cluster.url, timeout=30) as h,
    ):
        await m.set("k", -1)
        await h.append({"i": -1})
    kv_leader, kv_follower = await _leader_and_follower(reads_cluster, f"KV_botwire_{namespace}")
    chat_leader, chat_follower = await _leader_and_follower(reads_cluster, stream_name(namespace))
    stale: list[tuple[str, int]] = []
    async with (
        _Load(namespace, chat_leader),
        AsyncMemory(namespace, url=kv_leader, timeout=30) as writer,
        AsyncMemory(namespace, url=f"{kv_follower}?reads=leader", timeout=30) as reader,
        AsyncChatHistory("c", namespace=namespace, url=chat_leader, timeout=30) as cw,
        AsyncChatHistory("c", namespace=namespace, url=f"{chat_follower}?reads=leader", timeout=30) as cr,
    ):
        n = await cw.count()
        for i in range(100):
            await writer.set("k", i)
            if await reader.get("k") != i:
                stale.append(("get", i))
            await writer.set(f"new{i}", i)
            if f"new{i}" not in await reader.list_keys("new*"):
                stale.append(("list_keys", i))
            await cw.append({"i": i})
            n += 1
            got = await cr.messages(last=1)
            if got != [{"i": i}]:
                stale.append(("messages", i))
            await cw.append({"i": i, "again": True})
            n += 1
            if await cr.count() != n:
                stale.append(("count", i))
        await writer.delete("k")
        assert await reader.get("k") is None and not await reader.contains("k")
        await cw.clear()
        assert await cr.messages() == [] and await cr.count() == 0
    assert not stale, f"{len(stale)} reads missed a write acknowledged to another connection: {stale[:5]}"


# -- the connection's own writes ----------------------------------------------------------------
@pytest.mark.slow
async def test_own_writes_deletes_and_clears_are_seen_by_listings_counts_and_reads_on_a_follower(
    reads_cluster: Cluster, namespace: str
) -> None:
    """One client on a follower of both streams writes and at once reads back through the other
    read paths, 100 rounds under CPU burners and another writer: a new key is listed, a deleted
    one is neither read nor listed, a new conversation is listed by ``sessions()`` with its
    count, ``count()`` counts the append, and a cleared conversation reads, counts and lists as
    empty. Before, a replica a few ms behind answered these from its older state."""
    async with (
        AsyncMemory(namespace, url=reads_cluster.url, timeout=30) as m,
        AsyncChatHistory("warm", namespace=namespace, url=reads_cluster.url, timeout=30) as h,
    ):
        await m.set("warm", 0)
        await h.append({"n": 0})
    kv_leader, _ = await _leader_and_follower(reads_cluster, f"KV_botwire_{namespace}")
    chat_leader, _ = await _leader_and_follower(reads_cluster, stream_name(namespace))
    # one node that follows both streams (3 nodes, at most 2 leaders)
    node = next(n.url for n in reads_cluster.nodes if n.url not in (kv_leader, chat_leader))
    missed: list[tuple[str, int]] = []
    async with _Load(namespace, chat_leader), AsyncMemory(namespace, url=node, timeout=30) as mem:
        for i in range(100):
            key = f"k{i}"
            await mem.set(key, i)
            if key not in await mem.list_keys("k*"):
                missed.append(("listed after set", i))
            await mem.delete(key)
            if await mem.get(key) is not None or await mem.contains(key):
                missed.append(("read after delete", i))
            if key in await mem.list_keys("k*"):
                missed.append(("listed after delete", i))
            async with AsyncChatHistory(f"s{i}", namespace=namespace, url=node, timeout=30) as chat:
                await chat.append({"i": i})
                await chat.append({"i": i, "n": 2})
                if await chat.count() != 2:
                    missed.append(("count after append", i))
                listed = {
                    s.session_id: s.message_count for s in await AsyncChatHistory.sessions(namespace, f"s{i}", url=node)
                }
                if listed != {f"s{i}": 2}:
                    missed.append(("sessions after append", i))
                await chat.clear()
                if await chat.messages() != [] or await chat.count() != 0:
                    missed.append(("read after clear", i))
                if await AsyncChatHistory.sessions(namespace, f"s{i}", url=node):
                    missed.append(("listed after clear", i))
    assert not missed, f"{len(missed)} reads missed the connection's own write: {missed[:8]}"
