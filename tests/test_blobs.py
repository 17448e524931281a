"""Values larger than one message (chunked): overlapping writes and deletes from two processes
never leave the newest acknowledged value unreadable; replaced chunks are reclaimed; a value of
the full 64 MiB is read back whole through several batch replies."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest

from botwire_stream import AsyncMemory, Memory
from tests import procs
from tests.blob_workers import value_of
from tests.servers import NatsServer

MiB = 1024 * 1024
_MISSING = object()


def _race(url: str, namespace: str, tmp_path: Path, roles: tuple[str, str], sizes: tuple[int, int], trials: int) -> list[Any]:
    sync = tmp_path / "sync"
    sync.mkdir()
    a, b = roles
    commands = [
        [a, url, namespace, "k", str(trials), str(sizes[0]), str(sync), b, "0"],
        [b, url, namespace, "k", str(trials), str(sizes[1]), str(sync), a, "30"],
    ]
    return procs.run_together("tests.blob_workers", commands, sync / "go", timeout=120)


@pytest.mark.slow
def test_overlapping_big_sets_from_two_processes_keep_the_newest_value(url: str, namespace: str, tmp_path: Path) -> None:
    """Two processes set the same keys to chunked values at the same moments (1 MiB messages: 4 MiB
    and 1.5 MiB values): the value of the write with the higher revision is the one read, whole."""
    trials, sizes = 12, (4 * MiB, 3 * MiB // 2)
    revs_a, revs_b = _race(url, namespace, tmp_path, ("a", "b"), sizes, trials)
    with Memory(namespace, url=url) as memory:
        for i in range(trials):
            newest = ("a", sizes[0], revs_a[i]) if revs_a[i] > revs_b[i] else ("b", sizes[1], revs_b[i])
            expected = value_of(newest[0], i, newest[1])
            assert memory.get(f"k{i}") == expected, f"trial {i}: the newest acknowledged value is unreadable"
            trail = memory.revisions(f"k{i}")
            assert trail[-1].revision == newest[2]
            assert trail[-1].value == expected


@pytest.mark.slow
def test_delete_overlapping_a_big_set_never_breaks_the_new_value(url: str, namespace: str, tmp_path: Path) -> None:
    """A delete of an old chunked value racing a new chunked set: afterwards the key reads as the
    set's value when the set came last, as missing when the delete came last."""
    trials, size = 12, 4 * MiB
    with Memory(namespace, url=url) as memory:
        for i in range(trials):
            memory.set(f"k{i}", "o" * (2 * MiB))
    revs, deleted = _race(url, namespace, tmp_path, ("a", "del"), (size, 0), trials)
    assert all(deleted)
    with Memory(namespace, url=url) as memory:
        for i in range(trials):
            last = memory.revisions(f"k{i}")[-1]
            if last.op == "set":
                assert last.revision == revs[i]
                assert memory.get(f"k{i}") == value_of("a", i, size), f"trial {i}: the set's value is unreadable"
                assert last.value == value_of("a", i, size)
            else:
                assert last.op == "delete" and last.revision > revs[i]
                assert memory.get(f"k{i}", _MISSING) is _MISSING


async def _blob_messages(url: str, namespace: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(f"BOTWIRE_BLOBS_{namespace}")
        return info.state.messages
    finally:
        await nc.close()


def test_replaced_and_deleted_big_values_leave_no_chunks(url: str, namespace: str) -> None:
    with Memory(namespace, url=url) as memory:
        memory.set("big", "a" * (3 * MiB))
        memory.set("big", "b" * (2 * MiB))  # replaces a: its chunks go
        assert asyncio.run(_blob_messages(url, namespace)) == 3
        memory.set("big", "small")  # does not look at chunks: b's stay until the next big write or delete
        memory.set("other", "c" * (2 * MiB))
        memory.delete("big")
        assert memory.get("other") == "c" * (2 * MiB)
        assert asyncio.run(_blob_messages(url, namespace)) == 3  # only other's chunks are left


@pytest.mark.slow
def test_a_64_mib_value_is_read_back_whole_with_8_mib_messages(tmp_path: Path) -> None:
    """With the embedded server's 8 MiB max_payload, 64 MiB is 9 chunks: more bytes than one batch
    direct get reply carries, so the read pages."""
    server = NatsServer(tmp_path / "big", max_payload=8 * MiB).start()
    try:

        async def main() -> None:
            async with AsyncMemory("t" + uuid.uuid4().hex[:8], url=server.url) as memory:
                value = "v" * (64 * MiB - 2)
                rev = await memory.set("big", value)
                assert await memory.get("big") == value
                (revision,) = await memory.revisions("big")
                assert revision.revision == rev and revision.value == value

        asyncio.run(main())
    finally:
        server.stop()
