"""Attacks on ``botwire serve``: a burst of concurrent clients against a requests-per-second
quota, a key watch resumed across a serve restart, and values at and over the 64 MiB limit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from botwire_stream import Memory
from botwire_stream.memory import MAX_VALUE_BYTES
from tests.http_serve import Serve, Serves, serving
from tests.servers import NatsServer
from tests.sse import take_events

TEXT = {"content-type": "text/plain"}
RPS = 4


@pytest.fixture(scope="module")
def limited(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Serve, Serve]]:
    """Two serve processes on one NATS, 'rr-*' limited to RPS requests a second for every caller."""
    folder = tmp_path_factory.mktemp("attack")
    extra = ["--quota", f"rr-*=rps={RPS}", "--public", "rr-*=unlimited"]
    with serving(nats_server.url, folder / "one.log", extra=extra) as one, serving(nats_server.url, folder / "two.log", extra=extra) as two:
        yield one, two


@pytest.mark.slow
def test_concurrent_clients_on_two_servers_never_pass_the_requests_per_second_quota(limited: tuple[Serve, Serve], namespace: str) -> None:
    """40 requests at once from 20 threads, spread over two serve processes, a few bursts: in each
    burst no more are admitted than RPS per one-second window the burst overlapped (the counter is
    per UTC second, shared in NATS), the rest get 429 with Retry-After; none gets a 5xx."""
    name = f"rr-{namespace}/s"
    one, two = limited
    with httpx.Client(timeout=20) as client:
        for attempt in range(3):
            def hit(i: int) -> int:
                return client.get((one, two)[i % 2].stream(name)).status_code

            began = time.time()
            with ThreadPoolExecutor(20) as pool:
                codes = list(pool.map(hit, range(40)))
            ended = time.time()
            windows = int(ended) - int(began) + 1
            admitted = [c for c in codes if c != 429]
            assert set(admitted) <= {404}, codes  # the stream does not exist: 404, counted
            assert 1 <= len(admitted) <= RPS * windows, (attempt, len(admitted), windows)
            assert codes.count(429) >= 40 - RPS * windows
            time.sleep(max(0.0, int(ended) + 1 - time.time()))  # the next burst in a fresh second


@pytest.mark.slow
def test_a_key_watch_resumed_after_a_serve_restart_gets_each_change_once(url: str, namespace: str, serves: Serves) -> None:
    """An SSE watch reads three changes; serve is killed (SIGKILL); changes are made while it is
    down; a new serve process is asked with Last-Event-ID: every change after the last one read,
    in order, none repeated, then the live ones."""
    first = serves.start(url, log="one.log")
    with Memory(namespace, url=url) as mem, httpx.Client(timeout=20) as client:
        try:
            with client.stream("GET", f"{first.base}/v1/ns/{namespace}/watch", params={"pattern": "k*"}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                assert next(lines) == ": live"  # subscribed: the writes below are delivered
                for i in range(3):
                    mem.set(f"k{i}", i)
                seen = take_events(lines, "change", 3, "revision")
        finally:
            first.kill()
        assert [c["key"] for c in seen] == ["k0", "k1", "k2"]
        mem.set("k3", 3)
        mem.set("k0", "again")
        mem.delete("k1")
        mem.set("other", 1)  # not in the pattern
        second = serves.start(url, log="two.log")
        last = str(seen[-1]["revision"])
        with client.stream("GET", f"{second.base}/v1/ns/{namespace}/watch", params={"pattern": "k*"}, headers={"Last-Event-ID": last}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            resumed = take_events(lines, "change", 3, "revision")
            mem.set("k4", 4)
            resumed += take_events(lines, "change", 1, "revision")
    assert [(c["key"], c["op"]) for c in resumed] == [("k3", "set"), ("k0", "set"), ("k1", "delete"), ("k4", "set")]
    assert resumed[1]["value"] == "again"
    revisions = [int(str(c["revision"])) for c in seen + resumed]
    assert revisions == sorted(set(revisions))


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_64_mib_value_over_http_is_stored_one_byte_more_is_refused_and_memory_stays_bounded(url: str, namespace: str, serves: Serves) -> None:
    """PUT of a value that encodes to exactly 64 MiB: stored and read back; one byte more: 413
    value_too_large, nothing written; the serve process's peak memory grows by less than three
    copies of the body."""
    serve = serves.start(url)
    base = f"{serve.base}/v1/ns/{namespace}/keys"
    text = "x" * (MAX_VALUE_BYTES - 2)  # its JSON: the quotes and the text, 64 MiB
    with httpx.Client(timeout=120) as client:
        assert client.put(f"{base}/small", json={"value": 1}).status_code == 200  # warm
        before = _peak_rss(serve.proc.pid)
        body = b'{"value": "' + text.encode() + b'"}'
        r = client.put(f"{base}/big", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text[:300]
        grown = _peak_rss(serve.proc.pid) - before
        assert grown < 3 * len(body), f"peak memory grew by {grown / len(body):.1f} bodies"
        over = b'{"value": "' + text.encode() + b'x"}'
        r = client.put(f"{base}/over", content=over, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "value_too_large", r.text[:300]
    del body, over
    with Memory(namespace, url=url, timeout=60) as mem:
        assert mem.get("big") == text
        assert mem.get("over") is None and mem.list_keys() == ["big", "small"]


@pytest.mark.slow
def test_a_conversation_feed_resumed_after_a_serve_restart_gets_each_message_once(url: str, namespace: str, serves: Serves) -> None:
    """The same for a conversation's SSE feed (``/chats/<session>/events``): messages appended
    while serve was down come once, in order, after the Last-Event-ID, then the live ones."""
    from botwire_stream import ChatHistory

    first = serves.start(url, log="one.log")
    chat = ChatHistory("s1", namespace=namespace, url=url)
    try:
        with httpx.Client(timeout=20) as client:
            try:
                with client.stream("GET", f"{first.base}/v1/ns/{namespace}/chats/s1/events") as r:
                    assert r.status_code == 200
                    lines = r.iter_lines()
                    assert next(lines) == ": live"
                    for i in range(2):
                        chat.append({"role": "user", "content": f"m{i}"})
                    seen = take_events(lines, "message", 2, "seq")
            finally:
                first.kill()
            for i in range(2, 5):
                chat.append({"role": "user", "content": f"m{i}"})
            second = serves.start(url, log="two.log")
            last = str(seen[-1]["seq"])
            with client.stream("GET", f"{second.base}/v1/ns/{namespace}/chats/s1/events", headers={"Last-Event-ID": last}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                resumed = take_events(lines, "message", 3, "seq")
                chat.append({"role": "user", "content": "m5"})
                resumed += take_events(lines, "message", 1, "seq")
    finally:
        chat.close()
    contents = [m["message"]["content"] for m in seen + resumed]  # type: ignore[index]
    assert contents == [f"m{i}" for i in range(6)]
    seqs = [int(str(m["seq"])) for m in seen + resumed]
    assert seqs == sorted(set(seqs))
