"""Small tmpfs mounts for the tests of full disks and read-only folders (root only; the tests
skip with the reason when mounting is not permitted)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(path: Path, size: str = "8m", *, read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` for the block; unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0700" + (",ro" if read_only else "")  # private, as BOTWIRE_HOME must be
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); the test needs root and mount(8)")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()} (needs root)")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte with one file; return the file."""
    filler = folder / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    for n in (4096, 512, 1):  # the last partial block
        try:
            with open(filler, "ab", buffering=0) as f:
                while True:
                    f.write(b"\0" * n)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    st = os.statvfs(folder)
    assert st.f_bavail == 0
    return filler


@contextmanager
def home_on_tmpfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: str) -> Iterator[Path]:
    """BOTWIRE_HOME on a tmpfs of ``size`` for the block; its server is stopped before the unmount."""
    from botwire_stream.nats import embedded

    with tmpfs(tmp_path / "disk", size) as disk:
        home = disk / "home"
        monkeypatch.setenv("BOTWIRE_HOME", str(home))
        try:
            yield home
        finally:
            embedded.stop(home)
