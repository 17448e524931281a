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

from botwire_stream import Memory, embedded
from botwire_stream.errors import StorageFull
from tests.mounts import fill, tmpfs

MB = 1_000_000


@pytest.fixture
def disk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """BOTWIRE_HOME on a 32 MiB tmpfs of this test; its server is stopped before the unmount."""
    with tmpfs(tmp_path / "disk", "32m") as disk:
        home = disk / "home"
        monkeypatch.setenv("BOTWIRE_HOME", str(home))
        try:
            yield home
        finally:
            embedded.stop(home)


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
    (measured: 'Max Storage: 3.00 MB' with 4 MiB free and 20 MB stored), so the library's own
    restart on a nearly full disk left every write failing with QuotaExceeded, for good."""
    with Memory(namespace, timeout=1.0) as memory:
        for i in range(8):
            memory.set(f"k{i}", str(i) * MB)  # 8 MB stored
        filler = fill(disk_home.parent)
        with pytest.raises(StorageFull):
            memory.set("during", "x" * 10_000)

        free_up_to(filler, 3 * 1024 * 1024 // 2)  # some space back: small writes fit
        memory.set("small", 1)  # restarts the server wedged by the full disk, then stores
        assert memory.get("small") == 1

        filler.unlink()  # all space back
        for i in range(6):  # nats-server checks its storage limit against usage it updates lazily
            memory.set(f"after{i}", str(i) * MB)
            time.sleep(0.3)
        assert memory.get("during") is None
        assert memory.list_keys() == sorted(["small"] + [f"k{i}" for i in range(8)] + [f"after{i}" for i in range(6)])
        assert all(memory.get(f"k{i}") == str(i) * MB for i in range(8))
        assert all(memory.get(f"after{i}") == str(i) * MB for i in range(6))
