"""A namespace whose streams another client deleted (an operator's ``nats stream rm``,
``js.delete_stream`` from a second connection) while this process holds it open: its next write
makes the stream again, as the first write to a new namespace does, and is stored there.

The contract (../shared/CONTRACT.md) promises nothing about deleting a namespace, and the library
has no call for it: the README already says a namespace deleted meanwhile is "made anew" by a
write (the cache follows the new one). Before, the connection remembered that it had made the
stream and every write was retried until its timeout, then raised ``OutcomeUnknown`` (also for a
new ``Memory`` of that namespace in the same process: they share the pooled connection)."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, ChatHistory, Memory, keys, portal
from botwire_stream.nats import materialised as mat
from botwire_stream.nats.chatlog import stream_name
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve
from consumers.runtime import status
from tests import procs
from tests.cluster import Cluster, stream_info
from tests.servers import NatsServer
from tests.waits import sigstop, until


@pytest.fixture
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("deleted-namespace"))
    try:
        yield c.start()
    finally:
        c.stop()


async def _delete(url: str, *streams: str, patient: bool = False, absent_ok: bool = False) -> None:
    """Delete ``streams`` from a connection of the test's own (another client); ``patient``: asked
    again within 30 s while the cluster elects a leader (a node stopped); ``absent_ok``: a stream
    not made again since the last delete is no failure."""
    nc = await nats.connect(url.split(","), connect_timeout=2)
    try:
        js = nc.jetstream()
        for stream in streams:
            if not patient:
                try:
                    assert await js.delete_stream(stream)
                except nats.js.errors.NotFoundError:
                    assert absent_ok, f"{stream} does not exist"
                continue

            async def gone(stream: str = stream) -> bool:
                try:
                    return await asyncio.wait_for(js.delete_stream(stream), 2)
                except nats.js.errors.NotFoundError:
                    return True  # deleted by a try whose reply was lost
                except (nats.errors.Error, asyncio.TimeoutError):
                    return False

            await until(gone, f"deleting {stream}", bound=30, every=0.2)
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


async def _every_read_is_empty(url: str, nats_url: str, namespace: str) -> None:
    """Each read of a namespace deleted under an open Memory/ChatHistory answers as a namespace
    never written does (None, [], 0, False), and a write after it is stored."""
    kv, chat = f"KV_botwire_{namespace}", stream_name(namespace)
    async with (
        AsyncMemory(namespace, url=url, timeout=5) as m,
        AsyncChatHistory("c", namespace=namespace, url=url, timeout=5) as h,
    ):
        await m.set("k", 1)
        await h.extend([{"n": 1}, {"n": 2}])
        assert await m.get("k") == 1 and await h.count() == 2  # both streams read (and so made)

        await _delete(nats_url, kv, chat)
        assert await m.get("k") is None
        assert await m.get("k", "dflt") == "dflt"
        assert not await m.contains("k")
        assert await m.list_keys() == [] and await m.list_keys("k*", limit=5) == []
        assert await m.revisions("k") == []
        assert await m.get("k", at=datetime.now(UTC)) is None
        assert await h.messages() == [] and await h.messages(last=1) == []
        assert await h.entries() == [] and await h.count() == 0
        if not url.startswith("http"):  # served over NATS only
            assert await h.last_summary() is None
        assert await AsyncChatHistory.sessions(namespace, url=url) == []

        await m.set("k", 2)
        await h.append({"n": 3})
        assert await m.get("k") == 2 and await m.list_keys() == ["k"] and await m.revisions("k") != []
        assert await h.messages() == [{"n": 3}] and await h.count() == 1
        assert [s.session_id for s in await AsyncChatHistory.sessions(namespace, url=url)] == ["c"]


async def test_reads_of_a_namespace_deleted_by_another_client_are_empty(nats_server: NatsServer, namespace: str) -> None:
    await _every_read_is_empty(nats_server.url, nats_server.url, namespace)


@pytest.mark.slow
async def test_reads_of_a_namespace_deleted_by_another_client_are_empty_on_a_cluster(
    three: Cluster, namespace: str
) -> None:
    """The same on a 3-node cluster, where this connection's writes make reads check with the
    stream leader (count, listings against the sequence it wrote)."""
    await _every_read_is_empty(three.url, three.url, namespace)


async def test_http_reads_of_a_namespace_deleted_by_another_client_are_empty(
    nats_server: NatsServer, http_server: str, namespace: str
) -> None:
    """The same through ``botwire serve`` (its connection made the streams)."""
    await _every_read_is_empty(http_server, nats_server.url, namespace)


def test_sync_reads_of_a_namespace_deleted_by_another_client_are_empty(nats_server: NatsServer, namespace: str) -> None:
    """The sync faces: two sync Memory objects, a ChatHistory and an AsyncMemory run on the
    portal loop, all on the one connection of the process's sync faces."""
    url = nats_server.url
    with (
        Memory(namespace, url=url, timeout=5) as m,
        Memory(namespace, url=url, timeout=5) as other,
        ChatHistory("c", namespace=namespace, url=url, timeout=5) as h,
    ):
        m.set("k", 1)
        h.append({"n": 1})
        assert other.get("k") == 1
        asyncio.run(_delete(url, f"KV_botwire_{namespace}", stream_name(namespace)))
        assert m.get("k") is None and "k" not in m and m.list_keys() == [] and m.revisions("k") == []
        assert h.messages() == [] and len(h) == 0 and ChatHistory.sessions(namespace, url=url) == []
        assert other.get("k") is None

        async def async_face() -> tuple[Any, list[str]]:  # an AsyncMemory on the same (portal) connection
            async with AsyncMemory(namespace, url=url, timeout=5) as am:
                return await am.get("k"), await am.list_keys()

        assert portal.call(async_face) == (None, [])
        other.set("k", 2)
        h.append({"n": 2})
        assert m.get("k") == 2 and h.messages() == [{"n": 2}] and m.list_keys() == ["k"]


async def test_the_keys_or_the_chat_stream_deleted_alone_leaves_the_other_as_it_was(
    nats_server: NatsServer, namespace: str
) -> None:
    url = nats_server.url
    kv, chat = f"KV_botwire_{namespace}", stream_name(namespace)
    async with (
        AsyncMemory(namespace, url=url, timeout=5) as m,
        AsyncChatHistory("c", namespace=namespace, url=url, timeout=5) as h,
    ):
        await m.set("k", 1)
        await h.append({"n": 1})
        await _delete(url, kv)
        assert await m.get("k") is None and await m.list_keys() == []
        assert await h.messages() == [{"n": 1}] and await h.count() == 1
        await m.set("k", 2)
        await _delete(url, chat)
        assert await h.messages() == [] and await h.count() == 0
        assert await m.get("k") == 2 and await m.list_keys() == ["k"]
        await h.append({"n": 2})
        assert await h.messages() == [{"n": 2}] and await m.get("k") == 2


async def test_a_key_set_with_a_ttl_after_the_stream_is_made_again_expires(nats_server: NatsServer, namespace: str) -> None:
    """The stream made again keeps per-message TTLs (its config is the one it was opened with)."""
    url = nats_server.url
    async with AsyncMemory(namespace, url=url, timeout=5) as m:
        await m.set("old", 1, ttl=3600)
        await _delete(url, f"KV_botwire_{namespace}")
        await m.set("t", 1, ttl=1)
        await m.set("kept", 2)
        assert await m.get("t") == 1 and await m.get("old") is None

        async def expired() -> bool:
            return await m.get("t") is None

        await until(expired, "the key set with ttl=1 expiring", bound=15)
        assert await m.list_keys() == ["kept"]
        info = await stream_info(url, f"KV_botwire_{namespace}")
        assert info["config"]["allow_msg_ttl"] is True


@pytest.mark.slow
async def test_a_delete_racing_writes_of_two_processes_loses_no_write_sent_after_it(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    """Two processes set keys and append messages while this one deletes both streams a few
    times: no write fails (no OutcomeUnknown, no hang), and each one sent after a delete ended is
    read back by the next read here (before the next delete), and at the end (after the last)."""
    url = nats_server.url
    kv, chat = f"KV_botwire_{namespace}", stream_name(namespace)
    go = tmp_path / "go"
    commands = [["write", url, namespace, tag, "800", str(go)] for tag in ("a", "b")]
    writers = asyncio.ensure_future(asyncio.to_thread(procs.run_together, "tests.deleted_workers", commands, go))
    reads: list[tuple[float, float, set[str], set[tuple[str, int]]]] = []
    async with (
        AsyncMemory(namespace, url=url, timeout=5) as m,
        AsyncChatHistory("c", namespace=namespace, url=url, timeout=5) as h,
    ):

        async def started() -> bool:
            return go.exists() or writers.done()

        await until(started, "the writers starting", bound=60)
        deleted = 0.0
        for _ in range(6):
            if writers.done():
                break
            await asyncio.sleep(0.15)
            await _delete(url, kv, chat, absent_ok=True)
            deleted = time.monotonic()
            await asyncio.sleep(0.15)
            read = time.monotonic()
            listed = set(await m.list_keys())
            said = {(x["t"], x["j"]) for x in await h.messages()}
            reads.append((deleted, read, listed, said))
        results = await writers
        reads.append((deleted, math.inf, set(await m.list_keys()), {(x["t"], x["j"]) for x in await h.messages()}))
    assert len(reads) > 1, "the writers ended before the first delete"
    checked = 0
    for tag, writes in zip(("a", "b"), results, strict=True):
        assert len(writes) == 800
        for j, sent, acked, sent2, acked2 in writes:
            for after, before, listed, said in reads:
                if after < sent and acked < before:
                    assert f"{tag}-{j}" in listed, (tag, j, "set after a delete, then lost")
                    checked += 1
                if after < sent2 and acked2 < before:
                    assert (tag, j) in said, (tag, j, "appended after a delete, then lost")
    lost = sum(f"{tag}-{j}" not in reads[-1][2] for tag, ws in zip(("a", "b"), results, strict=True) for j, *_ in ws)
    assert checked and lost, (checked, lost, len(reads))  # writes followed deletes, and deletes took writes


@pytest.mark.slow
async def test_a_namespace_deleted_while_a_node_is_stopped_is_made_again(three: Cluster, namespace: str) -> None:
    """On a 3-node cluster, with one node SIGSTOPped (it keeps the interest its replicas had in
    the deleted streams' subjects: requests routed to it get no answer, not "no responders"): the
    reads of this connection (to the other two nodes) answer empty and its writes make the
    streams again (3 replicas), within their timeout; after SIGCONT the writes are read back."""
    kv, chat = f"KV_botwire_{namespace}", stream_name(namespace)
    frozen = three.nodes[2]
    url = ",".join(n.url for n in three.nodes[:2])
    async with (
        AsyncMemory(namespace, url=url, timeout=10) as m,
        AsyncChatHistory("c", namespace=namespace, url=url, timeout=10) as h,
    ):
        await m.set("k", 1)
        await h.append({"n": 1})
        sigstop(frozen.pid)
        try:
            await _delete(url, kv, chat, patient=True)
            assert await m.get("k") is None and await m.list_keys() == [] and await h.messages() == []
            await m.set("k", 2)
            await h.append({"n": 2})
            # reads of the new streams now may meet the frozen node, as any read does
            # (tests/test_qa_cluster_reads.py): ServerUnavailable at their timeout then
        finally:
            frozen.send(signal.SIGCONT)
        three.wait_healthy()
        await m.set("j", 3)
        await h.append({"n": 3})
        assert await m.list_keys() == ["j", "k"] and await m.get("k") == 2
        assert await h.messages() == [{"n": 2}, {"n": 3}] and await h.count() == 2
        for stream in (kv, chat):
            info = await stream_info(three.url, stream)
            assert info["config"]["num_replicas"] == 3, info


async def _materialiser_caught_up(url: str, namespace: str) -> bool:
    for s in await status(url):
        if s.name == "botwire-materialise" and s.stream == stream_name(namespace):
            return s.pending == 0 and s.ack_pending == 0 and s.ack_floor == s.stream_last > 0
    return False


@pytest.mark.slow
async def test_a_materialiser_running_while_the_chat_stream_is_deleted_and_made_again(
    nats_server: NatsServer, namespace: str
) -> None:
    """``botwire consume materialise`` runs while the conversation log is deleted and made again
    by the next append: reads never serve the old log's chunks as the new log's messages, the
    materialiser keeps the new log (its consumer made again) and lists only the new conversations,
    and it ends on SIGTERM with status 0 and no traceback."""
    url = nats_server.url
    proc = subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "consume", "materialise", "-n", namespace, "--url", url],
        cwd=procs.ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with (
            AsyncChatHistory("s", namespace=namespace, url=url, timeout=5) as s,
            AsyncChatHistory("t", namespace=namespace, url=url, timeout=5) as t,
        ):
            await s.extend([{"n": i} for i in range(5)])
            async with AsyncChatHistory("u", namespace=namespace, url=url, timeout=5) as u:
                await u.append({"n": "u"})  # a conversation of the old log only
            await until(lambda: _materialiser_caught_up(url, namespace), "the materialiser catching up", 30)
            listed = await AsyncChatHistory.sessions(namespace, url=url)
            assert sorted((x.session_id, x.message_count) for x in listed) == [("s", 5), ("u", 1)]
            await _delete(url, stream_name(namespace))
            assert await s.messages() == []
            await t.append({"n": "t"})  # makes the log again: sequences start anew
            await s.append({"n": "again"})
            assert await s.messages() == [{"n": "again"}] and await t.messages() == [{"n": "t"}]
            await until(lambda: _materialiser_caught_up(url, namespace), "the materialiser keeping the new log", 30)
            assert proc.poll() is None
            assert await s.messages() == [{"n": "again"}] and await t.messages() == [{"n": "t"}]
            listed = await AsyncChatHistory.sessions(namespace, url=url)
            assert sorted((x.session_id, x.message_count) for x in listed) == [("s", 1), ("t", 1)]
            conn = await acquire(resolve(url))
            try:  # materialised anew: the chunks hold the new log's messages only
                for session, body in (("s", {"n": "again"}), ("t", {"n": "t"})):
                    chunks = (await mat.read_chain(conn, namespace, keys.encode_key(session), 5.0))[1]
                    assert [json.loads(d) for c in chunks for d in c.data] == [body]
            finally:
                await release(conn)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]


@pytest.mark.slow
async def test_an_audit_running_while_the_namespace_is_deleted_and_made_again_writes_the_new_events(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    """``botwire consume audit`` (nats-py pulls, not raw) while both streams are deleted and made
    again by the next writes: it goes on, writes the new streams' events too, and ends on SIGTERM
    with status 0 and no traceback."""
    url, out = nats_server.url, tmp_path / "audit"
    proc = subprocess.Popen(
        [sys.executable, "-m", "botwire_stream", "consume", "audit", "-n", namespace, "--url", url, "--dir", str(out)],
        cwd=procs.ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def written() -> list[tuple[str, Any]]:
        return [
            (r["op"], json.loads(r["data"]))
            for path in sorted(out.glob("audit-*.jsonl"))
            for r in map(json.loads, path.read_text().splitlines())
        ]

    async def has(n: int) -> bool:
        assert proc.poll() is None
        return len(written()) >= n

    try:
        async with (
            AsyncMemory(namespace, url=url, timeout=5) as m,
            AsyncChatHistory("s", namespace=namespace, url=url, timeout=5) as h,
        ):
            await m.set("k", 1)
            await h.append({"n": 1})
            await until(lambda: has(2), "the first events written", 30)
            await _delete(url, f"KV_botwire_{namespace}", stream_name(namespace))
            await m.set("k", 2)
            await h.append({"n": 2})
            await until(lambda: has(4), "the new streams' events written", 30)
        assert sorted(written(), key=str) == sorted([("set", 1), ("append", {"n": 1}), ("set", 2), ("append", {"n": 2})], key=str)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
