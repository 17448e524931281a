"""``botwire replay``, ``botwire history``, ``botwire restore`` and ``botwire retention``, in process."""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime, timedelta

from click.testing import CliRunner, Result

from botwire_stream import ChatHistory, Memory
from botwire_stream.audit import parse_when
from botwire_stream.cli import cli

ME = f"{socket.gethostname()}/{os.getpid()}"


def _run(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, [*args, "--url", url])


def test_replay_history_and_restore_commands(url: str, namespace: str) -> None:
    with Memory(namespace, url=url) as m, ChatHistory("c", namespace=namespace, url=url) as c:
        m.set("user:1", "Ada")
        c.append({"role": "user", "content": "hi"})
        m.set("user:1", "Ada L.")
        middle = datetime.now(UTC)
        m.delete("user:1")

    result = _run(url, "replay", namespace)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[1:4] for line in lines] == [
        ["memory", "1", "set"],
        ["chat", "1", "append"],
        ["memory", "2", "set"],
        ["memory", "3", "delete"],
    ]
    assert all(line.endswith(f"({ME})") for line in lines)

    result = _run(url, "replay", namespace, "--key", "user:*", "--from", "2", "--json")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines()]
    assert [(e["seq"], e["kind"], e["value"], e["origin"]) for e in events] == [
        (2, "set", "Ada L.", ME),
        (3, "delete", None, ME),
    ]

    result = _run(url, "history", namespace, "user:1")
    assert result.exit_code == 0, result.output
    assert [line.split()[0:4:2] for line in result.output.splitlines()] == [["1", "set"], ["2", "set"], ["3", "delete"]]
    assert _run(url, "history", namespace, "nobody").exit_code == 1

    result = _run(url, "restore", namespace, "--at", middle.isoformat(), "--into", namespace + "r")
    assert result.exit_code == 0, result.output
    assert "1 keys, 1 conversations, 1 messages" in result.output
    with Memory(namespace + "r", url=url) as r:
        assert r.get("user:1") == "Ada L."
    result = _run(url, "restore", namespace, "--at", "now", "--into", namespace + "r")
    assert result.exit_code == 2 and "not empty" in result.output

    result = _run(url, "retention", namespace, "--key-history", "8", "--log-age", "30d", "--json")
    assert result.exit_code == 0, result.output
    state = json.loads(result.output)
    assert (state["key_history"], state["log_age"], state["log_messages"]) == (8, 30 * 86400, None)
    result = _run(url, "retention", namespace, "--key-history", "0")
    assert result.exit_code == 2 and "key_history" in result.output
    assert json.loads(_run(url, "retention", namespace, "--json").output)["key_history"] == 8


def test_bad_times_and_bounds_are_usage_errors(url: str, namespace: str) -> None:
    assert _run(url, "replay", namespace, "--from", "yesterday").exit_code == 2
    result = _run(url, "replay", namespace, "--from", "3")  # a sequence of which log?
    assert result.exit_code == 2 and "--key or --conversation" in result.output
    assert _run(url, "restore", namespace, "--at", "12", "--into", namespace + "x").exit_code == 2
    assert _run(url, "restore", namespace, "--into", namespace + "x").exit_code == 2  # --at is required


def test_times_accept_iso_and_relative_forms() -> None:
    now = datetime(2026, 11, 30, 14, 2, tzinfo=UTC)
    assert parse_when("-15m", now) == now - timedelta(minutes=15)
    assert parse_when("-2h", now) == now - timedelta(hours=2)
    assert parse_when("-1.5d", now) == now - timedelta(days=1.5)
    assert parse_when("now", now) == now
    assert parse_when("2026-11-30T14:02:00Z") == now
    assert parse_when("2026-11-30T15:02:00+01:00") == now
    assert parse_when("2026-11-30T14:02:00") == now  # no zone: UTC
