"""QA of read consistency (``?reads=leader`` / ``BOTWIRE_READS``, and a connection's own writes seen
by its listings): bad option values, ``reads=leader`` where there is one copy, reads while the
stream leader is frozen, listings that must not wait for a replica (a stream whose last message
was deleted or purged, a namespace deleted and created again), and clear-then-append on a node
holding no replica."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory
from botwire_stream.chat import _SESSIONS_TIMEOUT
from botwire_stream.errors import InvalidArgument, ServerUnavailable
from botwire_stream.keys import encode_key
from botwire_stream.nats.chatlog import stream_name
from botwire_stream.settings import resolve
from tests.cluster import Cluster, one_bare_node, stream_info
from tests.http_serve import Serves
from tests.procs import ROOT, kill_all
from tests.servers import NatsServer
from tests.waits import until


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """4 nodes, 3 tagged ``r``: namespaces placed with ``?tag=r`` have no replica on the 4th."""
    yield from one_bare_node(tmp_path_factory.mktemp("qa-reads"))


async def _raw(url: str, subject: str, body: dict[str, object] | None = None) -> dict[str, object]:
    """One JetStream API request from a client of the test's own (not the one under test)."""
    nc = await nats.connect(url, connect_timeout=2)
    try:
        msg = await nc.request(subject, json.dumps(body).encode() if body else b"", timeout=5)
        got: dict[str, object] = json.loads(msg.data)
        return got
    finally:
        await nc.close()


# -- settings (no server) ---------------------------------------------------------------------
def test_bad_reads_values_name_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty and unknown values, in the URL or the environment, are refused naming the choices;
    case and blanks do not matter; a blank ``BOTWIRE_READS`` means unset; the URL wins over the
    environment, but a bad ``BOTWIRE_READS`` is refused even then (before, it was ignored until
    the day the URL option went), and servers of one URL list disagreeing are refused (before,
    the last one silently won)."""
    monkeypatch.delenv("BOTWIRE_READS", raising=False)
    for url in ("nats://a:4222?reads=", "nats://a:4222?reads=%20", "nats://a:4222?reads=primary"):
        with pytest.raises(InvalidArgument, match="reads= must be one of any, leader"):
            resolve(url)
    assert resolve("nats://a:4222?reads=LEADER").reads == "leader"
    monkeypatch.setenv("BOTWIRE_READS", " Leader ")
    assert resolve("nats://a:4222").reads == "leader"
    assert resolve("nats://a:4222?reads=any").reads == "any"  # the URL first
    monkeypatch.setenv("BOTWIRE_READS", "  ")
    assert resolve("nats://a:4222").reads == "any"
    for env in ("fast", "leaders"):
        monkeypatch.setenv("BOTWIRE_READS", env)
        for url in ("nats://a:4222", "nats://a:4222?reads=leader"):
            with pytest.raises(InvalidArgument, match="BOTWIRE_READS must be one of any, leader"):
                resolve(url)
    monkeypatch.delenv("BOTWIRE_READS")
    with pytest.raises(InvalidArgument, match="reads=leader and reads=any"):
        resolve("nats://a:4222?reads=leader,nats://b:4222?reads=any")
    same = resolve("nats://a:4222?reads=leader,nats://b:4222?reads=Leader")
    assert same.reads == "leader" and same.servers == ("nats://a:4222", "nats://b:4222")


# -- one copy: nothing to ask a leader -----------------------------------------------------------
@pytest.mark.parametrize("reads", ["any", "leader"])
async def test_missing_and_deleted_keys_read_as_none_on_a_single_server(
    nats_server: NatsServer, namespace: str, reads: str
) -> None:
    url = f"{nats_server.url}?reads={reads}"
    async with AsyncMemory(namespace, url=url, timeout=3) as m:
        assert await m.get("never") is None and not await m.contains("never")
        await m.set("k", 1)
        assert await m.delete("k")
        assert await m.get("k") is None and await m.list_keys() == []


async def test_botwire_reads_leader_with_the_embedded_server_reads_as_usual(
    botwire_home: object, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``BOTWIRE_READS`` applies to a NATS URL only: the embedded server reads as it always did."""
    monkeypatch.delenv("BOTWIRE_URL", raising=False)
    monkeypatch.setenv("BOTWIRE_READS", "leader")
    async with AsyncMemory(namespace, timeout=10) as m, AsyncChatHistory("c", namespace=namespace, timeout=10) as h:
        assert await m.get("never") is None
        await m.set("a", 1)
        await m.set("b", 2)
        await m.delete("b")
        assert await m.get("b") is None and await m.list_keys() == ["a"]
        await h.extend([{"n": 1}, {"n": 2}])
        await h.clear()
        await h.append({"n": 3})
        assert await h.messages() == [{"n": 3}] and await h.count() == 1


# -- listings that must not wait ------------------------------------------------------------------
@pytest.mark.slow
async def test_listing_after_the_streams_last_message_was_purged_does_not_wait(four: Cluster, namespace: str) -> None:
    """On a node with no replica, after this connection's writes: the key stream's last message
    purged by another client, and the chat stream's last messages purged by a clear, then
    listed, counted and read: answered at once, not after the timeout (the wait-for-a-replica
    loop must find its floor reached)."""
    node = f"{four.nodes[3].url}?tag=r"
    loop = asyncio.get_running_loop()
    async with (
        AsyncMemory(namespace, url=node, timeout=5) as m,
        AsyncChatHistory("c", namespace=namespace, url=node, timeout=5) as h,
    ):
        await m.set("a", 1)
        await m.set("b", 2)
        kv = f"KV_botwire_{namespace}"
        # the streams' last messages purged (both refuse deletes: deny_delete)
        purged = await _raw(
            four.urls[0], f"$JS.API.STREAM.PURGE.{kv}", {"filter": f"$KV.botwire_{namespace}.{encode_key('b')}"}
        )
        assert purged.get("success") is True, purged
        await h.extend([{"n": 1}, {"n": 2}])
        await h.clear()
        started = loop.time()
        assert await m.list_keys() == ["a"]
        assert await AsyncChatHistory.sessions(namespace, url=node) == []
        assert await h.count() == 0 and await h.messages() == []
        assert loop.time() - started < 5  # not a wait until a timeout


@pytest.mark.slow
async def test_listing_after_the_namespace_was_deleted_and_created_again(four: Cluster, namespace: str) -> None:
    """A connection that wrote 20 keys and 20 messages, whose namespace is then deleted and
    created again by another client (its sequences start anew), lists the new contents. Before,
    its floor from the old stream was never reached: every ``list_keys`` and ``sessions()``
    failed with ``ServerUnavailable`` after the full timeout."""
    url = four.urls[0]
    async with (
        AsyncMemory(namespace, url=url, timeout=3) as m,
        AsyncChatHistory("old", namespace=namespace, url=url, timeout=3) as h,
    ):
        for i in range(20):
            await m.set(f"k{i}", i)
            await h.append({"i": i})
        for stream in (f"KV_botwire_{namespace}", stream_name(namespace)):
            assert (await _raw(four.urls[1], f"$JS.API.STREAM.DELETE.{stream}")).get("success") is True
        other = four.urls[2]  # another connection (another pooled client) creates them again
        async with (
            AsyncMemory(namespace, url=other, timeout=10) as m2,
            AsyncChatHistory("new", namespace=namespace, url=other, timeout=10) as h2,
        ):
            await m2.set("fresh", 1)
            await h2.append({"x": 1})
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await m.list_keys() == ["fresh"]
        assert [s.session_id for s in await AsyncChatHistory.sessions(namespace, url=url)] == ["new"]
        assert loop.time() - started < 3 * 3  # does not hang


# -- a frozen stream leader -----------------------------------------------------------------------
@pytest.mark.slow
async def test_reads_leader_while_the_stream_leader_is_frozen_returns_within_the_timeout(
    four: Cluster, namespace: str
) -> None:
    """``?reads=leader`` from a node with no replica while the node leading the namespace's key
    stream is SIGSTOPped (not killed: it holds its leadership, answering nothing): each read
    returns the acknowledged state or raises ``ServerUnavailable``, within 3x its timeout; once
    the node resumes, reads answer again."""
    node = f"{four.nodes[3].url}?tag=r&reads=leader"
    async with (
        AsyncMemory(namespace, url=node, timeout=2) as m,
        AsyncChatHistory("c", namespace=namespace, url=node, timeout=2) as h,
    ):
        await m.set("k", 1)
        await h.extend([{"n": 1}])
        leader = four.node((await stream_info(four.url, f"KV_botwire_{namespace}"))["cluster"]["leader"])
        loop = asyncio.get_running_loop()
        leader.send(signal.SIGSTOP)
        try:
            for name, read, expected in (
                ("get", lambda: m.get("k"), 1),
                ("get missing", lambda: m.get("never"), None),
                ("list_keys", lambda: m.list_keys(), ["k"]),
                ("messages", lambda: h.messages(), [{"n": 1}]),
                ("count", lambda: h.count(), 1),
            ):
                started = loop.time()
                try:
                    got: object = await read()
                except ServerUnavailable:
                    pass
                else:
                    assert got == expected, name
                assert loop.time() - started < 3 * 2, f"{name} hung"
        finally:
            leader.send(signal.SIGCONT)
        four.wait_healthy()
        assert await m.get("k") == 1 and await h.count() == 1


# -- clear then append ----------------------------------------------------------------------------
@pytest.mark.slow
async def test_clear_then_append_reads_the_new_message_on_a_node_with_no_replica(four: Cluster, namespace: str) -> None:
    """20 rounds of clear, append, read back on one connection whose reads any replica answers:
    the cleared bookkeeping neither hides the append from ``count()``/``messages()``/``sessions()``
    nor shows a message from before the clear."""
    node = f"{four.nodes[3].url}?tag=r"
    async with AsyncChatHistory("c", namespace=namespace, url=node, timeout=5) as h:
        await h.extend([{"n": 0}, {"n": 0}])
        for i in range(20):
            await h.clear()
            await h.append({"n": i})
            assert await h.count() == 1, i
            assert await h.messages() == [{"n": i}], i
            assert [(s.session_id, s.message_count) for s in await AsyncChatHistory.sessions(namespace, url=node)] == [
                ("c", 1)
            ], i


@pytest.mark.slow
@pytest.mark.parametrize("how", ["reads=leader", "after its own clear"])
async def test_reads_checked_against_the_leader_return_within_the_timeout_under_constant_clears(
    four: Cluster, namespace: str, tmp_path: Path, how: str
) -> None:
    """Another process extends a conversation by a pair of messages and clears it, again and
    again (a bounded loop, through the node leading the stream); this connection, on a node with
    no replica, reads it checked against the stream leader (``?reads=leader``, or after its own
    ``clear()``): every ``messages()``, ``messages(last=1)``, ``count()`` and ``sessions()``
    returns within its timeout a state the conversation had (empty, or one whole pair), or raises
    ``ServerUnavailable``. Before, a read whose leader's last message was cleared before a
    replica's answer reached it started over, each time with a new timeout, without bound."""
    sid = "churned"
    async with AsyncChatHistory(sid, namespace=namespace, url=four.urls[0], timeout=10) as first:
        await first.append({"r": -1, "n": 0})  # the stream exists: its leader can be found
    leader = four.node((await stream_info(four.url, stream_name(namespace)))["cluster"]["leader"])
    started, stop = tmp_path / "started", tmp_path / "stop"
    churn = subprocess.Popen(
        [sys.executable, "-m", "tests.chat_workers", "churn", leader.url, namespace, sid, "20000", str(started), str(stop)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    timeout = 1.0
    options = "&reads=leader" if how == "reads=leader" else ""
    url = f"{four.nodes[3].url}?tag=r{options}"
    loop = asyncio.get_running_loop()
    try:

        async def churning() -> bool:
            assert churn.poll() is None, churn.communicate()
            return started.exists()

        await until(churning, "the other process to churn the conversation", 30)
        async with AsyncChatHistory(sid, namespace=namespace, url=url, timeout=timeout) as h:
            if how == "after its own clear":
                await h.clear()
            answered = 0
            for _ in range(60):
                for name, read in (
                    ("messages", h.messages),
                    ("last=1", lambda: h.messages(last=1)),
                    ("count", h.count),
                    ("sessions", lambda: AsyncChatHistory.sessions(namespace, url=url)),
                ):
                    began = loop.time()
                    try:
                        got: Any = await read()
                    except ServerUnavailable:
                        got = None
                    else:
                        answered += 1
                    bound = _SESSIONS_TIMEOUT if name == "sessions" else timeout
                    assert loop.time() - began < bound + 1.0, f"{name} took {loop.time() - began:.1f} s"
                    if name == "messages" and got is not None:
                        assert got == [] or (len(got) == 2 and got[0]["r"] == got[1]["r"]), got
                    elif name == "last=1" and got is not None:
                        assert got == [] or (len(got) == 1 and got[0]["n"] == 1), got
                    elif name == "count" and got is not None:
                        assert got in (0, 2), got
                    elif got is not None:
                        assert [(x.session_id, x.message_count) for x in got] in ([], [(sid, 2)]), got
                assert churn.poll() is None, "the churn ended before the reads did: raise its rounds"
            assert answered > 0
    finally:
        stop.touch()
        try:
            churn.wait(30)
        finally:
            kill_all([churn])


# -- botwire serve ------------------------------------------------------------------------------
@pytest.mark.slow
async def test_reads_leader_through_botwire_serve_on_a_cluster(four: Cluster, namespace: str, serves: Serves) -> None:
    """``botwire serve`` given ``?reads=leader`` (on a node with no replica) passes it to the
    library: writes acknowledged to a client on another node are read, listed and counted through
    it, and a missing key reads as None."""
    serve = serves.start(f"{four.nodes[3].url}?tag=r&reads=leader")
    async with (
        AsyncMemory(namespace, url=four.urls[0], timeout=10) as writer,
        AsyncChatHistory("c", namespace=namespace, url=four.urls[0], timeout=10) as cw,
        AsyncMemory(namespace, url=serve.base, timeout=10) as reader,
        AsyncChatHistory("c", namespace=namespace, url=serve.base, timeout=10) as cr,
    ):
        for i in range(10):
            await writer.set("k", i)
            await cw.append({"i": i})
            assert await reader.get("k") == i and await reader.list_keys() == ["k"]
            assert await cr.messages(last=1) == [{"i": i}] and await cr.count() == i + 1
        assert await reader.get("never") is None
        await writer.delete("k")
        assert await reader.get("k") is None and await reader.list_keys() == []


async def test_reads_on_an_http_url_is_refused(http_server: str, namespace: str) -> None:
    """``?reads=`` (``replicas=``, ``tag=``) belongs to the NATS URL a ``botwire serve`` connects
    with; on a client's HTTP URL it was kept in the address and every request failed with
    ``ServerUnavailable`` ("answered 405")."""
    for option in ("reads=leader", "replicas=3", "tag=ssd"):
        with pytest.raises(InvalidArgument, match="apply to a NATS URL"):
            async with AsyncMemory(namespace, url=f"{http_server}?{option}", timeout=3) as m:
                await m.set("k", 1)


@pytest.mark.parametrize("reads", ["any", "leader"])
async def test_missing_and_deleted_keys_read_as_none_on_a_cluster(four: Cluster, namespace: str, reads: str) -> None:
    """On a node with no replica, a key never written, one deleted, and one of a namespace this
    connection never wrote to read as None (``reads=leader``: the leader's "no message" is no
    error)."""
    url = f"{four.nodes[3].url}?tag=r&reads={reads}"
    async with AsyncMemory(namespace, url=url, timeout=5) as m:
        assert await m.get("never") is None and not await m.contains("never")
        await m.set("k", 1)
        assert await m.delete("k")
        assert await m.get("k") is None and not await m.contains("k") and await m.list_keys() == []
        assert await m.get("never") is None
    async with AsyncMemory(namespace + "x", url=url, timeout=5) as fresh:
        assert await fresh.get("never") is None and await fresh.list_keys() == []
