"""Crash safety and network faults, counted (chaos/scenarios.py; full size: ``python -m chaos``):
every acknowledged write is stored, none twice, and a call that failed stored its write at most
once. Here small and bounded; the same scenarios run with 10,000 writes from the command."""

from __future__ import annotations

from pathlib import Path

import pytest

from botwire_stream import Memory
from botwire_stream.errors import InvalidArgument
from chaos import scenarios


@pytest.mark.slow
async def test_sigkill_of_the_server_during_appends_loses_no_acknowledged_append(tmp_path: Path) -> None:
    """4 concurrent appenders, 1,000 acknowledged appends, the server SIGKILLed twice in the
    middle and restarted on the same store: all acknowledged appends are there, once each."""
    counts = await scenarios.single_kill(tmp_path, total=1000, kills=2, writers=4)
    counts.check()
    assert counts.stored == counts.acked + counts.failed_stored, counts.line()
    assert counts.acked >= 1000


@pytest.mark.slow
async def test_stalled_and_cut_links_lose_nothing_and_never_hang(tmp_path: Path) -> None:
    """Through a loopback proxy: a stall shorter than the timeout only delays the calls; a cut
    makes the client reconnect and re-send (none stored twice); a stall past the timeout fails
    the calls in flight with ServerUnavailable within 3x their timeout, and what they sent is
    stored at most once when the link comes back."""
    counts = await scenarios.proxy_faults(tmp_path, stall=0.5, writers=4, rounds=2)
    counts.check()
    assert counts.failed >= 4  # the calls in flight during the long stalls failed...
    assert counts.extra["failed_after_s"] < 3 * counts.extra["timeout_s"]  # ...in bounded time
    assert counts.extra["connections"] >= 3  # the client reconnected after each cut
    assert counts.stored == counts.acked + counts.failed_stored, counts.line()


def test_the_embedded_server_fsyncs_every_write_when_asked(botwire_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``BOTWIRE_SYNC_INTERVAL=always``: the embedded server is started with JetStream's
    ``sync_interval: always`` (config file only; no command-line flag exists); a value that is
    neither ``always`` nor a duration is refused with InvalidArgument before anything starts."""
    monkeypatch.setenv("BOTWIRE_SYNC_INTERVAL", "fast")
    with pytest.raises(InvalidArgument, match="BOTWIRE_SYNC_INTERVAL"):
        Memory("ns").set("k", 1)
    assert not (botwire_home / "server" / "nats.conf").exists()  # no server configured nor started
    monkeypatch.setenv("BOTWIRE_SYNC_INTERVAL", "always")
    with Memory("ns") as m:
        m.set("k", 1)
        assert m.get("k") == 1
    assert "sync_interval: always" in (botwire_home / "server" / "nats.conf").read_text()
