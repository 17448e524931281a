"""The one helper that starts nats-server (embedded server, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from botwire_stream._natsproc import StartFailed, conf_string, render_config, start
from botwire_stream.errors import ServerUnavailable
from botwire_stream.nats.embedded import find_binary


def test_start_returns_the_process_and_the_port_it_listens_on(tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text(render_config(port=-1, ports_dir=tmp_path, store_dir=tmp_path / "store"))
    proc, port = start(find_binary(), conf, tmp_path, log=tmp_path / "server.log")
    try:
        assert proc.poll() is None
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(4) == b"INFO"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_a_server_that_exits_at_start_raises_with_this_runs_output_only(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("an OLDER RUN's output\n" * 50)
    conf = tmp_path / "nats.conf"
    conf.write_text(render_config(port=-1, ports_dir=tmp_path, store_dir=tmp_path, extra=["no_such_option: {"]))
    with pytest.raises(StartFailed) as info:
        start(find_binary(), conf, tmp_path, log=log, timeout=10)
    assert isinstance(info.value, ServerUnavailable)
    assert info.value.returncode not in (None, 0)
    assert info.value.output.strip() and "OLDER RUN" not in info.value.output
    assert info.value.output in str(info.value)


def test_conf_string_keeps_non_ascii_and_quotes_as_the_server_reads_them(tmp_path: Path) -> None:
    # A store path with an accent, a quote and a backslash: the server must use exactly that folder.
    store = tmp_path / 'stör "x" \\ y'
    conf = tmp_path / "nats.conf"
    conf.write_text(render_config(port=-1, ports_dir=tmp_path, store_dir=store, token='to"k\\en'))
    assert conf_string('a"b') == '"a\\"b"'
    proc, _ = start(find_binary(), conf, tmp_path, log=tmp_path / "server.log")
    try:
        assert store.is_dir()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
