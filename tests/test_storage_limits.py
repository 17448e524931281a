"""Full disks and storage limits.

A full disk under the embedded server raises ``StorageFull`` (not a timeout), a write reported as
failed never appears, and writes work again by themselves once space is back (nats-server 2.15
keeps failing writes to a stream it once could not write until it restarts: the library restarts
it). At a storage limit, deletes and purges still work, and free the space they should.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from botwire_stream import ChatHistory, Memory
from botwire_stream.errors import QuotaExceeded, StorageFull
from botwire_stream.nats import embedded
from tests.mounts import fill, home_on_tmpfs
from tests.servers import NatsServer

USER = {"role": "user", "content": "before"}


@pytest.fixture
def small_disk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """BOTWIRE_HOME on a 8 MiB tmpfs of this test."""
    with home_on_tmpfs(tmp_path, monkeypatch, "8m") as home:
        yield home


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_full_disk_raises_storage_full_then_writes_recover_by_themselves(
    small_disk_home: Path, namespace: str
) -> None:
    home = small_disk_home
    with Memory(namespace, timeout=1.0) as memory, ChatHistory("s1", namespace=namespace, timeout=1.0) as chat:
        memory.set("before", 1)
        chat.append(USER)
        filler = fill(home.parent)

        started = time.monotonic()
        with pytest.raises(StorageFull, match="disk full: .* was not stored"):
            memory.set("during", "x" * 50_000)
        assert time.monotonic() - started < 3 * 2 * 1.0  # does not hang: one timeout, no retries
        with pytest.raises(StorageFull, match="disk full"):
            memory.set("during", "x" * 50_000)
        with pytest.raises(StorageFull, match="disk full"):
            chat.append({"role": "user", "content": "during " + "y" * 50_000})
        with pytest.raises(StorageFull, match="disk full"):  # a new namespace: its stream cannot be made
            with Memory(namespace + "-new", timeout=1.0) as other:
                other.set("k", 1)
        assert memory.get("before") == 1  # reads still work
        assert chat.messages() == [USER]

        filler.unlink()
        # Another process, which never saw the disk full, writes first: it finds out by itself.
        other = (
            "from botwire_stream import Memory\n"
            f"with Memory({namespace!r}, timeout=1.0) as m: m.set('other', 3)\n"
        )
        subprocess.run([sys.executable, "-c", other], check=True, timeout=60)
        memory.set("after", 2)
        chat.append({"role": "assistant", "content": "after"})

        assert memory.get("during") is None and memory.revisions("during") == []
        assert memory.list_keys() == ["after", "before", "other"]
        assert chat.messages() == [USER, {"role": "assistant", "content": "after"}]
    # A write reported as failed does not appear later either, after a restart of the server.
    embedded.stop(home)
    with Memory(namespace) as memory, ChatHistory("s1", namespace=namespace) as chat:
        assert memory.list_keys() == ["after", "before", "other"]
        assert [m["content"] for m in chat.messages()] == ["before", "after"]


@pytest.mark.timeout(60)
def test_server_start_on_a_full_disk_says_disk_full(small_disk_home: Path, namespace: str) -> None:
    filler = fill(small_disk_home.parent)
    started = time.monotonic()
    with pytest.raises(StorageFull, match="disk full: .* cannot start"):
        Memory(namespace)
    # Before: the server could not write its ports file, and the start timed out after 15 s.
    assert time.monotonic() - started < 10
    filler.unlink()
    with Memory(namespace) as memory:
        memory.set("k", 1)
        assert memory.get("k") == 1


# -- at the storage limit -------------------------------------------------------------------------
@pytest.fixture
def limited_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server whose JetStream may store 512 KiB in all, with 64 KiB messages (so that values over
    48 KiB are chunked)."""
    server = NatsServer(tmp_path / "limited", max_payload=64 * 1024, max_file_store=512 * 1024).start()
    yield server
    server.stop()


def fill_to_limit(memory: Memory) -> int:
    """Write 10 KB values until the server refuses one; how many were stored."""
    for i in range(1000):
        try:
            memory.set(f"k{i}", "x" * 10_000)
        except QuotaExceeded:
            return i
    raise AssertionError("the storage limit was never reached")


@pytest.mark.timeout(120)
def test_delete_works_at_the_storage_limit_and_frees_space(limited_server: NatsServer, namespace: str) -> None:
    with Memory(namespace, url=limited_server.url) as memory:
        memory.set("blob", "b" * 150_000)  # chunked: 4 messages in the companion stream
        stored = fill_to_limit(memory)
        assert stored > 10
        with pytest.raises(QuotaExceeded):
            memory.set("one-more", "x" * 10_000)

        assert memory.delete("k0") is True  # before: QuotaExceeded
        assert memory.get("k0") is None and "k0" not in memory
        assert [r.op for r in memory.revisions("k0")] == ["delete"]  # the delete is still recorded
        assert memory.delete("k0") is False
        assert memory.delete("blob") is True
        assert memory.get("blob") is None

        memory.set("one-more", "x" * 10_000)  # the deletes freed space
        assert memory.get("one-more") == "x" * 10_000
        assert memory.get("k1") == "x" * 10_000  # nothing else was removed
        assert len(memory.list_keys()) == stored  # k0 and blob gone, one-more added


@pytest.mark.timeout(120)
def test_chat_clear_works_at_the_storage_limit(limited_server: NatsServer, namespace: str) -> None:
    with Memory(namespace, url=limited_server.url) as memory:
        fill_to_limit(memory)
    with ChatHistory("s1", namespace=namespace, url=limited_server.url) as chat:
        with pytest.raises(QuotaExceeded):
            chat.append(USER)
        with Memory(namespace, url=limited_server.url) as memory:
            for i in range(5):
                assert memory.delete(f"k{i}") is True
        chat.append(USER)
        with Memory(namespace, url=limited_server.url) as memory:
            fill_to_limit(memory)
        chat.clear()  # a purge: works at the limit
        assert chat.messages() == []
