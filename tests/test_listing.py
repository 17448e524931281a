"""``list_keys`` from the server's subject index agrees with a plain scan of the namespace's log.

The reference is a scan of every message of the namespace in order (an ordered consumer): the
last record of each key decides whether it holds a value. Deletes, KV purges (a rollup marker),
subject purges (the messages gone), TTL expiry and a concurrent writer in another process are
all covered; pages (``limit``/``after``) concatenate to the whole listing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from fnmatch import fnmatchcase

import nats
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.js.api import ConsumerConfig

from botwire_stream import Memory
from botwire_stream.errors import InvalidArgument
from botwire_stream.keys import decode_key, encode_key
from tests.procs import ROOT
from tests.servers import NatsServer


def _bucket(namespace: str) -> tuple[str, str]:
    return f"KV_botwire_{namespace}", f"$KV.botwire_{namespace}."


def _holds_value(headers: dict[str, str] | None) -> bool:
    """A KV record is a value unless it is a delete/purge record or a server marker (expiry...)."""
    if not headers:
        return True
    return "Nats-Marker-Reason" not in headers and headers.get("KV-Operation") not in ("DEL", "PURGE")


async def _scan(url: str, namespace: str) -> list[str]:
    """Every key holding a value, by reading the namespace's whole log in order (the plain way)."""
    stream, prefix = _bucket(namespace)
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if (await js.stream_info(stream)).state.messages == 0:
            return []
        live: dict[str, bool] = {}
        sub = await js.subscribe(prefix + ">", ordered_consumer=True, config=ConsumerConfig(headers_only=True))
        while True:
            m = await sub.next_msg(timeout=5)
            live[m.subject] = _holds_value(m.headers)
            if m.metadata.num_pending == 0:
                break
        await sub.unsubscribe()
        return sorted(decode_key(s[len(prefix) :]) for s, v in live.items() if v)
    finally:
        await nc.close()


async def _raw(url: str, namespace: str, op: str, key: str) -> None:
    """What another NATS tool may do to the bucket: a KV purge (``nats kv purge``: a rollup
    record that removes the key's revisions) or a stream purge of the key's subject."""
    stream, prefix = _bucket(namespace)
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if op == "kvpurge":
            kv = await js.key_value(f"botwire_{namespace}")
            await kv.purge(encode_key(key))
        else:
            await js.purge_stream(stream, subject=prefix + encode_key(key))
    finally:
        await nc.close()


def _pages(m: Memory, pattern: str, limit: int) -> list[str]:
    out: list[str] = []
    after = None
    for _ in range(10_000):
        page = m.list_keys(pattern, limit=limit, after=after)
        assert len(page) <= limit
        if not page:
            return out
        out.extend(page)
        after = page[-1]
    raise AssertionError("paging did not end")


@pytest.fixture
def memory(nats_server: NatsServer, namespace: str) -> Iterator[Memory]:
    with Memory(namespace, url=nats_server.url) as m:
        yield m


KEYS = st.sampled_from([f"{p}:{i}" for p in ("a", "b:x", "b:y", "ab", "a:1") for i in range(4)])
OPS = st.lists(st.tuples(st.sampled_from(["set", "set", "set", "delete", "kvpurge", "subjpurge"]), KEYS), max_size=25)
PATTERNS = ["*", "a:*", "a:1*", "b:*", "b:?:*", "a*", "b:x:2", "zz:*"]


@given(OPS)
@settings(max_examples=30, deadline=None)
def test_listing_equals_a_scan_after_random_sets_deletes_and_purges(
    nats_server: NatsServer, ops: list[tuple[str, str]]
) -> None:
    ns = "t" + uuid.uuid4().hex[:16]
    with Memory(ns, url=nats_server.url) as m:
        m.set("zz", 0)  # the bucket exists even when every op is a purge
        for i, (op, key) in enumerate(ops):
            if op == "set":
                m.set(key, i)
            elif op == "delete":
                m.delete(key)
            else:
                asyncio.run(_raw(nats_server.url, ns, op, key))
        scan = asyncio.run(_scan(nats_server.url, ns))
        for pattern in PATTERNS:
            expected = [k for k in scan if fnmatchcase(k, pattern)]
            assert m.list_keys(pattern) == expected, pattern
            assert _pages(m, pattern, 2) == expected, pattern


async def _load(url: str, namespace: str, names: list[str]) -> None:
    """Write ``names`` (value 1) pipelined, in this order, as any NATS client could."""
    _, prefix = _bucket(namespace)
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(publish_async_max_pending=4000)
        for name in names:
            await js.publish_async(prefix + encode_key(name), b"1")
        await asyncio.wait_for(js.publish_async_completed(), 60)
    finally:
        await nc.close()


def test_thousands_of_interleaved_matches_are_listed_and_paged(memory: Memory, url: str, namespace: str) -> None:
    """More matches than one multi-last get answers (1024), spread among other keys."""
    memory.set("init", 0)
    mine = [f"user:42:k{i:05d}" for i in range(2600)]
    others = [f"user:{u}:k{i:05d}" for i in range(2600) for u in (7, 420)]
    asyncio.run(_load(url, namespace, [n for trio in zip(mine, others[::2], others[1::2], strict=True) for n in trio]))
    for i in range(0, 2600, 13):
        assert memory.delete(mine[i])
    expected = [k for i, k in enumerate(mine) if i % 13]
    assert memory.list_keys("user:42:*") == expected
    assert asyncio.run(_scan(url, namespace)) == sorted(expected + others + ["init"])
    assert _pages(memory, "user:42:*", 1000) == expected
    assert _pages(memory, "user:42:*", 777) == expected
    assert memory.list_keys("user:42:*", limit=0) == []
    assert memory.list_keys("user:42:*", after=expected[-1]) == []
    assert memory.list_keys("user:42:*", limit=3, after=expected[10]) == expected[11:14]
    assert memory.list_keys("user:42:k00001", limit=1) == ["user:42:k00001"]
    assert memory.list_keys("user:42:k00001", after="user:42:k00001") == []


def test_many_long_keys_are_listed(memory: Memory) -> None:
    """1,100 keys of 1,000 bytes: the subjects of one multi-last get stay under a 1 MiB request."""
    long = [f"long:{i:04d}:" + "x" * 990 for i in range(1100)]
    for k in long:
        memory.set(k, 1)
    assert memory.list_keys("long:*") == long
    assert _pages(memory, "long:*", 600) == long


@pytest.mark.slow
def test_expired_keys_are_never_listed(memory: Memory, url: str, namespace: str) -> None:
    for i in range(40):
        memory.set(f"s:{i:02d}", i, ttl=1 if i % 2 else None)
        memory.set(f"t:{i:02d}", i, ttl=1)
    deadline = time.monotonic() + 15
    while any(memory.get(f"t:{i:02d}") is not None for i in range(40)):
        assert time.monotonic() < deadline, "keys with ttl=1 did not expire within 15 s"
        time.sleep(0.1)
    for _ in range(3):  # right after the expiry (the server's markers still there) and later
        expected = [f"s:{i:02d}" for i in range(0, 40, 2)]
        assert memory.list_keys("s:*") == expected
        assert memory.list_keys("t:*") == []
        assert memory.list_keys() == asyncio.run(_scan(url, namespace)) == expected
        time.sleep(0.7)


@pytest.mark.slow
def test_a_listing_under_a_concurrent_writer_is_exact(memory: Memory, url: str, namespace: str) -> None:
    """While another process sets and deletes its keys, every listing holds every stable key,
    nothing that was never written, each key once and sorted; once it stops, exactly the scan."""
    stable = [f"p:{i:03d}" for i in range(0, 300, 2)]
    churn = [f"p:{i:03d}" for i in range(1, 300, 2)]
    for k in stable:
        memory.set(k, k)
    ops: list[list[object]] = []
    for r in range(6):
        ops += [["set", k, r] for k in churn] + [["delete", k] for k in churn[r % 2 :: 2]]
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.workers", "ops", url, namespace, json.dumps(ops)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        listings = 0
        deadline = time.monotonic() + 30
        while worker.poll() is None and time.monotonic() < deadline:
            got = memory.list_keys("p:*")
            assert got == sorted(set(got))
            assert set(stable) <= set(got) <= set(stable) | set(churn)
            listings += 1
        _, err = worker.communicate(timeout=30)
        assert worker.returncode == 0, err[-2000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert listings > 0
    final = memory.list_keys("p:*")
    assert final == asyncio.run(_scan(url, namespace))
    assert set(stable) < set(final)  # the writer's last round left half of its keys set


@pytest.mark.parametrize(
    ("limit", "after"), [(-1, None), (True, None), (1.5, None), ("3", None), (None, 3), (None, b"k")]
)
def test_bad_page_arguments_are_refused(memory: Memory, limit: object, after: object) -> None:
    with pytest.raises(InvalidArgument):
        memory.list_keys("*", limit=limit, after=after)  # type: ignore[arg-type]
