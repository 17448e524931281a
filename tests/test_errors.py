"""Every bad input and every unreachable server raises its documented error, and a failed write
leaves nothing behind: the key keeps its previous value, or stays absent."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from botwire_stream import AsyncMemory, ChatHistory, Memory
from botwire_stream.errors import (
    BotWireError,
    Closed,
    HomeNotWritable,
    InvalidArgument,
    InvalidKey,
    InvalidNamespace,
    InvalidTTL,
    InvalidValue,
    ServerUnavailable,
    Unauthorized,
    ValueTooLarge,
    WrongEventLoop,
)
from botwire_stream.nats import embedded
from tests.servers import NatsServer

MiB = 1024 * 1024


@pytest.fixture
def memory(url: str, namespace: str) -> Iterator[Memory]:
    with Memory(namespace, url=url) as m:
        m.set("keep", {"v": 1})
        yield m


def assert_untouched(memory: Memory, fresh: str = "fresh") -> None:
    """The previous value is intact, the fresh key absent, and no revision was added."""
    assert memory.get("keep") == {"v": 1}
    assert [r.value for r in memory.revisions("keep")] == [{"v": 1}]
    assert memory.get(fresh, "absent") == "absent"
    assert fresh not in memory
    assert memory.list_keys() == ["keep"]


# -- namespaces ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "a.b", "x" * 65, "a b", "ü", "a*", ">", "a:b", 123, None, b"ns"])
def test_bad_namespace(url: str, bad: Any) -> None:
    with pytest.raises(InvalidNamespace, match="1-64"):
        Memory(bad, url=url)
    with pytest.raises(InvalidNamespace):
        AsyncMemory(bad, url=url)


@pytest.mark.parametrize("good", ["x" * 64, "A-z_09", "-", "_"])
def test_namespace_limits_are_inclusive(url: str, good: str) -> None:
    with Memory(good, url=url) as m:
        m.set("k", good)
        assert m.get("k") == good


# -- keys ------------------------------------------------------------------------------------------
BAD_KEYS = ["", 5, None, b"key", ("a",), "k" * 1025, "é" * 513, "\ud800"]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_key_on_every_method(memory: Memory, bad: Any) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: memory.set(bad, 1),
        lambda: memory.set(bad, 1, ttl=5),
        lambda: memory.get(bad),
        lambda: bad in memory,
        lambda: memory.delete(bad),
        lambda: memory.update(bad, lambda v: 1),
        lambda: memory.revisions(bad),
        lambda: memory.watch(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidKey):
            call()
    assert_untouched(memory)


# -- values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [object(), 1j, {(1, 2): "tuple key"}, [1, object()], {"a": {"b": Path}}])
def test_non_json_value_raises_type_error(memory: Memory, bad: Any) -> None:
    with pytest.raises(TypeError, match="JSON"):
        memory.set("keep", bad)
    with pytest.raises(TypeError):
        memory.set("fresh", bad, ttl=10)
    with pytest.raises(TypeError):
        memory.update("keep", lambda v: bad)
    with pytest.raises(TypeError):
        memory.update("fresh", lambda v: bad)
    assert_untouched(memory)


def test_value_over_64_mib_is_refused_and_64_mib_is_not(memory: Memory) -> None:
    too_big = "x" * (64 * MiB - 1)  # JSON-encoded: 64 MiB + 1 byte
    with pytest.raises(ValueTooLarge, match="64 MiB"):
        memory.set("keep", too_big)
    with pytest.raises(ValueTooLarge):
        memory.set("fresh", too_big)
    with pytest.raises(ValueTooLarge):
        memory.update("keep", lambda v: too_big)
    assert_untouched(memory)
    at_limit = too_big[:-1]  # exactly 64 MiB encoded
    memory.set("limit", at_limit)
    assert memory.get("limit") == at_limit


# -- ttl -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad", [0, -1, 0.0, -0.5, math.nan, math.inf, -math.inf, "x", "10", True, [], timedelta(0), timedelta(seconds=-1)]
)
def test_bad_ttl(memory: Memory, bad: Any) -> None:
    with pytest.raises(InvalidTTL):
        memory.set("keep", 2, ttl=bad)
    with pytest.raises(InvalidTTL):
        memory.set("fresh", 2, ttl=bad)
    with pytest.raises(InvalidTTL):
        memory.update("keep", lambda v: 2, ttl=bad)
    assert_untouched(memory)


async def test_async_face_raises_the_same_errors(url: str, namespace: str) -> None:
    async with AsyncMemory(namespace, url=url) as memory:
        await memory.set("keep", 1)
        with pytest.raises(InvalidKey):
            await memory.set("", 1)
        with pytest.raises(TypeError):
            await memory.set("keep", object())
        with pytest.raises(InvalidTTL):
            await memory.set("keep", 2, ttl=0)
        with pytest.raises(InvalidTTL):
            await memory.update("keep", lambda v: 2, ttl=-1)
        assert await memory.get("keep") == 1
        assert await memory.list_keys() == ["keep"]


async def test_a_closed_memory_says_so(url: str, namespace: str) -> None:
    """Using a closed ``AsyncMemory`` raises ``Closed`` (a ``RuntimeError``), not a bare error."""
    memory = AsyncMemory(namespace, url=url)
    await memory.set("keep", 1)
    await memory.close()
    with pytest.raises(Closed, match="is closed"):
        await memory.get("keep")
    with pytest.raises(RuntimeError):
        await memory.set("keep", 2)


# -- servers ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_stopped_server_raises_server_unavailable(own_server: NatsServer, namespace: str) -> None:
    url = own_server.url
    own_server.stop()
    with pytest.raises(ServerUnavailable, match="127.0.0.1"):
        Memory(namespace, url=url)


@pytest.mark.timeout(60)
def test_server_going_away_raises_server_unavailable_then_recovers(own_server: NatsServer, namespace: str) -> None:
    with Memory(namespace, url=own_server.url, timeout=1.0) as m:
        m.set("k", "before")
        own_server.stop()
        with pytest.raises(ServerUnavailable):
            m.get("k")
        own_server.start()  # same port and store
        assert m.get("k") == "before"
        m.set("k", "after")
        assert m.get("k") == "after"


@pytest.mark.timeout(60)
def test_token_protected_server(tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server = NatsServer(tmp_path / "auth", token="s3cret").start()
    try:
        with pytest.raises(Unauthorized):
            Memory(namespace, url=server.url)
        with pytest.raises(Unauthorized):
            Memory(namespace, url=server.url, token="wrong")
        with Memory(namespace, url=server.url, token="s3cret") as m:
            m.set("k", 1)
        monkeypatch.setenv("BOTWIRE_TOKEN", "s3cret")
        with Memory(namespace, url=server.url) as m:
            assert m.get("k") == 1
    finally:
        server.stop()


@pytest.mark.parametrize("bad", ["redis://127.0.0.1:6379", "ftp://127.0.0.1:1", "127.0.0.1:4222x"])  # http:// is a transport now
def test_unsupported_urls(bad: str, namespace: str) -> None:
    with pytest.raises(BotWireError):
        Memory(namespace, url=bad)


# -- empty server lists ----------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("blank", ["", " ", ",", ", ,", " ,\t, "])
def test_blank_url_argument_is_invalid(blank: str, namespace: str) -> None:
    # Before: url="" fell through to the embedded server, and "," spun nats-py at 100% CPU forever.
    with pytest.raises(InvalidArgument, match="names no server"):
        Memory(namespace, url=blank)
    with pytest.raises(InvalidArgument, match="names no server"):
        AsyncMemory(namespace, url=blank)
    with pytest.raises(InvalidArgument, match="names no server"):
        ChatHistory("s1", namespace=namespace, url=blank)
    with pytest.raises(InvalidArgument, match="names no server"):
        ChatHistory.sessions(namespace=namespace, url=blank)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("blank", [",", ", ,", " , "])
def test_botwire_url_of_only_commas_is_invalid(blank: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOTWIRE_URL", blank)
    with pytest.raises(InvalidArgument, match="BOTWIRE_URL"):
        Memory(namespace)
    with pytest.raises(InvalidArgument, match="BOTWIRE_URL"):
        ChatHistory("s1", namespace=namespace)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("blank", ["", "  "])
def test_empty_botwire_url_means_unset(
    blank: str, botwire_home: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOTWIRE_URL", blank)
    with Memory(namespace) as m:  # the embedded server of BOTWIRE_HOME
        m.set("k", 1)
    monkeypatch.delenv("BOTWIRE_URL")
    with Memory(namespace) as m:
        assert m.get("k") == 1


# -- credentials files -----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_creds_file_authenticates(tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: nkeys was no dependency, so creds= raised ModuleNotFoundError at connect.
    from tests.creds import decentralized_auth

    config, creds = decentralized_auth(tmp_path)
    server = NatsServer(tmp_path / "operator", extra_config=config).start()
    try:
        with Memory(namespace, url=server.url, creds=str(creds)) as m:
            m.set("k", 1)
        monkeypatch.setenv("BOTWIRE_CREDS", str(creds))
        with Memory(namespace, url=server.url) as m:
            assert m.get("k") == 1
        monkeypatch.delenv("BOTWIRE_CREDS")
        with pytest.raises(Unauthorized):
            Memory(namespace, url=server.url)
    finally:
        server.stop()


def test_creds_that_is_not_a_file_is_invalid(url: str, namespace: str, tmp_path: Path) -> None:
    for bad in (tmp_path / "missing.creds", tmp_path):
        with pytest.raises(InvalidArgument, match="creds"):
            Memory(namespace, url=url, creds=str(bad))


# -- the embedded server's home --------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_read_only_home_raises_home_not_writable(
    tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.mounts import tmpfs

    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        for home in (ro, ro / "botwire"):  # an existing read-only folder, one that cannot be made
            monkeypatch.setenv("BOTWIRE_HOME", str(home))
            with pytest.raises(HomeNotWritable, match=str(ro)) as caught:  # before: a raw OSError
                Memory(namespace)
            assert "BOTWIRE_HOME" in str(caught.value)
            assert isinstance(caught.value, ServerUnavailable)


@pytest.mark.timeout(60)
def test_start_lock_held_by_another_process(
    botwire_home: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = botwire_home / "server" / "start.lock"
    lock.parent.mkdir(parents=True)
    hold = f"import filelock, sys\nlock = filelock.FileLock({str(lock)!r})\nlock.acquire()\nprint('held', flush=True)\nsys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        monkeypatch.setattr(embedded, "_LOCK_TIMEOUT", 1.0)
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="start lock .*start.lock.* held by another process"):
            Memory(namespace)  # before: a raw filelock.Timeout
        assert time.monotonic() - started < 3 * 1.0
    finally:
        holder.kill()
        holder.wait(10)
    with Memory(namespace) as m:  # the lock is free again: the server starts
        m.set("k", 1)


@pytest.mark.timeout(60)
def test_start_failure_shows_only_this_runs_output(botwire_home: Path, namespace: str) -> None:
    (botwire_home / "server").mkdir(parents=True)
    (botwire_home / "server" / "server.log").write_text("[1] an OLD RUN failed for another reason\n" * 20)
    (botwire_home / "jetstream").mkdir()
    (botwire_home / "jetstream" / "jetstream").write_text("not a folder")  # JetStream cannot start
    with pytest.raises(ServerUnavailable, match="exited at start") as caught:
        Memory(namespace)
    assert "storage directory is not a directory" in str(caught.value)
    assert "OLD RUN" not in str(caught.value)


# -- documented classes instead of bare builtins ---------------------------------------------------
@pytest.mark.parametrize("bad", ["redis://127.0.0.1:6379", "ftp://127.0.0.1:1", "127.0.0.1:4222x"])  # http:// is a transport now
def test_an_unsupported_url_scheme_is_invalid_argument_naming_the_supported_ones(bad: str, namespace: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Memory(namespace, url=bad)
    assert "nats://" in str(info.value) and "tls://" in str(info.value)
    assert info.value.code == "invalid_argument"


def test_a_value_json_cannot_hold_is_invalid_value_and_still_a_type_error(url: str, namespace: str) -> None:
    with Memory(namespace, url=url) as memory:
        for bad in (object(), math.nan, "\ud800"):
            with pytest.raises(InvalidValue) as info:
                memory.set("k", bad)
            assert isinstance(info.value, TypeError) and info.value.code == "invalid_value"
        assert "k" not in memory


def test_a_sync_call_from_the_librarys_own_loop_is_wrong_event_loop(url: str, namespace: str) -> None:
    with Memory(namespace, url=url) as memory:
        memory.set("counter", 1)
        with pytest.raises(WrongEventLoop, match="event loop thread"):
            memory.update("counter", lambda n: n + memory.get("counter"))
        assert memory.get("counter") == 1
