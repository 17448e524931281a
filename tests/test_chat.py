"""Conversation logs against a real nats-server: what is appended is what is read, in order.

Covers both faces (``ChatHistory`` and ``AsyncChatHistory``): append/extend sequence numbers,
exact round trips, tail and ``after`` reads in streams where conversations interleave, atomic
``extend``, retry de-duplication, ``fork``, ``sessions``, ``clear`` and bad input.
"""

from __future__ import annotations

import asyncio
import dataclasses
import decimal
import enum
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from botwire_stream import AsyncChatHistory, ChatHistory, Entry
from botwire_stream.errors import (
    Conflict,
    InvalidArgument,
    InvalidMessage,
    InvalidNamespace,
    InvalidSessionId,
    InvalidTTL,
    ValueTooLarge,
)

SAMPLES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "héllo wörld 👋 中文 ‮ \u0000 \n\t\"quoted\" \\ back"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "C"}'},
            }
        ],
        "additional_kwargs": {"refusal": None},
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21.5}'},
    {
        "nested": {"a": [1, 2.5, -3, True, False, None, {"deep": {"deeper": ["x", [], {}]}}], "empty": {}},
        "ints": [0, -(2**63), 2**63 - 1, 2**64 + 7],
        "floats": [0.1 + 0.2, 1e-300, -0.0, 1.7976931348623157e308],
        "text": "x" * 10_000,
    },
    {"": "empty key", "ключ": "значение", "emoji🙂": ["🙂", "\U0010ffff"], "a.b:c*>": "subject-like key"},
    {},
]


def _now_window(t: datetime) -> bool:
    now = datetime.now(UTC)
    return t.tzinfo is not None and now - timedelta(minutes=5) < t <= now + timedelta(minutes=5)


# -- round trips ----------------------------------------------------------------------------------
def test_sync_append_round_trips_exactly_in_order(url: str, namespace: str) -> None:
    with ChatHistory("user-42", namespace=namespace, url=url) as chat:
        assert len(chat) == 0
        assert chat.messages() == []
        assert chat.entries() == []
        seqs = [chat.append(m) for m in SAMPLES]
        assert all(isinstance(s, int) for s in seqs)
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert chat.messages() == SAMPLES
        assert len(chat) == len(SAMPLES)
        entries = chat.entries()
        assert [e.seq for e in entries] == seqs
        assert [e.message for e in entries] == SAMPLES
        assert all(isinstance(e, Entry) and _now_window(e.time) for e in entries)
        assert [e.time for e in entries] == sorted(e.time for e in entries)
    with ChatHistory("user-42", namespace=namespace, url=url) as again:  # a fresh handle reads the same
        assert again.messages() == SAMPLES


async def test_async_append_round_trips_exactly_in_order(url: str, namespace: str) -> None:
    async with AsyncChatHistory("user-42", namespace=namespace, url=url) as chat:
        assert await chat.count() == 0
        seqs = [await chat.append(m) for m in SAMPLES]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert await chat.messages() == SAMPLES
        assert await chat.count() == len(SAMPLES)
        entries = await chat.entries()
        assert [(e.seq, e.message) for e in entries] == list(zip(seqs, SAMPLES, strict=True))
        assert await chat.messages(last=2) == SAMPLES[-2:]
        assert [e.seq for e in await chat.entries(after=seqs[3])] == seqs[4:]


async def test_conversations_and_namespaces_are_separate(url: str, namespace: str) -> None:
    """Ids that look alike as subjects, and the same id in two namespaces, are distinct logs."""
    ids = ["a:b", "a.b", "a b", "a", "a:b:c", "*", ">", "a:*", "ü", "a::b", ":"]
    chats = [AsyncChatHistory(i, namespace=namespace, url=url) for i in ids]
    other = AsyncChatHistory("a:b", namespace=namespace + "x", url=url)
    try:
        for chat in chats:
            await chat.append({"id": chat.session_id})
        await other.append({"id": "other"})
        for chat in chats:
            assert await chat.messages() == [{"id": chat.session_id}]
        assert await other.messages() == [{"id": "other"}]
        listed = await AsyncChatHistory.sessions(namespace, url=url)
        assert sorted(s.session_id for s in listed) == sorted(ids)
    finally:
        for chat in [*chats, other]:
            await chat.close()


# -- reads in an interleaved stream ---------------------------------------------------------------
async def test_tail_and_after_reads_with_heavy_interleaving(url: str, namespace: str) -> None:
    """3 conversations, 3000 appends: 'a' everywhere, 'b' only in the first and last thirds, 'c' rare."""
    rng = random.Random(4)
    names = ["a", "b", "c"]
    weights = [[0.5, 0.45, 0.05], [0.97, 0.0, 0.03], [0.5, 0.45, 0.05]]
    chats = {n: AsyncChatHistory(f"conv-{n}", namespace=namespace, url=url) for n in names}
    truth: dict[str, list[tuple[int, dict[str, Any]]]] = {n: [] for n in names}
    try:
        total = 3000
        for k in range(total):
            name = rng.choices(names, weights[k * 3 // total])[0]
            message = {"k": k, "conv": name, "n": len(truth[name])}
            truth[name].append((await chats[name].append(message), message))
        for name in names:
            chat, rows = chats[name], truth[name]
            seqs = [s for s, _ in rows]
            msgs = [m for _, m in rows]
            assert seqs == sorted(seqs)
            n = len(rows)
            assert await chat.count() == n
            assert await chat.messages() == msgs
            for last in [0, 1, 7, 50, 999, n - 1, n, n + 1, 5000]:
                expect = msgs[max(0, n - last) :] if last else []
                assert await chat.messages(last=last) == expect, (name, last)
                got = await chat.entries(last=last)
                assert [(e.seq, e.message) for e in got] == (rows[max(0, n - last) :] if last else []), (name, last)
            # after: 0, each of a few own sequences, sequences of the other conversations, the end
            afters = [0, seqs[0], seqs[len(seqs) // 3], seqs[-2], seqs[-1], seqs[-1] + 10**6]
            afters += [s for other in names if other != name for s, _ in truth[other][:: max(1, len(truth[other]) // 4)]]
            for k, after in enumerate(afters):
                expect_rows = [r for r in rows if r[0] > after]
                if k % 3 == 0:  # whole reads cost more: a sample of them
                    got = await chat.entries(after=after)
                    assert [(e.seq, e.message) for e in got] == expect_rows, (name, after)
                for last in [1, 7, 50]:
                    got = await chat.entries(after=after, last=last)
                    tail = expect_rows[max(0, len(expect_rows) - last) :]
                    assert [(e.seq, e.message) for e in got] == tail, (name, after, last)
    finally:
        for chat in chats.values():
            await chat.close()


async def test_long_conversation_reads_across_pages(url: str, namespace: str) -> None:
    """10 000 and 10 500 messages (the reader pages by 10 000) with another conversation in between."""
    async with (
        AsyncChatHistory("long", namespace=namespace, url=url) as chat,
        AsyncChatHistory("noise", namespace=namespace, url=url) as noise,
    ):
        seqs: list[int] = []
        for b in range(10):
            seqs += await chat.extend([{"i": b * 1000 + j} for j in range(1000)])
            await noise.extend([{"noise": b, "j": j} for j in range(7)])
        expect = [{"i": i} for i in range(10_000)]
        assert await chat.count() == 10_000
        assert await chat.messages() == expect
        assert await chat.messages(last=10_001) == expect
        assert await chat.messages(last=3) == expect[-3:]
        seqs += await chat.extend([{"i": 10_000 + j} for j in range(500)])
        expect += [{"i": 10_000 + j} for j in range(500)]
        assert await chat.messages() == expect
        got = await chat.entries(after=seqs[99])
        assert [(e.seq, e.message) for e in got] == list(zip(seqs[100:], expect[100:], strict=True))
        assert [e.message for e in await chat.entries(after=seqs[99], last=600)] == expect[-600:]
        assert await noise.count() == 70


# -- extend ---------------------------------------------------------------------------------------
def test_extend_is_ordered_and_returns_consecutive_sequences(url: str, namespace: str) -> None:
    with ChatHistory("s", namespace=namespace, url=url) as chat:
        assert chat.extend([]) == []
        first = chat.append({"n": 0})
        seqs = chat.extend(SAMPLES)
        assert seqs == list(range(seqs[0], seqs[0] + len(SAMPLES)))
        assert seqs[0] > first
        one = chat.extend([{"n": 1}])
        assert len(one) == 1 and one[0] > seqs[-1]
        full = chat.extend([{"i": i} for i in range(1000)])  # the largest batch
        assert full == list(range(full[0], full[0] + 1000))
        assert chat.messages() == [{"n": 0}, *SAMPLES, {"n": 1}, *({"i": i} for i in range(1000))]
        assert [e.seq for e in chat.entries()] == [first, *seqs, *one, *full]


# Messages are what msgspec encodes as JSON (as values of Memory are): a set is written as an array,
# and values of other types are refused.
@pytest.mark.parametrize("bad", [object(), 1j, len], ids=["object", "complex", "function"])
def test_extend_with_one_unencodable_message_stores_nothing(url: str, namespace: str, bad: object) -> None:
    with ChatHistory("s", namespace=namespace, url=url) as chat:
        chat.append({"before": True})
        with pytest.raises(InvalidMessage):
            chat.extend([{"i": 0}, {"i": 1}, {"value": bad}, {"i": 3}])
        assert chat.messages() == [{"before": True}]
        assert len(chat) == 1


@pytest.mark.parametrize("bad", [["role", "user"], "a string", None, 42, ("k", "v")])
async def test_extend_with_a_non_mapping_stores_nothing(url: str, namespace: str, bad: object) -> None:
    async with AsyncChatHistory("s", namespace=namespace, url=url) as chat:
        await chat.append({"before": True})
        with pytest.raises(InvalidMessage):
            await chat.extend([{"i": 0}, bad, {"i": 2}])  # type: ignore[list-item]
        with pytest.raises(InvalidMessage):
            await chat.extend({"role": "user"})  # type: ignore[arg-type]  # a mapping, not a list of them
        assert await chat.messages() == [{"before": True}]


def test_extend_over_1000_messages_or_with_an_oversized_one_stores_nothing(url: str, namespace: str) -> None:
    with ChatHistory("s", namespace=namespace, url=url) as chat:
        chat.append({"before": True})
        with pytest.raises(ValueTooLarge):
            chat.extend([{"i": i} for i in range(1001)])
        with pytest.raises(ValueTooLarge):
            chat.extend([{"i": 0}, {"big": "x" * (1 << 20)}, {"i": 2}])
        assert chat.messages() == [{"before": True}]
        assert len(chat) == 1


# -- retries --------------------------------------------------------------------------------------
@pytest.mark.nats_only  # JetStream's message ids
async def test_a_retried_publish_with_the_same_msg_id_is_stored_once(url: str, namespace: str) -> None:
    """How the library de-duplicates an append retried after a timeout: the Nats-Msg-Id."""
    async with AsyncChatHistory("s", namespace=namespace, url=url) as chat:
        before = await chat.append({"n": 0})
        log = await chat._connection()  # the NATS backend's log: its connection and subject
        conn = log.conn
        data = b'{"role":"user","content":"retried"}'
        first = await conn.publish(log.subject, data, headers={"Nats-Msg-Id": "retry-1"})
        second = await conn.publish(log.subject, data, headers={"Nats-Msg-Id": "retry-1"})
        assert first == second > before
        after = await chat.append({"n": 1})
        assert await chat.messages() == [{"n": 0}, {"role": "user", "content": "retried"}, {"n": 1}]
        assert [e.seq for e in await chat.entries()] == [before, first, after]
        assert await chat.count() == 3


# -- fork -----------------------------------------------------------------------------------------
def test_fork_copies_the_prefix_and_leaves_the_original_alone(url: str, namespace: str) -> None:
    with ChatHistory("main", namespace=namespace, url=url) as chat:
        seqs = chat.extend([{"i": i} for i in range(10)])
        branch = chat.fork("main-branch", upto=seqs[5])
        try:
            assert isinstance(branch, ChatHistory)
            assert branch.session_id == "main-branch"
            assert branch.messages() == [{"i": i} for i in range(6)]
            branch.append({"branch": True})
            chat.append({"main": True})
            assert branch.messages() == [*({"i": i} for i in range(6)), {"branch": True}]
            assert chat.messages() == [*({"i": i} for i in range(10)), {"main": True}]
            with ChatHistory("main-branch", namespace=namespace, url=url) as reopened:
                assert len(reopened) == 7
            whole = chat.fork("main-copy")  # no upto: everything
            assert whole.messages() == chat.messages()
            whole.close()
            # forking into a conversation that has messages is refused, and changes nothing
            with pytest.raises(Conflict):
                chat.fork("main-branch", upto=seqs[2])
            assert len(branch) == 7
            with pytest.raises(Conflict):
                chat.fork("main-branch")
            assert branch.messages()[-1] == {"branch": True}
            # upto before the first message: an empty fork; a cleared conversation can be forked into
            empty = chat.fork("main-empty", upto=seqs[0] - 1)
            assert empty.messages() == []
            empty.close()
            branch.clear()
            again = chat.fork("main-branch", upto=seqs[1])
            assert again.messages() == [{"i": 0}, {"i": 1}]
            again.close()
            with pytest.raises(InvalidSessionId):
                chat.fork("")
        finally:
            branch.close()


async def test_fork_of_more_than_1000_messages(url: str, namespace: str) -> None:
    async with (
        AsyncChatHistory("big", namespace=namespace, url=url) as chat,
        AsyncChatHistory("noise", namespace=namespace, url=url) as noise,
    ):
        seqs = []
        for b in range(3):
            seqs += await chat.extend([{"i": b * 500 + j} for j in range(500)])
            await noise.append({"b": b})
        whole = await chat.fork("big-copy")
        part = await chat.fork("big-part", upto=seqs[1200])
        try:
            assert await whole.messages() == [{"i": i} for i in range(1500)]
            assert await whole.count() == 1500
            assert await part.messages() == [{"i": i} for i in range(1201)]
            assert await chat.count() == 1500
            with pytest.raises(Conflict):
                await chat.fork("big-copy")
            assert await whole.count() == 1500
        finally:
            await whole.close()
            await part.close()


# -- sessions -------------------------------------------------------------------------------------
def test_sessions_lists_by_glob_newest_first_with_pagination(url: str, namespace: str) -> None:
    ids = ["user:42:a", "user:42:b", "user:43:a", "other", "user:42:héllo wörld.x", "user:420:z"]
    chats = {i: ChatHistory(i, namespace=namespace, url=url) for i in ids}
    try:
        for n, i in enumerate(ids):
            chats[i].extend([{"n": k} for k in range(n + 1)])
        chats["user:42:a"].append({"late": True})  # now the newest
        everything = ChatHistory.sessions(namespace, url=url)
        assert [s.session_id for s in everything] == [
            "user:42:a",
            "user:420:z",
            "user:42:héllo wörld.x",
            "other",
            "user:43:a",
            "user:42:b",
        ]
        counts = {s.session_id: s.message_count for s in everything}
        assert counts == {i: n + 1 + (i == "user:42:a") for n, i in enumerate(ids)}
        times = [s.last_activity for s in everything]
        assert times == sorted(times, reverse=True)
        for s in everything:
            last = chats[s.session_id].entries(last=1)[0]
            assert abs(s.last_activity - last.time) < timedelta(milliseconds=1)

        mine = ChatHistory.sessions(namespace, "user:42:*", url=url)
        assert [s.session_id for s in mine] == ["user:42:a", "user:42:héllo wörld.x", "user:42:b"]
        assert [s.session_id for s in ChatHistory.sessions(namespace, "user:43:*", url=url)] == ["user:43:a"]
        assert [s.session_id for s in ChatHistory.sessions(namespace, "user:4?:a", url=url)] == [
            "user:42:a",
            "user:43:a",
        ]
        assert [s.session_id for s in ChatHistory.sessions(namespace, "user:42:[ab]", url=url)] == [
            "user:42:a",
            "user:42:b",
        ]
        assert [s.session_id for s in ChatHistory.sessions(namespace, "*:a", url=url)] == ["user:42:a", "user:43:a"]
        exact = ChatHistory.sessions(namespace, "user:42:b", url=url)
        assert [(s.session_id, s.message_count) for s in exact] == [("user:42:b", 2)]
        assert ChatHistory.sessions(namespace, "nobody:*", url=url) == []
        assert ChatHistory.sessions(namespace, "user:42", url=url) == []

        pages = [ChatHistory.sessions(namespace, limit=2, offset=o, url=url) for o in (0, 2, 4, 6)]
        assert [len(p) for p in pages] == [2, 2, 2, 0]
        assert [s for p in pages for s in p] == everything
        assert ChatHistory.sessions(namespace, limit=None, url=url) == everything
        assert ChatHistory.sessions(namespace, limit=3, offset=1, url=url) == everything[1:4]

        chats["user:42:b"].clear()
        assert "user:42:b" not in [s.session_id for s in ChatHistory.sessions(namespace, url=url)]
        assert ChatHistory.sessions(namespace + "-other", url=url) == []
    finally:
        for chat in chats.values():
            chat.close()


async def test_async_sessions(url: str, namespace: str) -> None:
    async with AsyncChatHistory("x:1", namespace=namespace, url=url) as chat:
        await chat.extend([{"n": 1}, {"n": 2}])
        (info,) = await AsyncChatHistory.sessions(namespace, "x:*", url=url)
        assert (info.session_id, info.message_count) == ("x:1", 2)
        with pytest.raises(InvalidNamespace):
            await AsyncChatHistory.sessions("bad namespace", url=url)


# -- clear ----------------------------------------------------------------------------------------
def test_clear_removes_everything_and_appends_work_afterwards(url: str, namespace: str) -> None:
    with (
        ChatHistory("s", namespace=namespace, url=url) as chat,
        ChatHistory("neighbour", namespace=namespace, url=url) as neighbour,
    ):
        chat.clear()  # clearing an empty conversation is fine
        seqs = chat.extend([{"i": i} for i in range(20)])
        neighbour.append({"keep": True})
        chat.clear()
        assert len(chat) == 0
        assert chat.messages() == []
        assert chat.entries() == []
        assert chat.messages(last=5) == []
        assert neighbour.messages() == [{"keep": True}]
        seq = chat.append({"again": 1})
        assert seq > seqs[-1]  # sequence numbers are not reused
        assert chat.messages() == [{"again": 1}]
        assert len(chat) == 1
        assert [s.message_count for s in ChatHistory.sessions(namespace, "s", url=url)] == [1]


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [["role", "user"], "a string", None, 3, b"{}", [("role", "user")]],
    ids=["list", "str", "None", "int", "bytes", "pairs"],
)
def test_append_of_a_non_mapping_is_refused(url: str, namespace: str, bad: object) -> None:
    with ChatHistory("s", namespace=namespace, url=url) as chat:
        chat.append({"before": True})
        with pytest.raises(InvalidMessage):
            chat.append(bad)  # type: ignore[arg-type]
        assert chat.messages() == [{"before": True}]


@pytest.mark.parametrize(
    "bad",
    [{"v": object()}, {"v": [1, object()]}, {"nested": {"deep": lambda: 1}}, {(1, 2): "tuple key"}],
    ids=["object", "object-in-list", "function", "tuple-key"],
)
async def test_append_of_an_unencodable_message_is_refused(url: str, namespace: str, bad: Any) -> None:
    async with AsyncChatHistory("s", namespace=namespace, url=url) as chat:
        await chat.append({"before": True})
        with pytest.raises(InvalidMessage):
            await chat.append(bad)
        assert await chat.messages() == [{"before": True}]
        assert await chat.count() == 1


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int


INEXACT: dict[str, Any] = {
    "bytes": b"\x00\xff",
    "datetime": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    "uuid": uuid.UUID(int=7),
    "decimal": decimal.Decimal("1.10"),
    "enum": Colour.RED,
    "tuple": (1, 2),
    "set": {1},
    "frozenset": frozenset({"a"}),
    "dataclass": Point(1),
    "nan": float("nan"),
    "inf": float("inf"),
}


@pytest.mark.parametrize(
    "bad",
    [{"v": v} for v in INEXACT.values()] + [{1: "int key"}, {"n": {None: 1}}],
    ids=[*INEXACT, "int-key", "None-key"],
)
async def test_a_message_that_would_not_read_back_as_appended_is_refused(url: str, namespace: str, bad: Any) -> None:
    """msgspec would store bytes as base64, datetimes, UUIDs, Decimals and Enums as strings, tuples
    and sets as lists, int keys as strings and NaN as null: "exactly as appended" forbids them."""
    async with AsyncChatHistory("s", namespace=namespace, url=url) as chat:
        await chat.append({"before": True})
        with pytest.raises(InvalidMessage, match="read back|not JSON-encodable"):
            await chat.append(bad)
        with pytest.raises(InvalidMessage, match="read back|not JSON-encodable"):
            await chat.extend([{"ok": 1}, {"deep": [{"in": [bad]}]}])
        assert await chat.messages() == [{"before": True}]


async def test_what_json_holds_round_trips_and_int_enums_read_back_as_their_values(
    url: str, namespace: str
) -> None:
    class Level(enum.IntEnum):
        HIGH = 3

    async with AsyncChatHistory("s", namespace=namespace, url=url) as chat:
        await chat.append({"level": Level.HIGH, "big": 2**70, "neg0": -0.0, "list": [[], {}, None]})
        (back,) = await chat.messages()
        assert back == {"level": 3, "big": 2**70, "neg0": -0.0, "list": [[], {}, None]}
        assert type(back["level"]) is int


def test_a_deeply_nested_message_is_an_invalid_message(url: str, namespace: str) -> None:
    deep: list[Any] = []
    inner = deep
    for _ in range(3000):
        inner.append([])
        inner = inner[0]
    with ChatHistory("s", namespace=namespace, url=url) as chat:
        with pytest.raises(InvalidMessage):
            chat.append({"deep": deep})
        assert len(chat) == 0


@pytest.mark.parametrize("bad", [{"v": "\ud800"}, {"\udfff": 1}], ids=["value", "key"])
def test_append_of_a_lone_surrogate_is_an_invalid_message(url: str, namespace: str, bad: Any) -> None:
    """A str that is not valid unicode cannot be stored: the library's own error, not UnicodeEncodeError."""
    with ChatHistory("s", namespace=namespace, url=url) as chat:
        with pytest.raises(InvalidMessage):
            chat.append(bad)
        with pytest.raises(InvalidMessage):
            chat.extend([{"ok": 1}, bad])
        assert len(chat) == 0


def test_oversized_message_is_refused_and_a_large_one_round_trips(url: str, namespace: str) -> None:
    """The session server has the default 1 MiB max_payload."""
    with ChatHistory("s", namespace=namespace, url=url) as chat:
        with pytest.raises(ValueTooLarge):
            chat.append({"content": "x" * (1 << 20)})
        with pytest.raises(ValueTooLarge):
            chat.append({"content": "é" * (600 * 1024)})  # 1.2 MB encoded, 600 K characters
        assert len(chat) == 0
        large = {"role": "user", "content": "y" * 900_000}
        seq = chat.append(large)
        assert chat.messages() == [large]
        assert chat.entries(last=1)[0].seq == seq


@pytest.mark.parametrize(
    "bad", ["", 42, None, b"bytes", "x" * 257, "a\nb", "tab\there", "nul\x00", "del\x7f", "\ud800"]
)
def test_bad_session_id_is_refused(url: str, namespace: str, bad: Any) -> None:
    with pytest.raises(InvalidSessionId):
        ChatHistory(bad, namespace=namespace, url=url)
    with pytest.raises(InvalidSessionId):
        AsyncChatHistory(bad, namespace=namespace, url=url)


async def test_longest_session_id_is_accepted(url: str, namespace: str) -> None:
    for sid in ["x" * 256, "🙂" * 256, ":".join(["ab"] * 85)]:
        async with AsyncChatHistory(sid, namespace=namespace, url=url) as chat:
            await chat.append({"sid": sid})
            assert await chat.messages() == [{"sid": sid}]
    listed = {s.session_id for s in await AsyncChatHistory.sessions(namespace, url=url)}
    assert listed == {"x" * 256, "🙂" * 256, ":".join(["ab"] * 85)}


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "a*", "ü", "x" * 65, None, 7])
def test_bad_namespace_is_refused(url: str, bad: Any) -> None:
    with pytest.raises(InvalidNamespace):
        ChatHistory("s", namespace=bad, url=url)
    with pytest.raises(InvalidNamespace):
        AsyncChatHistory("s", namespace=bad, url=url)
    with pytest.raises(InvalidNamespace):
        ChatHistory.sessions(bad, url=url)


@pytest.mark.parametrize(
    "bad", [0, -1, -0.5, float("nan"), float("inf"), "10", True, timedelta(0), timedelta(seconds=-3), [5]]
)
def test_bad_ttl_is_refused(url: str, namespace: str, bad: Any) -> None:
    with pytest.raises(InvalidTTL):
        ChatHistory("s", namespace=namespace, url=url, ttl=bad)
    with pytest.raises(InvalidTTL):
        AsyncChatHistory("s", namespace=namespace, url=url, ttl=bad)


def test_bad_read_arguments_are_refused(url: str, namespace: str) -> None:
    with ChatHistory("s", namespace=namespace, url=url) as chat:
        chat.append({"n": 1})
        with pytest.raises(InvalidArgument):
            chat.messages(last=-1)
        with pytest.raises(InvalidArgument):
            chat.entries(last=-5)
        assert chat.messages() == [{"n": 1}]


@pytest.mark.parametrize("bad", [True, False, 1.5, "3", -1], ids=["True", "False", "float", "str", "negative"])
def test_last_must_be_a_plain_non_negative_int(url: str, namespace: str, bad: Any) -> None:
    """``last=True`` is a mistake, not ``last=1``: bool is refused although it is an int."""
    with ChatHistory("s", namespace=namespace, url=url) as chat:
        chat.extend([{"n": 1}, {"n": 2}])
        with pytest.raises(InvalidArgument):
            chat.messages(last=bad)
        with pytest.raises(InvalidArgument):
            chat.entries(last=bad)


@pytest.mark.parametrize(
    "bad", [-100, -1, 2**64, 2**63, 1.5, "3", True], ids=["-100", "-1", "2**64", "2**63", "float", "str", "bool"]
)
async def test_after_must_be_a_sequence_number(url: str, namespace: str, bad: Any) -> None:
    async with AsyncChatHistory("s", namespace=namespace, url=url) as chat:
        await chat.append({"n": 1})
        with pytest.raises(InvalidArgument):
            await chat.entries(after=bad)
        with pytest.raises(InvalidArgument):
            chat.watch(after=bad)
        assert [e.message for e in await chat.entries(after=0)] == [{"n": 1}]
        assert await chat.entries(after=2**63 - 1) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"limit": -1}, {"offset": -1}, {"limit": 1.5}, {"offset": "2"}, {"limit": True}, {"offset": None}],
    ids=["limit-1", "offset-1", "limit-float", "offset-str", "limit-bool", "offset-None"],
)
def test_sessions_refuses_bad_paging_arguments(url: str, namespace: str, kwargs: dict[str, Any]) -> None:
    with ChatHistory("s", namespace=namespace, url=url) as chat:
        chat.append({"n": 1})
        with pytest.raises(InvalidArgument):
            ChatHistory.sessions(namespace, url=url, **kwargs)
        assert ChatHistory.sessions(namespace, limit=0, url=url) == []


def test_sessions_cursor_pages_cover_the_listing_once(url: str, namespace: str) -> None:
    with ChatHistory("a", namespace=namespace, url=url) as a, ChatHistory("b", namespace=namespace, url=url) as b:
        for i in range(3):
            a.append({"i": i})
            b.append({"i": i})
        for sid in ["c", "d", "e"]:
            with ChatHistory(sid, namespace=namespace, url=url) as chat:
                chat.append({"sid": sid})
        everything = ChatHistory.sessions(namespace, url=url)
        assert len(everything) == 5
        pages = [ChatHistory.sessions(namespace, limit=2, url=url)]
        while pages[-1]:
            pages.append(ChatHistory.sessions(namespace, limit=2, before=pages[-1][-1], url=url))
        assert [len(p) for p in pages] == [2, 2, 1, 0]
        assert [s for p in pages for s in p] == everything
        third = everything[2]
        assert ChatHistory.sessions(namespace, before=(third.last_activity, third.session_id), url=url) == everything[3:]
        assert ChatHistory.sessions(namespace, limit=1, offset=1, before=everything[0], url=url) == everything[2:3]


@pytest.mark.parametrize(
    "bad",
    ["c", 3, (datetime(2026, 1, 1), "naive"), (datetime(2026, 1, 1, tzinfo=UTC),), ("2026-01-01", "a")],
    ids=["str", "int", "naive-datetime", "one-item", "str-time"],
)
async def test_sessions_refuses_a_bad_cursor(url: str, namespace: str, bad: Any) -> None:
    with pytest.raises(InvalidArgument):
        await AsyncChatHistory.sessions(namespace, before=bad, url=url)


@pytest.mark.parametrize("bad", ["", None, 3, b"*"], ids=["empty", "None", "int", "bytes"])
async def test_sessions_pattern_must_be_a_non_empty_glob(url: str, namespace: str, bad: Any) -> None:
    """An empty pattern is refused (an unset variable, most likely) rather than matching nothing."""
    async with AsyncChatHistory("s", namespace=namespace, url=url) as chat:
        await chat.append({"n": 1})
        with pytest.raises(InvalidArgument):
            await AsyncChatHistory.sessions(namespace, bad, url=url)


# -- the sync face inside a running event loop ----------------------------------------------------
def test_sync_chat_history_works_inside_async_def(url: str, namespace: str) -> None:
    async def main() -> tuple[list[dict[str, Any]], int, list[str]]:
        with ChatHistory("in-loop", namespace=namespace, url=url) as chat:
            chat.append({"role": "user", "content": "hi"})
            chat.extend([{"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}])
            await asyncio.sleep(0)
            branch = chat.fork("in-loop-2")
            branch.close()
            ids = [s.session_id for s in ChatHistory.sessions(namespace, url=url)]
            return chat.messages(), len(chat), ids

    messages, n, ids = asyncio.run(main())
    assert messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    assert n == 3
    assert sorted(ids) == ["in-loop", "in-loop-2"]


@pytest.mark.nats_only  # JetStream's multi-last get limit (over HTTP: 1100 conversations take ~100 s)
async def test_sessions_lists_more_conversations_than_one_multi_last_get_answers(url: str, namespace: str) -> None:
    # A multi-last direct get answers at most 1024 subjects; beyond that sessions() pulls the last
    # message of each conversation through a consumer instead, and must list them all.
    chats = [AsyncChatHistory(f"c:{i:04d}", namespace=namespace, url=url) for i in range(1100)]
    try:
        await asyncio.gather(*(c.append({"i": i}) for i, c in enumerate(chats)))
        await chats[7].append({"i": "again"})
        listed = await AsyncChatHistory.sessions(namespace, "c:*", limit=None, url=url)
        assert len(listed) == 1100
        assert listed[0].session_id == "c:0007" and listed[0].message_count == 2
        assert {s.session_id for s in listed} == {f"c:{i:04d}" for i in range(1100)}
        assert all(s.message_count == 1 for s in listed[1:])
        narrow = await AsyncChatHistory.sessions(namespace, "c:000*", limit=None, url=url)
        assert [s.session_id for s in narrow][0] == "c:0007" and len(narrow) == 10
        # the multi-last get (narrow) and the consumer (listed) give the very same times: a
        # cursor taken from one path compares exactly on the other
        by_id = {s.session_id: s for s in listed}
        assert all(by_id[s.session_id] == s for s in narrow)
    finally:
        for c in chats:
            await c.close()
