"""Quotas of ``botwire serve``, counted in NATS: the N+1th write of the day gets 429 (with
``Retry-After`` and ``RateLimit-*``) and writes nothing, across two serve processes; reads stay
unlimited; a write refused as bad input does not spend the quota."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from botwire_stream import Memory
from tests.http_serve import Serve, serving
from tests.servers import NatsServer
from tests.test_auth import bearer, botwire, new_key
from tests.waits import sigstop

TEXT = {"content-type": "text/plain"}


@pytest.fixture(scope="module")
def pair(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Serve, Serve]]:
    """Two serve processes on one NATS: 'q-*' public with 5 writes a day, 'h-*' public with the
    hosted preset, 'r-*' limited to 3 requests a second for every caller, 'b-*' to 20 kB."""
    folder = tmp_path_factory.mktemp("quota")
    extra = [
        "--public",
        "q-*=writes=5/day",
        "--public",
        "h-*",
        "--quota",
        "r-*=rps=3",
        "--public",
        "r-*=unlimited",
        "--public",
        "b-*=bytes=20KB",
    ]
    with (
        serving(nats_server.url, folder / "one.log", extra=extra) as one,
        serving(nats_server.url, folder / "two.log", extra=extra) as two,
    ):
        yield one, two


def test_the_n_plus_1th_write_of_the_day_gets_429_and_writes_nothing_across_two_servers(
    pair: tuple[Serve, Serve], namespace: str
) -> None:
    one, two = pair
    name = f"q-{namespace}/log"
    assert httpx.put(one.stream(name), content=b"0", headers=TEXT).status_code == 201  # write 1
    assert httpx.post(two.stream(name), content=b"bad").status_code == 400  # no content-type: not spent
    for i in range(1, 5):  # writes 2..5, alternating servers
        got = httpx.post((one, two)[i % 2].stream(name), content=str(i).encode(), headers=TEXT)
        assert got.status_code == 204, got.text
        assert got.headers["ratelimit-limit"] == "5" and got.headers["ratelimit-remaining"] == str(5 - (i + 1))
    for serve in (one, two):  # the 6th write, on either server
        refused = httpx.post(serve.stream(name), content=b"X", headers=TEXT)
        assert refused.status_code == 429
        assert 0 < int(refused.headers["retry-after"]) <= 86400
        assert refused.headers["ratelimit-remaining"] == "0" and refused.headers["ratelimit-limit"] == "5"
        assert 0 < int(refused.headers["ratelimit-reset"]) <= 86400
    assert httpx.put(one.stream(f"q-{namespace}/other"), content=b"X", headers=TEXT).status_code == 429
    assert httpx.head(two.stream(f"q-{namespace}/other")).status_code == 404  # not created
    for _ in range(30):  # reads stay unlimited
        got = httpx.get(two.stream(name))
        assert got.status_code == 200 and got.content == b"01234"
        assert "ratelimit-limit" not in got.headers  # not counted at all
    other = f"q-{namespace}x/log"  # another namespace has its own count
    assert httpx.put(one.stream(other), content=b"0", headers=TEXT).status_code == 201


def test_the_hosted_preset_allows_1000_writes_a_day(pair: tuple[Serve, Serve], namespace: str) -> None:
    got = httpx.put(pair[0].stream(f"h-{namespace}/s"), content=b"0", headers=TEXT)
    assert got.status_code == 201 and got.headers["ratelimit-limit"] == "1000"
    assert got.headers["ratelimit-remaining"] == "999"


def test_a_requests_per_second_limit_refuses_bursts_with_retry_after(pair: tuple[Serve, Serve], namespace: str) -> None:
    one, two = pair
    stream = f"r-{namespace}/s"
    statuses = []
    start = time.time()
    with httpx.Client() as a, httpx.Client() as b:
        for i in range(12):  # a burst over both servers: at most 3 pass per 1 s window it spans
            got = (a, b)[i % 2].get(((one, two)[i % 2]).stream(stream))
            statuses.append(got.status_code)
            if got.status_code == 429:
                assert got.headers["retry-after"] == "1" and got.headers["ratelimit-limit"] == "3"
    windows = int(time.time()) - int(start) + 1
    assert statuses.count(404) <= 3 * windows and set(statuses) <= {404, 429}
    assert 429 in statuses or windows >= 4


def test_a_key_has_its_own_writes_per_day(url: str, nats_server: NatsServer, tmp_path: Path, namespace: str) -> None:
    key = new_key(url, namespace, extra=("--writes-per-day", "2"))
    assert json.loads(botwire("keys", "list", "--url", url, "--json").stdout)
    with serving(url, tmp_path / "serve.log", extra=["--auth"]) as serve:
        stream = serve.stream(f"{namespace}/s")
        assert httpx.put(stream, content=b"a", headers={**TEXT, **bearer(key)}).status_code == 201
        assert httpx.post(stream, content=b"b", headers={**TEXT, **bearer(key)}).status_code == 204
        assert httpx.post(stream, content=b"c", headers={**TEXT, **bearer(key)}).status_code == 429
        other = new_key(url, namespace)  # another key to the same namespace is not limited by it
        assert httpx.post(stream, content=b"d", headers={**TEXT, **bearer(other)}).status_code == 204
        assert httpx.get(stream, headers=bearer(key)).content == b"abd"


def test_a_namespace_over_its_bytes_takes_no_more_writes_but_reads(
    pair: tuple[Serve, Serve], url: str, namespace: str
) -> None:
    one, two = pair
    ns = f"b-{namespace}"
    assert httpx.put(one.stream(f"{ns}/s"), content=b"0", headers=TEXT).status_code == 201  # under the limit
    with Memory(ns, url=url) as memory:
        memory.set("big", "x" * 30_000)  # the namespace now holds over 20 kB
    for serve in (one, two):
        deadline = time.monotonic() + 10  # each server re-reads a namespace's size at most once a second
        while (got := httpx.post(serve.stream(f"{ns}/s"), content=b"1", headers=TEXT)).status_code != 429:
            assert got.status_code == 204 and time.monotonic() < deadline
            time.sleep(0.2)
        assert "limit of 20000" in got.text and got.headers["retry-after"]
    before = httpx.get(one.stream(f"{ns}/s")).content
    for serve in (one, two):
        assert httpx.post(serve.stream(f"{ns}/s"), content=b"2", headers=TEXT).status_code == 429
    assert httpx.get(two.stream(f"{ns}/s")).content == before  # reads go on; the refused writes wrote nothing


@pytest.mark.slow
def test_when_nats_cannot_count_a_write_is_refused_with_503_not_passed(own_server: NatsServer, tmp_path: Path) -> None:
    with serving(own_server.url, tmp_path / "serve.log", extra=["--public", "q-*=writes=5/day"]) as serve:
        stream = serve.stream("q-x/s")
        assert httpx.put(stream, content=b"0", headers=TEXT).status_code == 201
        sigstop(own_server.pid)  # NATS hangs: the count cannot be taken
        try:
            start = time.monotonic()
            got = httpx.post(stream, content=b"1", headers=TEXT, timeout=60)
            assert got.status_code == 503 and got.headers["retry-after"] == "1"
            assert time.monotonic() - start < 3 * 5.0  # does not hang (NATS request timeout: 5 s)
        finally:
            os.kill(own_server.pid, signal.SIGCONT)
        assert httpx.get(stream).content == b"0"  # the refused write wrote nothing


def test_malformed_limits_stop_serve_at_start(url: str) -> None:
    for bad in (
        ["--public", "q-*=writes=many"],
        ["--quota", "q-*"],
        ["--quota", "q-*=rps=5/day"],
        ["--public", "=hosted"],
    ):
        done = botwire("serve", "--url", url, "--port", "1", *bad, check=False)
        assert done.returncode == 2 and done.stderr.startswith("error: "), (bad, done.stderr)
