"""Issue 10's leftovers: a compaction published twice is one summary; ..."""

from __future__ import annotations

import subprocess
import sys

from botwire_stream import AsyncChatHistory, areplay

from .waits import until


async def test_the_same_compaction_published_twice_is_stored_once(url: str, namespace: str) -> None:
    # A caller retrying compact() after an OutcomeUnknown (or a compaction run repeated over the
    # same range) publishes the same summary again: the server keeps one, the retry gets its sequence.
    async with AsyncChatHistory("c", namespace=namespace, url=url) as chat:
        seqs = await chat.extend([{"role": "user", "content": str(i)} for i in range(5)])
        first = await chat.compact("five messages", upto=seqs[-1])
        again = await chat.compact("five messages (summarised again)", upto=seqs[-1])
        assert again == first
        summaries = [e async for e in areplay(namespace, url=url, keys=None) if e.kind == "summary"]
        assert [(e.seq, e.upto, e.value["content"]) for e in summaries] == [(first, seqs[-1], "five messages")]
        last = await chat.last_summary()
        assert last is not None and (last.seq, last.upto) == (first, seqs[-1])
        assert await chat.messages(window=1) == [
            {"role": "system", "content": "five messages"},
        ]
        # a later range is a new summary
        more = await chat.append({"role": "user", "content": "5"})
        later = await chat.compact("six", upto=more)
        assert later > first
        assert await chat.messages(window=5) == [{"role": "system", "content": "six"}]


async def test_an_age_limit_set_by_another_process_is_seen_without_reconnecting(url: str, namespace: str) -> None:
    # This process reads last=N (it then remembers the conversation's newest messages); another
    # process sets log_age; once the messages have aged out, last=N must not answer from memory.
    async with AsyncChatHistory("c", namespace=namespace, url=url) as chat:
        await chat.extend([{"n": 0}, {"n": 1}])
        assert await chat.messages(last=2) == [{"n": 0}, {"n": 1}]
        code = (
            "import sys; from botwire_stream import retention\n"
            "print(retention(sys.argv[1], log_age=1, url=sys.argv[2]).log_age)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, namespace, url], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "1.0", out.stderr

        async def aged_out() -> bool:
            # through replay (a consumer): a read of the conversation would replace what it remembers
            return [e async for e in areplay(namespace, url=url, keys=None) if e.kind == "append"] == []

        await until(aged_out, "the messages age out", bound=30)
        assert await chat.messages(last=2) == []
        assert await chat.messages(last=1) == []
