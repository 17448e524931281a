"""QA of issue 10's replay, time travel and restore: bad input and boundaries (times before the
first event, in the future, naive; sequences 0, negative, huge; globs that match nothing; a
restore target that exists), through the library and the ``botwire`` command."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, areplay, arestore
from botwire_stream.errors import Conflict, InvalidArgument

from .procs import ROOT

pytestmark = pytest.mark.nats_only


def _botwire(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "botwire_stream", "--url", url, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


async def _events(namespace: str, url: str) -> list[tuple[str, int, str]]:
    return [(e.source, e.seq, e.kind) async for e in areplay(namespace, url=url)]


async def test_restore_into_a_namespace_that_holds_events_is_a_clean_error(url: str, namespace: str) -> None:
    """``botwire restore`` into a namespace that is not empty: exit 2 with one error line, nothing
    written. Before: the error line, then a ``Task exception was never retrieved`` traceback (the
    emptiness check left its replay unclosed; closed after the connection, it failed)."""
    target = namespace + "-x"
    async with AsyncMemory(namespace, url=url) as m, AsyncMemory(target, url=url) as t:
        await m.set("a", 1)
        await t.set("b", 2)
    result = _botwire(url, "restore", namespace, "--at", "now", "--into", target)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr == f"error: namespace {target!r} is not empty: restore into a new one, or pass overwrite=True\n"
    )
    assert [(e.key, e.value) async for e in areplay(target, url=url)] == [("b", 2)]  # nothing written


_STOP_EARLY = """
import asyncio, sys
from botwire_stream import areplay

async def main() -> None:
    async for e in areplay(sys.argv[2], url=sys.argv[1]):
        print(e.key)
        break

asyncio.run(main())
"""


async def test_a_replay_left_after_its_first_event_leaves_no_error_behind(url: str, namespace: str) -> None:
    """``async for e in areplay(...): break`` in a program that then ends: no traceback on stderr
    (the generators are closed at the loop's shutdown, after the connection). Before: ``Task
    exception was never retrieved ... ConnectionClosedError`` for each log's scan."""
    async with AsyncMemory(namespace, url=url) as m:
        await m.set("k", 1)
        await m.set("k", 2)
    result = subprocess.run(
        [sys.executable, "-c", _STOP_EARLY, url, namespace], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "k\n", "")


async def test_replay_bounds_and_globs(url: str, namespace: str) -> None:
    """Sequence 0 is the start; a negative or float sequence, a naive time, an empty glob:
    InvalidArgument before anything is read; a start in the future, an end before the first
    event, a glob that matches nothing, start > end: no events."""
    async with AsyncMemory(namespace, url=url) as m, AsyncChatHistory("c", namespace=namespace, url=url) as c:
        before = datetime.now(UTC) - timedelta(days=1)
        await m.set("a", 1)
        await c.append({"role": "user", "content": "x"})
    everything = await _events(namespace, url)
    assert sorted(everything) == [("chat", 1, "append"), ("memory", 1, "set")]
    assert [e.key async for e in areplay(namespace, url=url, start=0, conversations=None)] == ["a"]
    for bad in (
        {"start": -1, "conversations": None},
        {"end": -1, "keys": None},
        {"start": 1.5, "keys": None},
        {"start": datetime.now()},  # naive
        {"end": "2026-01-01"},
        {"keys": ""},
        {"start": 1},  # a sequence with both logs
    ):
        with pytest.raises(InvalidArgument):
            areplay(namespace, url=url, **bad)  # type: ignore[arg-type]
    for empty in (
        {"start": datetime.now(UTC) + timedelta(days=1)},
        {"end": before},
        {"keys": "nothing*", "conversations": "none*"},
        {"start": 5, "end": 2, "keys": None},
        {"end": 0, "conversations": None},
        {"start": 2**64 - 1, "keys": None},
    ):
        assert [e async for e in areplay(namespace, url=url, **empty)] == []  # type: ignore[arg-type]


async def test_restore_refuses_bad_targets_and_times_writing_nothing(url: str, namespace: str) -> None:
    """A naive time, the source itself, a moment in the future (its state is not known yet; before,
    today's state was written as of it), a target holding events: refused, nothing written."""
    async with AsyncMemory(namespace, url=url) as m:
        await m.set("a", 1)
    target = namespace + "-t"
    for kwargs, error in (
        ({"at": datetime.now(), "into": target}, InvalidArgument),
        ({"at": datetime.now(UTC), "into": namespace}, InvalidArgument),
        ({"at": datetime.now(UTC) + timedelta(minutes=1), "into": target}, InvalidArgument),  # before: restored
    ):
        with pytest.raises(error):
            await arestore(namespace, url=url, **kwargs)  # type: ignore[arg-type]
    assert await _events(target, url) == []
    async with AsyncMemory(target, url=url) as t:
        await t.set("mine", 1)
    with pytest.raises(Conflict):
        await arestore(namespace, at=datetime.now(UTC), into=target, url=url)
    assert [(e.key, e.value) async for e in areplay(target, url=url)] == [("mine", 1)]


def test_cli_restore_at_a_future_time_is_refused(url: str, namespace: str) -> None:
    """``--at 2999-01-01`` (or a local time read as UTC, hours ahead): exit 2, nothing written.
    Before: exit 0, "restored ... as of 2999-01-01" with today's keys."""
    from click.testing import CliRunner

    from botwire_stream.cli import cli

    runner = CliRunner()
    assert runner.invoke(cli, ["--url", url, "-n", namespace, "set", "a", "1"]).exit_code == 0
    result = runner.invoke(cli, ["--url", url, "restore", namespace, "--at", "2999-01-01", "--into", namespace + "-f"])
    assert result.exit_code == 2 and "is in the future" in result.output, result.output
    listed = runner.invoke(cli, ["--url", url, "replay", namespace + "-f"])
    assert (listed.exit_code, listed.output) == (0, "")
