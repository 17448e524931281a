"""The hosted wire format's ``created_at``/``updated_at`` come with the value (one direct get):
exact beyond the kept revisions, kept by library updates, reset by a delete."""

from __future__ import annotations

import asyncio

import httpx

from botwire_stream import AsyncMemory


def test_created_at_outlives_the_kept_revisions(http_server: str, namespace: str) -> None:
    base = f"{http_server}/memory/{namespace}"
    with httpx.Client() as http:
        assert http.put(f"{base}/k", json={"value": "v0"}).status_code == 200
        first = http.get(f"{base}/k").json()
        assert first["created_at"] == first["updated_at"]
        for i in range(1, 21):  # more writes than the bucket keeps revisions of (16)
            assert http.put(f"{base}/k", json={"value": f"v{i}"}).status_code == 200
        last = http.get(f"{base}/k").json()
        assert last["value"] == "v20"
        assert last["created_at"] == first["created_at"]  # the key's first write, not the oldest kept
        assert last["updated_at"] > first["updated_at"]
        assert http.delete(f"{base}/k").status_code == 200
        assert http.put(f"{base}/k", json={"value": "new"}).status_code == 200
        renewed = http.get(f"{base}/k").json()
        assert renewed["created_at"] == renewed["updated_at"] > last["updated_at"]  # created again


def test_library_updates_carry_the_creation_time_on(http_server: str, url: str, namespace: str) -> None:
    base = f"{http_server}/memory/{namespace}"

    async def library(step: str) -> None:
        async with AsyncMemory(namespace, url=url) as mem:
            if step == "update":
                await mem.update("lib", lambda v: v + "+")
            else:
                assert await mem.get("lib") == step

    with httpx.Client() as http:
        assert http.put(f"{base}/lib", json={"value": "one"}).status_code == 200
        first = http.get(f"{base}/lib").json()
        assert http.put(f"{base}/lib", json={"value": "two"}).status_code == 200  # carries created_at
        asyncio.run(library("two"))  # what the hosted format wrote, Memory reads
        for _ in range(18):  # more than the kept revisions: updates (conditional) carry it on
            asyncio.run(library("update"))
        got = http.get(f"{base}/lib").json()
        assert got["value"] == "two" + "+" * 18 and got["created_at"] == first["created_at"]
        assert got["updated_at"] > first["updated_at"]
