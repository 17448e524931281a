"""consumers/ and the conversation events (summaries from ``compact``, records of ``clear``), and
the materialised read actually used by ``messages()``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from botwire_stream import AsyncChatHistory, keys
from botwire_stream.nats import materialised as mat
from botwire_stream.nats.pool import acquire, release
from botwire_stream.settings import resolve
from consumers.audit import Audit
from consumers.materialiser import Materialiser
from consumers.runtime import Worker, run, status
from consumers.webhook import Webhook

from .test_consumers import _audit_ids, _Receiver
from .waits import until

pytestmark = pytest.mark.nats_only


async def _caught_up(url: str, consumer: str, stream: str) -> bool:
    for s in await status(url):
        if s.name == consumer and s.stream == stream:
            return s.pending == 0 and s.ack_pending == 0 and s.ack_floor == s.stream_last
    return False


async def _events(url: str, namespace: str, consumed: Any) -> tuple[list[int], int, int]:
    """Three messages, a summary of the first two, then (once ``consumed()``: a clear removes the
    messages) a clear: (message seqs, summary seq, clear's)."""
    async with AsyncChatHistory("conv:1", namespace=namespace, url=url) as h:
        seqs = await h.extend([{"role": "user", "content": f"m{i}"} for i in range(3)])
        summary = await h.compact("m0 and m1", upto=seqs[1])
        await until(consumed, "the events to be consumed", 20)
        await h.clear()
    return seqs, summary, summary + 1


class _Running:
    """A worker run in-process until ``stop()``."""

    def __init__(self, url: str, worker: Worker) -> None:
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(run(worker, url, stop=self.stop_event))

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 20)


async def test_audit_exports_summary_and_clear_events_as_their_kinds(url: str, namespace: str, tmp_path: Path) -> None:
    stream = f"BOTWIRE_CHAT_{namespace}"
    running = _Running(url, Audit([namespace], tmp_path / "a"))
    try:
        seqs, summary_seq, clear_seq = await _events(url, namespace, lambda: _caught_up(url, "botwire-audit", stream))
        await until(lambda: _caught_up(url, "botwire-audit", stream), "the audit to catch up", 20)
    finally:
        await running.stop()
    records = [json.loads(line) for path in sorted((tmp_path / "a").glob("audit-*.jsonl")) for line in path.open()]
    chat = [r for r in records if r["stream"] == stream]
    assert [(r["seq"], r["op"], r["session_id"]) for r in chat] == [
        (seqs[0], "append", "conv:1"),
        (seqs[1], "append", "conv:1"),
        (seqs[2], "append", "conv:1"),
        (summary_seq, "summary", "conv:1"),
        (clear_seq, "clear", "conv:1"),
    ]
    assert chat[3]["upto"] == seqs[1]
    assert json.loads(chat[3]["data"]) == {"role": "system", "content": "m0 and m1"}
    assert "data" not in chat[4] and "upto" not in chat[4]
    assert len(_audit_ids(tmp_path / "a")) == 5


async def test_webhook_posts_summary_and_clear_events(url: str, namespace: str) -> None:
    receiver = _Receiver(fail=0, secret=b"k")
    running = _Running(url, Webhook([namespace], "conv:*", receiver.url, b"k"))
    try:

        async def delivered(n: int) -> bool:
            return len(receiver.delivered) >= n

        seqs, _, _ = await _events(url, namespace, lambda: delivered(4))
        await until(lambda: delivered(5), "the webhook to deliver", 20)
    finally:
        await running.stop()
        receiver.close()
    assert [(e["op"], e["session_id"]) for e in receiver.delivered] == [
        ("append", "conv:1"),
        ("append", "conv:1"),
        ("append", "conv:1"),
        ("summary", "conv:1"),
        ("clear", "conv:1"),
    ]
    assert receiver.delivered[3]["upto"] == seqs[1]


async def test_materialiser_keeps_summaries_out_of_the_chunks_and_reflects_a_clear(url: str, namespace: str) -> None:
    stream = f"BOTWIRE_CHAT_{namespace}"
    conn = await acquire(resolve(url))
    token = keys.encode_key("conv:1")
    h = AsyncChatHistory("conv:1", namespace=namespace, url=url)
    running = _Running(url, Materialiser(namespace))
    try:
        seqs = await h.extend([{"role": "user", "content": f"m{i}"} for i in range(3)])
        await h.compact("m0 and m1", upto=seqs[1])
        seqs += await h.extend([{"role": "user", "content": "m3"}])
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 20)
        _, chunks, _ = await mat.read_chain(conn, namespace, token, 5.0)
        assert [s for c in chunks for s in c.seqs] == seqs  # the summary is no message
        assert await h.messages() == [{"role": "user", "content": f"m{i}"} for i in range(4)]
        last = await conn.direct_get_last(mat.mat_stream(namespace), mat.summary_subject(namespace, token), 5.0)
        assert last is not None and msgspec.json.decode(last.data, type=mat.Summary).message_count == 4

        await h.clear()  # and nothing written after it: the summary must not keep saying 4 messages

        async def summary_gone() -> bool:
            subject = mat.summary_subject(namespace, token)
            return await conn.direct_get_last(mat.mat_stream(namespace), subject, 5.0) is None

        await until(summary_gone, "the cleared conversation's summary to go", 15)
        assert (await mat.read_chain(conn, namespace, token, 5.0))[1] == []
        assert await h.messages() == []
        await h.append({"role": "user", "content": "after"})
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 20)
        assert await h.messages() == [{"role": "user", "content": "after"}]
        last = await conn.direct_get_last(mat.mat_stream(namespace), mat.summary_subject(namespace, token), 5.0)
        assert last is not None and msgspec.json.decode(last.data, type=mat.Summary).message_count == 1
    finally:
        await running.stop()
        await h.close()
        await release(conn)


async def test_messages_reads_the_materialised_chunks_not_the_log_span(url: str, namespace: str) -> None:
    """A conversation spread through a stream of other conversations' messages: once
    materialised, ``messages()`` asks the log for none of its messages (only where it starts, and
    what follows the chunks), so a regression to log-only reads fails here."""
    stream = f"BOTWIRE_CHAT_{namespace}"
    h = AsyncChatHistory("spread", namespace=namespace, url=url)
    noise = AsyncChatHistory("noise", namespace=namespace, url=url)
    spy = await nats.connect(url)
    requests: list[tuple[str, dict[str, Any]]] = []

    async def seen(msg: Any) -> None:
        requests.append((msg.subject, json.loads(msg.data) if msg.data else {}))

    running = _Running(url, Materialiser(namespace))
    try:
        expected = []
        for i in range(20):
            expected.append({"role": "user", "content": f"m{i}"})
            await h.append(expected[-1])
            await noise.extend([{"role": "user", "content": "x" * 100}] * 200)
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 20)
        last_seq = (await h.entries(last=1))[0].seq
        # every direct get of the namespace's two streams, as sent (a subscriber sees each request)
        await spy.subscribe(f"$JS.API.DIRECT.GET.{stream}", cb=seen)
        await spy.subscribe(f"$JS.API.DIRECT.GET.{mat.mat_stream(namespace)}.>", cb=seen)
        await spy.subscribe(f"$JS.API.DIRECT.GET.{mat.mat_stream(namespace)}", cb=seen)
        await spy.flush()
        assert await h.messages() == expected
        await spy.flush()
        subject = f"botwire.{namespace}.chat.spread"
        log_reads = [
            body
            for s, body in requests
            if s.endswith(stream) and body.get("next_by_subj") == subject and body.get("batch", 1) > 1
        ]
        assert all(body.get("seq", 0) > last_seq for body in log_reads), log_reads  # nothing of it from the log
        assert any(mat.mat_stream(namespace) in s for s, _ in requests)  # the chunks were read
    finally:
        await running.stop()
        await spy.close()
        await h.close()
        await noise.close()


async def test_sessions_take_title_first_activity_and_tokens_from_current_summaries_only(
    url: str, namespace: str
) -> None:
    stream = f"BOTWIRE_CHAT_{namespace}"
    h = AsyncChatHistory("a", namespace=namespace, url=url)
    running = _Running(url, Materialiser(namespace))
    try:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello " * 20}]
        await h.extend(messages)
        await until(lambda: _caught_up(url, "botwire-materialise", stream), "the materialiser to catch up", 20)
    finally:
        await running.stop()
    try:
        entries = await h.entries()
        [info] = await AsyncChatHistory.sessions(namespace, url=url)
        assert (info.session_id, info.message_count, info.last_activity) == ("a", 2, entries[-1].time)
        assert info.title == ("hello " * 20)[:80]
        assert info.first_activity == entries[0].time
        assert info.tokens == sum(len(msgspec.json.encode(m)) for m in messages) // 4
        # the materialiser stopped: a lagging summary is not used, and one never written is none
        await h.append({"role": "assistant", "content": "hi"})
        async with AsyncChatHistory("b", namespace=namespace, url=url) as b:
            await b.append({"role": "user", "content": "new"})
        listed = {s.session_id: s for s in await AsyncChatHistory.sessions(namespace, url=url)}
        assert listed["a"].message_count == 3 and listed["b"].message_count == 1
        assert all((s.title, s.first_activity, s.tokens) == (None, None, None) for s in listed.values())
    finally:
        await h.close()
