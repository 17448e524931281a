"""QA of full disks, storage limits, settings and start errors (issue 16 items 8, 9, 11, 13).

Each test here reproduces a defect found after the first fixes; real nats-servers and real tmpfs
mounts (root only: the tests skip with the reason elsewhere), no mocks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from botwire_stream import ChatHistory, Memory
from botwire_stream.errors import InvalidArgument, QuotaExceeded, StorageFull
from tests.mounts import fill, home_on_tmpfs
from tests.servers import NatsServer

MB = 1_000_000
# The calls' timeout here: these tests prove that writes fail with the right error and recover,
# not how fast. 1 s was too short on a loaded CI machine (4 xdist workers on 2 cores): a write
# meant to succeed raised ServerUnavailable "did not answer within 1 s".
TIMEOUT = 5.0
USER = {"role": "user", "content": "hello"}


@pytest.fixture
def disk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """BOTWIRE_HOME on a 32 MiB tmpfs of this test."""
    with home_on_tmpfs(tmp_path, monkeypatch, "32m") as home:
        yield home


def free_up_to(filler: Path, free: int) -> None:
    """Shrink the filler so that about ``free`` bytes of its disk are free."""
    st = os.statvfs(filler.parent)
    now = st.f_bavail * st.f_frsize
    os.truncate(filler, max(0, filler.stat().st_size - (free - now)))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_writes_recover_when_space_comes_back_in_steps(disk_home: Path, namespace: str) -> None:
    """A server restarted while the disk is still nearly full must not keep refusing writes once
    space is back. nats-server sizes JetStream's storage limit at start to 75% of the free space
    (measured: 'Max Storage: 2.25 MB' with 3 MiB free and 8 MB stored), so the library's own
    restart on a nearly full disk left every write failing with QuotaExceeded, for good."""
    with Memory(namespace, timeout=TIMEOUT) as memory:
        for i in range(8):
            memory.set(f"k{i}", str(i) * MB)  # 8 MB stored
        filler = fill(disk_home.parent)
        with pytest.raises(StorageFull):
            memory.set("during", "x" * 10_000)

        free_up_to(filler, 3 * 1024 * 1024 // 2)  # a little space back: the server is restarted
        with pytest.raises(StorageFull, match="disk full"):  # JetStream keeps a quarter of the disk
            memory.set("during", "x" * MB)

        filler.unlink()  # all space back
        for i in range(6):  # nats-server checks its storage limit against usage it updates lazily
            memory.set(f"after{i}", str(i) * MB)
            time.sleep(0.3)
        assert memory.get("during") is None
        assert memory.list_keys() == sorted([f"k{i}" for i in range(8)] + [f"after{i}" for i in range(6)])
        assert all(memory.get(f"k{i}") == str(i) * MB for i in range(8))
        assert all(memory.get(f"after{i}") == str(i) * MB for i in range(6))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_disk_filled_by_the_store_is_freed_by_deletes(disk_home: Path, namespace: str) -> None:
    """When the embedded server's own data fills its disk, deleting keys and clearing
    conversations frees space, and the refusal says 'disk full' (the user cannot 'raise limits')."""
    with Memory(namespace, timeout=TIMEOUT) as memory, ChatHistory("s", namespace=namespace, timeout=TIMEOUT) as chat:
        stored = []
        for i in range(400):
            try:
                if i % 2:
                    chat.append({"role": "user", "content": str(i) + "c" * 100_000})
                else:
                    memory.set(f"k{i}", "v" * 100_000)
            except StorageFull as exc:
                assert "disk full" in str(exc)
                break
            stored.append(i)
        else:
            raise AssertionError("the disk never filled")
        assert len(stored) > 100
        for i in stored[:40:2]:
            assert memory.delete(f"k{i}") is True
            assert memory.get(f"k{i}") is None
        chat.clear()
        assert chat.messages() == []

        memory.set("after", "a" * 100_000)  # the deletes freed space
        chat.append(USER)
        assert memory.get("after") == "a" * 100_000
        assert chat.messages() == [USER]
        keys = {f"k{i}" for i in stored[40::2]} | {"after"}
        assert set(memory.list_keys()) == keys
        assert all(memory.get(k) == "v" * 100_000 for k in keys - {"after"})


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "empty", "no seed"])
def test_a_creds_file_that_is_no_creds_raises_invalid_argument(tmp_path: Path, namespace: str, damage: str) -> None:
    """Before: a raw TypeError from inside nats-py, when the server asked for the signature."""
    from tests.creds import decentralized_auth

    config, creds = decentralized_auth(tmp_path)
    text = creds.read_text()
    bad = tmp_path / "bad.creds"
    if damage == "garbage":
        bad.write_text("garbage\n")
    elif damage == "empty":
        bad.write_text("")
    else:
        bad.write_text(text.split("-----BEGIN USER NKEY SEED-----", 1)[0])
    server = NatsServer(tmp_path / "auth", extra_config=config).start()
    try:
        with pytest.raises(InvalidArgument, match="creds file .* is not a NATS .creds file"):
            with Memory(namespace, url=server.url, creds=str(bad), timeout=TIMEOUT) as memory:
                memory.get("k")
        with Memory(namespace, url=server.url, creds=str(creds), timeout=TIMEOUT) as memory:  # the real one works
            memory.set("k", 1)
            assert memory.get("k") == 1
    finally:
        server.stop()


# -- at the storage limit -------------------------------------------------------------------------
@pytest.mark.xfail(
    strict=True,
    reason="only the delete that meets the limit purges its key; the next deletes' markers fit in the "
    "space it freed and keep their keys' revisions, so deleting N keys frees about one (design change)",
)
@pytest.mark.timeout(120)
def test_deleting_keys_at_the_storage_limit_frees_room_for_as_many(tmp_path: Path, namespace: str) -> None:
    server = NatsServer(tmp_path / "limited", max_payload=64 * 1024, max_file_store=512 * 1024).start()
    try:
        with Memory(namespace, url=server.url) as memory:
            for i in range(1000):
                try:
                    memory.set(f"k{i}", "x" * 10_000)
                except QuotaExceeded:
                    break
            for i in range(20):
                assert memory.delete(f"k{i}") is True
            for i in range(10):  # measured: the second one raised QuotaExceeded
                memory.set(f"new{i}", "y" * 10_000)
    finally:
        server.stop()


def _extend_past_the_limit(tmp_path: Path, namespace: str) -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    """extend() on a server at its storage limit: the batch, what the conversation then holds, and
    the error message."""
    server = NatsServer(tmp_path / "limited", max_payload=64 * 1024, max_file_store=512 * 1024).start()
    try:
        with ChatHistory("s", namespace=namespace, url=server.url) as chat:
            chat.append(USER)
            batch = [{"role": "user", "content": f"{i} " + "y" * 30_000} for i in range(20)]  # 600 KB
            with pytest.raises(QuotaExceeded) as failure:
                chat.extend(batch)
            return batch, chat.messages(), str(failure.value)
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_extend_at_the_storage_limit_says_what_was_stored(tmp_path: Path, namespace: str) -> None:
    """Before: ServerUnavailable 'did not answer in time' after 10 s, while the server had stored
    most of the batch (measured: 18 of 20), so a retry stored them twice."""
    batch, held, error = _extend_past_the_limit(tmp_path, namespace)
    stored = held[1:]
    assert held[0] == USER and stored == batch[: len(stored)]
    if stored:
        assert f"stored only {len(stored)} of these 20 messages" in error
    else:
        assert "stored only" not in error


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="nats-server 2.15 stores part of an atomic batch at its storage limit "
                   "and the chat stream denies deletes, so the library cannot undo it")
@pytest.mark.timeout(120)
def test_extend_at_the_storage_limit_stores_nothing(tmp_path: Path, namespace: str) -> None:
    _, held, _ = _extend_past_the_limit(tmp_path, namespace)
    assert held == [USER]
