"""``botwire serve`` operations: quota rejections show in ``/metrics``; the per-namespace memories
a server keeps are bounded (least recently used closed) and the data stays served."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from botwire_stream import AsyncMemory
from botwire_stream.server.rest import Namespaces
from tests.http_serve import serving
from tests.servers import NatsServer


def _count(text: str, route: str, status: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("botwire_http_requests_total{") and f'route="{route}"' in line and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_quota_rejections_are_counted_in_metrics(nats_server: NatsServer, tmp_path: Path, namespace: str) -> None:
    # quotas without auth: /metrics stays open (no key needed), the 'm-*' namespaces get 2 writes a day
    with serving(nats_server.url, tmp_path / "serve.log", extra=["--quota", "m-*=writes=2/day"]) as serve:
        base = serve.base
        before = httpx.get(f"{base}/metrics").text
        statuses = [httpx.put(f"{base}/memory/m-{namespace}/k{i}", json={"value": "v"}).status_code for i in range(4)]
        assert statuses == [200, 200, 429, 429]
        after = httpx.get(f"{base}/metrics").text
        assert _count(after, "/memory", "429") - _count(before, "/memory", "429") == 2
        assert _count(after, "/memory", "200") - _count(before, "/memory", "200") == 2
        assert 'botwire_http_errors_total{route="/memory",status="429"} 2.0' in after


async def test_namespaces_kept_are_bounded_and_evicted_ones_closed(url: str, namespace: str) -> None:
    spaces = Namespaces({"url": url}, max_open=3, grace=0)
    try:
        names = [f"{namespace}-{i}" for i in range(10)]
        opened = []
        for i, ns in enumerate(names):
            mem = spaces.memory(ns)
            opened.append(mem)
            await mem.set("k", i)
            assert len(spaces._memories) <= 3
        for _ in range(100):  # the evicted ones close once their grace (0 s here) is over
            if not spaces._retiring:
                break
            await asyncio.sleep(0.01)
        assert [m._closed for m in opened] == [True] * 7 + [False] * 3
        for i, ns in enumerate(names):  # every namespace is still served, reopened on demand
            assert await spaces.memory(ns).get("k") == i
            assert len(spaces._memories) <= 3
        spaces.memory(names[-1])  # a use makes it the most recently used: not the next evicted
        spaces.memory(f"{namespace}-new")
        assert names[-1] in spaces._memories
    finally:
        await spaces.close()
    async with AsyncMemory(names[0], url=url) as direct:
        assert await direct.get("k") == 0
