"""QA of BotWireSaver at the edges of its input: names of odd shape and size, records near the
server's message size limit, ``list`` with ``limit=0`` and ``before`` a checkpoint that does not
exist. Bad input raises a ``botwire_stream.errors`` exception and writes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

pytest.importorskip("langgraph")
from langgraph.checkpoint.base import empty_checkpoint  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402

from botwire_stream.errors import InvalidArgument, ValueTooLarge  # noqa: E402
from botwire_stream.integrations.langgraph import BotWireSaver  # noqa: E402
from tests.servers import NatsServer  # noqa: E402


def _cfg(thread: Any, checkpoint_id: Any = None, ns: Any = "") -> Any:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def _checkpoint(value: Any) -> Any:
    cp = empty_checkpoint()
    cp["channel_values"] = {"v": value}
    cp["channel_versions"] = {"v": 1}
    return cp


async def _count(url: str, namespace: str) -> int:
    """The messages the namespace's checkpoint stream holds (0 when it does not exist yet)."""
    nc = await nats.connect(url)
    try:
        try:
            info = await nc.jetstream().stream_info(f"BOTWIRE_LG_{namespace}")
        except nats.js.errors.NotFoundError:
            return 0
        return int(info.state.messages)
    finally:
        await nc.close()


@pytest.fixture
async def asaver(url: str, namespace: str) -> AsyncIterator[BotWireSaver]:
    s = BotWireSaver(namespace, url=url)
    yield s
    await s.aclose()


async def test_names_that_have_no_utf8_form_raise_invalid_argument_and_write_nothing(
    asaver: BotWireSaver, url: str, namespace: str
) -> None:
    """A lone surrogate (a str Python allows, e.g. from a bad decode) in a thread id, checkpoint
    namespace, checkpoint or task id, channel or task path raised a bare ``UnicodeEncodeError``."""
    stored = await asaver.aput(_cfg("ok"), _checkpoint(1), {}, {})
    before = await _count(url, namespace)
    bad = "a\ud800b"
    cases: list[Any] = [
        asaver.aput(_cfg(bad), _checkpoint(1), {}, {}),
        asaver.aput(_cfg("ok", ns=bad), _checkpoint(1), {}, {}),
        asaver.aput(_cfg("ok"), {**_checkpoint(1), "id": bad}, {}, {}),
        asaver.aget_tuple(_cfg(bad)),
        asaver.aget_tuple(_cfg("ok", ns=bad)),
        asaver.aget_tuple(_cfg("ok", checkpoint_id=bad)),
        asaver.aput_writes(stored, [("c", 1)], bad),
        asaver.aput_writes(stored, [("c", 1)], "task", bad),
        asaver.aput_writes(stored, [("c", 1), (bad, 2)], "task"),
        asaver.adelete_thread(bad),
        asaver.acopy_thread("ok", bad),
        asaver.acopy_thread(bad, "ok2"),
        asaver.aprune([bad]),
    ]
    for case in cases:
        with pytest.raises(InvalidArgument, match="surrogate"):
            await case
    with pytest.raises(InvalidArgument, match="surrogate"):
        [t async for t in asaver.alist(_cfg(bad))]
    assert await _count(url, namespace) == before
    got = await asaver.aget_tuple(_cfg("ok"))
    assert got is not None and got.pending_writes == []


async def test_a_thread_id_over_1024_bytes_raises_and_writes_nothing(
    asaver: BotWireSaver, url: str, namespace: str
) -> None:
    stored = await asaver.aput(_cfg("ok"), _checkpoint(1), {}, {})
    before = await _count(url, namespace)
    long = "é" * 513  # 1,026 UTF-8 bytes
    for case in (
        asaver.aput(_cfg(long), _checkpoint(1), {}, {}),
        asaver.aput_writes({"configurable": {**stored["configurable"], "thread_id": long}}, [("c", 1)], "t"),
        asaver.aget_tuple(_cfg(long)),
        asaver.adelete_thread(long),
        asaver.acopy_thread("ok", long),
        asaver.aprune([long], strategy="delete"),
    ):
        with pytest.raises(InvalidArgument, match="over 512 UTF-8 bytes"):
            await case
    assert await _count(url, namespace) == before


async def test_empty_and_odd_names_round_trip_and_stay_apart(asaver: BotWireSaver) -> None:
    """An empty thread id, one that looks like an encoded token, and checkpoint namespaces with
    subject syntax, control characters and NUL each keep their own checkpoints."""
    threads = ["", "=", "==", "a", "a.b", "*", ">"]
    namespaces = ["", "a.b *>\n\x00\t|ns:x/y", "=", "é" * 256]
    ids: dict[tuple[str, str], str] = {}
    for t in threads:
        for n in namespaces:
            cp = _checkpoint([t, n])
            await asaver.aput(_cfg(t, ns=n), cp, {"who": [t, n]}, {})
            ids[(t, n)] = cp["id"]
    for t in threads:
        for n in namespaces:
            got = await asaver.aget_tuple(_cfg(t, ns=n))
            assert got is not None and got.checkpoint["channel_values"]["v"] == [t, n]
            assert got.config["configurable"] == {"thread_id": t, "checkpoint_ns": n, "checkpoint_id": ids[(t, n)]}
            listed = [x.checkpoint["id"] async for x in asaver.alist(_cfg(t, ns=n))]
            assert listed == [ids[(t, n)]]
        every_ns = [
            x.config["configurable"]["checkpoint_ns"] async for x in asaver.alist({"configurable": {"thread_id": t}})
        ]
        assert sorted(every_ns) == sorted(namespaces)
    await asaver.adelete_thread("")
    for n in namespaces:
        assert await asaver.aget_tuple(_cfg("", ns=n)) is None
        assert await asaver.aget_tuple(_cfg("=", ns=n)) is not None
    await asaver.acopy_thread("=", "")
    got = await asaver.aget_tuple(_cfg("", ns=namespaces[1]))
    assert got is not None and got.checkpoint["channel_values"]["v"] == ["=", namespaces[1]]


async def test_list_limit_zero_and_before_a_missing_checkpoint_answer_as_in_memory_saver(asaver: BotWireSaver) -> None:
    """``limit=0`` lists nothing; ``before`` a checkpoint id that was never stored lists the ones
    with lower ids (LangGraph compares ids); a ``before`` that is no config, or a checkpoint id
    that is no str, raises ``InvalidArgument`` (was a bare TypeError/KeyError)."""
    memory = InMemorySaver()
    cps = [_checkpoint(i) for i in range(5)]
    for cp in cps:
        await asaver.aput(_cfg("t"), cp, {"i": cp["channel_values"]["v"]}, {})
        memory.put(_cfg("t"), cp, {"i": cp["channel_values"]["v"]}, {})
    missing = cps[2]["id"][:-1] + ("0" if cps[2]["id"][-1] != "0" else "1")  # never stored

    async def ours(**kw: Any) -> list[str]:
        return [t.checkpoint["id"] async for t in asaver.alist(_cfg("t"), **kw)]

    def theirs(**kw: Any) -> list[str]:
        return [t.checkpoint["id"] for t in memory.list(_cfg("t"), **kw)]

    assert await ours(limit=0) == theirs(limit=0) == []
    for probe in (missing, "0", "~", cps[0]["id"], cps[4]["id"]):
        assert await ours(before=_cfg("t", probe)) == theirs(before=_cfg("t", probe))
        assert await ours(before=_cfg("t", probe), limit=1) == theirs(before=_cfg("t", probe), limit=1)
    assert await ours(before={"configurable": {}}) == theirs(before={"configurable": {}})
    assert await asaver.aget_tuple(_cfg("t", missing)) is None
    for bad in ("nope", {}, {"configurable": "x"}, _cfg("t", 5)):
        with pytest.raises(InvalidArgument):
            await ours(before=bad)
    with pytest.raises(InvalidArgument):
        await asaver.aget_tuple(_cfg("t", 5))
    with pytest.raises(InvalidArgument):
        await ours(limit=-1)


@pytest.fixture
def small_server(tmp_path: Path) -> Any:
    """A nats-server of this test with a 64 KiB max_payload, so records near it stay small."""
    server = NatsServer(tmp_path / "small", max_payload=64 * 1024).start()
    yield server
    server.stop()


async def test_a_checkpoint_near_the_message_size_limit_fits_or_raises_value_too_large(
    small_server: NatsServer, namespace: str
) -> None:
    """The largest checkpoint that fits is stored and read back whole (get, list, copy); any
    larger one raises ``ValueTooLarge`` with nothing written, and the saver keeps working. A
    record between max_payload less the headers' room and max_payload went out, and the
    server closed the connection for it ("maximum payload exceeded"): the put raised
    ``OutcomeUnknown`` and every later call failed with "connection closed"."""
    url = small_server.url
    saver = BotWireSaver(namespace, url=url, timeout=2.0)
    thread = "é" * 256  # the longest names: the longest subjects and headers
    try:
        await saver.aput(_cfg(thread), _checkpoint(""), {}, {})
        count = await _count(url, namespace)

        async def fits(n: int) -> bool:
            try:
                await saver.aput(_cfg(thread), _checkpoint("x" * n), {}, {})
            except ValueTooLarge:
                return False
            return True

        lo, hi = 1, 64 * 1024  # fits, does not
        assert await fits(lo) and not await fits(hi)
        count += 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if await fits(mid):
                lo, count = mid, count + 1
            else:
                hi = mid
            assert await _count(url, namespace) == count  # a refused put wrote nothing
        assert lo < 64 * 1024 - 4096  # the headers' room is kept
        for n in (lo + 1, lo + 8192, 64 * 1024 - 300, 64 * 1024 - 50):
            assert not await fits(n)
        assert await _count(url, namespace) == count
        assert await fits(lo)  # the connection still works
        got = await saver.aget_tuple(_cfg(thread))
        assert got is not None and got.checkpoint["channel_values"]["v"] == "x" * lo
        listed = [t async for t in saver.alist(_cfg(thread), limit=1)]
        assert listed[0].checkpoint["channel_values"]["v"] == "x" * lo
        await saver.aput_writes(got.config, [("w", "y" * (lo - 200))], "task")
        await saver.acopy_thread(thread, "copy")
        copied = await saver.aget_tuple(_cfg("copy"))
        assert copied is not None and copied.checkpoint["channel_values"]["v"] == "x" * lo
        assert [w[2] for w in copied.pending_writes] == ["y" * (lo - 200)]
    finally:
        await saver.aclose()
