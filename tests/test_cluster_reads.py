"""Read consistency on a 4-node cluster (tests/cluster.py; namespaces with 3 replicas):
``?reads=leader`` sees every write acknowledged to another connection before the read, and rides
out the death of the stream leader; a connection's own writes, deletes and clears are seen by its
next listing, count and read while any replica may answer its direct gets and replicas lag (CPU
burners, other writers)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory
from botwire_stream.errors import InvalidArgument
from botwire_stream.nats.chatlog import stream_name
from botwire_stream.settings import resolve
from tests.cluster import Cluster, one_bare_node, stream_info
from tests.servers import NatsServer


@pytest.fixture(scope="module")
def four_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """4 nodes, 3 of them tagged ``r``: streams placed with ``?tag=r`` leave the 4th without a replica."""
    yield from one_bare_node(tmp_path_factory.mktemp("four-nodes"))


def _burners(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` CPU-bound processes (killed by the caller, by their own handles): replicas then lag."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


async def _leader_and_follower(cluster: Cluster, stream: str) -> tuple[str, str]:
    """The URLs of the node leading ``stream`` and of a node holding one of its other replicas."""
    info = (await stream_info(cluster.url, stream))["cluster"]
    follower = next(r["name"] for r in info["replicas"])
    return cluster.node(info["leader"]).url, cluster.node(follower).url


class _Load:
    """CPU burners, and other clients writing 8 KB values to both streams through their leaders'
    nodes, for the test's duration: the followers' replicas then apply with a backlog."""

    def __init__(self, namespace: str, kv_leader: str, chat_leader: str) -> None:
        self.namespace, self.kv_url, self.chat_url = namespace, kv_leader, chat_leader
        self.stop = asyncio.Event()
        self.burners: list[subprocess.Popen[bytes]] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def _chat_noise(self) -> None:
        async with AsyncChatHistory("noise", namespace=self.namespace, url=self.chat_url, timeout=30) as h:
            while not self.stop.is_set():
                await h.extend([{"x": "x" * 8192} for _ in range(10)])

    async def _kv_noise(self) -> None:
        async with AsyncMemory(self.namespace, url=self.kv_url, timeout=30) as m:
            for i in range(10**9):
                if self.stop.is_set():
                    return
                await m.set(f"noise{i % 16}", "x" * 8192)

    async def __aenter__(self) -> _Load:
        self.burners = _burners(3)
        self.tasks = [asyncio.create_task(self._chat_noise()), asyncio.create_task(self._kv_noise())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.burners:
            p.kill()
            p.wait()
        await asyncio.gather(*self.tasks)


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


async def test_reads_leader_on_a_single_server_reads_as_usual(nats_server: NatsServer, namespace: str) -> None:
    """On a single server (one copy: nothing to ask a leader) ``?reads=leader`` reads what the
    default reads, through every read path."""
    url = f"{nats_server.url}?reads=leader"
    async with (
        AsyncMemory(namespace, url=url) as m,
        AsyncChatHistory("c", namespace=namespace, url=url) as h,
    ):
        await m.set("a", 1)
        await m.set("b", 2)
        await m.delete("b")
        assert await m.get("a") == 1 and await m.get("b") is None and await m.list_keys() == ["a"]
        await h.extend([{"n": 1}, {"n": 2}])
        assert await h.messages() == [{"n": 1}, {"n": 2}] and await h.messages(last=1) == [{"n": 2}]
        assert await h.count() == 2
        assert [x.session_id for x in await AsyncChatHistory.sessions(namespace, url=url)] == ["c"]
        await h.clear()
        assert await h.messages() == [] and await h.count() == 0


# -- another connection -----------------------------------------------------------------------
@pytest.mark.slow
async def test_reads_leader_sees_writes_acknowledged_to_another_connection(four_nodes: Cluster, namespace: str) -> None:
    """A writer on the stream leader's node and a reader with ``?reads=leader`` on a follower,
    under CPU burners and another writer: each of 100 rounds reads right after the writer's ack
    (a ``set``, a new key, an append, a second append), and every read sees it: ``get``,
    ``list_keys``, ``messages(last=1)``, ``count()``. With the default reads a replica a few ms
    behind answered (``python -m benchmarks --only cluster-reads``: 4-14% of gets)."""
    async with (
        AsyncMemory(namespace, url=four_nodes.url, timeout=30) as m,
        AsyncChatHistory("c", namespace=namespace, url=four_nodes.url, timeout=30) as h,
    ):
        await m.set("k", -1)
        await h.append({"i": -1})
    kv_leader, kv_follower = await _leader_and_follower(four_nodes, f"KV_botwire_{namespace}")
    chat_leader, chat_follower = await _leader_and_follower(four_nodes, stream_name(namespace))
    stale: list[tuple[str, int]] = []
    async with (
        _Load(namespace, kv_leader, chat_leader),
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
    four_nodes: Cluster, namespace: str
) -> None:
    """A client on the node of a 4-node cluster that holds no replica of the namespace's streams
    (3 replicas, placed by tag on the other three), so any replica answers its reads, the one
    the acknowledgement did not wait for included, writes and at once reads back through the
    other read paths, 4 x 40 rounds at once under CPU burners and other writers: a new key is
    listed, a deleted one is neither read nor listed, ``count()`` counts each append, a new
    conversation is listed by ``sessions()`` with its count, and a cleared conversation reads,
    counts and lists as empty. Before, a replica a few ms behind answered some of these from its
    older state."""
    node = f"{four_nodes.nodes[3].url}?tag=r"
    async with (
        AsyncMemory(namespace, url=node, timeout=30) as m,
        AsyncChatHistory("warm", namespace=namespace, url=node, timeout=30) as h,
    ):
        await m.set("warm", 0)
        await h.append({"n": 0})
    kv_leader, _ = await _leader_and_follower(four_nodes, f"KV_botwire_{namespace}")
    chat_leader, _ = await _leader_and_follower(four_nodes, stream_name(namespace))
    missed: list[tuple[str, str]] = []

    async def rounds(mem: AsyncMemory, w: int) -> None:
        for i in range(40):
            key, sid = f"k{w}-{i}", f"s{w}-{i}"
            await mem.set(key, i)
            if await mem.get(key) != i:
                missed.append(("read after set", key))
            if key not in await mem.list_keys(f"k{w}-*"):
                missed.append(("listed after set", key))
            if not await mem.delete(key):
                missed.append(("delete found nothing", key))
            if await mem.get(key) is not None or await mem.contains(key):
                missed.append(("read after delete", key))
            if key in await mem.list_keys(f"k{w}-*"):
                missed.append(("listed after delete", key))
            async with AsyncChatHistory(sid, namespace=namespace, url=node, timeout=30) as chat:
                for n in range(1, 5):
                    await chat.append({"i": i, "n": n})
                    if await chat.count() != n:
                        missed.append(("count after append", sid))
                listed = await AsyncChatHistory.sessions(namespace, sid, url=node)
                if [(x.session_id, x.message_count) for x in listed] != [(sid, 4)]:
                    missed.append(("sessions after append", sid))
                await chat.clear()
                if await chat.messages() != [] or await chat.count() != 0:
                    missed.append(("read after clear", sid))
                if await AsyncChatHistory.sessions(namespace, sid, url=node):
                    missed.append(("listed after clear", sid))

    # 4 workers at once on the one connection (more reads in the time, and the replicas lag more)
    async with _Load(namespace, kv_leader, chat_leader), AsyncMemory(namespace, url=node, timeout=30) as mem:
        await asyncio.gather(*(rounds(mem, w) for w in range(4)))
    assert not missed, f"{len(missed)} reads missed the connection's own write: {missed[:8]}"


@pytest.mark.slow
async def test_reads_leader_rides_out_the_death_of_the_stream_leader(tmp_path: Path, namespace: str) -> None:
    """With ``?reads=leader``, a ``get``, ``messages()`` and ``count()`` asked right after the node
    leading the namespace's streams is SIGKILLed return the acknowledged state once a new leader
    is elected (4-9 s), within the call's timeout: the dead leader answers nothing, and one
    request waiting the whole timeout failed the read."""
    cluster = Cluster(tmp_path / "cluster").start()  # its own: a node is killed
    try:
        await _reads_after_leader_death(cluster, namespace)
    finally:
        cluster.stop()


async def _reads_after_leader_death(cluster: Cluster, namespace: str) -> None:
    url = ",".join([cluster.urls[0] + "?reads=leader", *cluster.urls[1:]])
    async with (
        AsyncMemory(namespace, url=url, timeout=20) as mem,
        AsyncChatHistory("c", namespace=namespace, url=url, timeout=20) as chat,
    ):
        await mem.set("k", {"v": 1})
        await chat.extend([{"n": 1}, {"n": 2}, {"n": 3}])
        leader = (await stream_info(cluster.url, f"KV_botwire_{namespace}"))["cluster"]["leader"]
        cluster.node(leader).kill()
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await mem.get("k") == {"v": 1}
        assert await chat.messages() == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert await chat.count() == 3
        assert loop.time() - started < 3 * 20  # does not hang
