"""CrewAI adapters with the real crewai: ``BotWireStorage`` as a crew's memory storage (across
processes, under concurrent saves, every StorageBackend method) and ``memory_tools`` in an agent
run. The LLM and the embedder are fakes of ``tests/crewai_fakes.py``; nothing is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")

from crewai import Agent, Crew, Task  # noqa: E402
from crewai.memory.storage.backend import EmbeddingDimensionMismatchError, StorageBackend  # noqa: E402
from crewai.memory.types import MemoryRecord  # noqa: E402

from botwire_stream import Memory  # noqa: E402
from botwire_stream.errors import InvalidArgument, InvalidKey, InvalidNamespace, InvalidValue  # noqa: E402
from botwire_stream.integrations.crewai import BotWireStorage, memory_tools  # noqa: E402
from tests.crewai_fakes import ScriptedLLM, embed, run_crew  # noqa: E402


@pytest.fixture(autouse=True)
def crewai_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CrewAI keeps files (its kickoff outputs' SQLite) in a folder named by CREWAI_STORAGE_DIR
    (an absolute path is used as is): one per test, so that parallel tests share nothing."""
    monkeypatch.setenv("CREWAI_STORAGE_DIR", str(tmp_path / "crewai"))


def _rec(content: str, scope: str = "/", **kw: object) -> MemoryRecord:
    return MemoryRecord(content=content, scope=scope, embedding=embed([content])[0], **kw)  # type: ignore[arg-type]


def _crew_run(url: str, namespace: str, fact: str, *, here: bool = False) -> dict[str, object]:
    if here:  # in this process: crewai is imported once per process (about 2.5 s of CPU)
        return run_crew(url, namespace, fact)
    done = subprocess.run(
        [sys.executable, "-m", "tests.crewai_fakes", url, namespace, fact],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.slow
def test_a_crew_saves_and_recalls_memories_across_processes(url: str, namespace: str) -> None:
    first = _crew_run(url, namespace, "the user's favourite colour is teal", here=True)
    assert first["answer"] == "remembered before: nothing. FACT: the user's favourite colour is teal."
    assert first["records"] == ["the user's favourite colour is teal"]
    # a new process, a new crew: the memory extracted by the first is recalled into its prompt
    second = _crew_run(url, namespace, "the user drinks green tea")
    assert "the user's favourite colour is teal" in str(second["answer"]).split(". FACT:")[0]
    assert second["records"] == ["the user drinks green tea", "the user's favourite colour is teal"]  # newest first


def test_it_is_a_storage_backend_with_scopes_categories_and_search(url: str, namespace: str) -> None:
    s = BotWireStorage(namespace, url=url)
    assert isinstance(s, StorageBackend)
    old = datetime(2020, 1, 1, tzinfo=timezone.utc)
    a = _rec(
        "the deploy is on friday", "/project/alpha", categories=["decision"], metadata={"who": "ana"}, importance=0.9
    )
    b = _rec("alpha uses postgres", "/project/alpha/db", categories=["tech"], created_at=old)
    c = _rec("beta ships in march", "/project/beta", categories=["decision"])
    d = _rec("alphabet soup", "/project/alphabet")  # not under /project/alpha
    s.save([a, b, c, d])
    again = BotWireStorage(namespace, url=url)  # another instance (another process would do the same)
    got = again.get_record(a.id)
    assert got is not None and got.content == a.content and got.metadata == {"who": "ana"} and got.importance == 0.9
    assert got.embedding == a.embedding and got.categories == ["decision"]
    assert again.get_record("nope") is None
    assert again.count() == 4 and again.count("/project/alpha") == 2
    assert again.list_scopes("/") == ["/project"]
    assert again.list_scopes("/project") == ["/project/alpha", "/project/alphabet", "/project/beta"]
    assert again.list_categories() == {"decision": 2, "tech": 1}
    info = again.get_scope_info("/project/alpha")
    assert (info.record_count, info.categories, info.child_scopes) == (2, ["decision", "tech"], ["/project/alpha/db"])
    assert info.oldest_record == old
    # newest first, with offset/limit
    assert [r.id for r in again.list_records("/project")] == [d.id, c.id, a.id, b.id]
    assert [r.id for r in again.list_records("/project", limit=2, offset=1)] == [c.id, a.id]
    # cosine search: the exact text scores 1 and comes first; filters narrow it
    hits = again.search(embed(["the deploy is on friday"])[0], limit=2)
    assert hits[0][0].id == a.id and hits[0][1] == pytest.approx(1.0) and len(hits) == 2
    assert [r.id for r, _ in again.search(embed(["alpha"])[0], scope_prefix="/project/alpha", limit=10)] != []
    assert {r.id for r, _ in again.search(embed(["x"])[0], scope_prefix="/project/alpha")} <= {a.id, b.id}
    assert [r.id for r, _ in again.search(embed(["ships"])[0], categories=["decision"], min_score=0.3)] == [c.id]
    assert [r.id for r, _ in again.search(embed(["deploy"])[0], metadata_filter={"who": "ana"})] == [a.id]
    with pytest.raises(EmbeddingDimensionMismatchError):
        again.search([1.0, 0.0])
    # update moves a record to another scope; touch sets last_accessed
    moved = a.model_copy(update={"scope": "/archive", "content": "the deploy moved to monday"})
    again.update(moved)
    assert again.get_record(a.id).content == "the deploy moved to monday"  # type: ignore[union-attr]
    assert again.count("/project/alpha") == 1 and again.list_scopes() == ["/archive", "/project"]
    before = again.get_record(c.id).last_accessed  # type: ignore[union-attr]
    again.touch_records([c.id])
    assert again.get_record(c.id).last_accessed > before  # type: ignore[union-attr]
    s.close()
    again.close()


def test_delete_combines_its_filters_and_reset_empties_a_scope(url: str, namespace: str) -> None:
    s = BotWireStorage(namespace, url=url)
    old = datetime.now(timezone.utc) - timedelta(days=30)
    recs = [
        _rec("a", "/x", categories=["k"], created_at=old),
        _rec("b", "/x", categories=["k"]),
        _rec("c", "/x/y", metadata={"tag": 1}),
        _rec("d", "/z"),
    ]
    s.save(recs)
    assert s.delete(scope_prefix="/x", categories=["k"], older_than=datetime.now(timezone.utc) - timedelta(days=1)) == 1
    assert s.get_record(recs[0].id) is None and s.get_record(recs[1].id) is not None
    assert s.delete(metadata_filter={"tag": 1}) == 1
    assert s.delete(record_ids=[recs[3].id, "missing"]) == 1
    assert s.count() == 1
    s.save([_rec("e", "/x/deep"), _rec("f", "/keep")])
    s.reset("/x")
    assert [r.content for r in s.list_records()] == ["f"]
    s.reset()
    assert s.count() == 0
    s.close()


async def test_the_async_methods_run_on_the_callers_loop(url: str, namespace: str) -> None:
    s = BotWireStorage(namespace, url=url)
    r = _rec("async saved", "/a")
    await s.asave([r])
    [(hit, score)] = await s.asearch(embed(["async saved"])[0])
    assert hit.id == r.id and score == pytest.approx(1.0)
    assert await s.adelete(scope_prefix="/a") == 1
    await s.aclose()


def test_concurrent_saves_from_threads_lose_nothing(url: str, namespace: str) -> None:
    s = BotWireStorage(namespace, url=url)
    threads, per_thread = 8, 20
    saved: list[list[str]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(i: int) -> None:
        try:
            start.wait(timeout=30)
            for j in range(per_thread):
                rec = _rec(f"thread {i} note {j}", f"/t{i % 3}")
                s.save([rec])
                saved[i].append(rec.id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    assert not errors
    assert {r.id for r in s.list_records(limit=1000)} == {x for ids in saved for x in ids}
    assert s.count() == threads * per_thread
    s.close()


def test_bad_input_raises_and_writes_nothing(url: str, namespace: str) -> None:
    with pytest.raises(InvalidNamespace):
        BotWireStorage("no/slash", url=url)
    s = BotWireStorage(namespace, url=url)
    with pytest.raises(InvalidValue):
        s.save([_rec("fine"), {"content": "a dict"}])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument):
        s.save([_rec("fine"), MemoryRecord(id="a#b", content="x")])
    with pytest.raises(InvalidArgument):
        s.save([_rec("fine"), MemoryRecord(content="x", embedding=[float("nan")])])
    with pytest.raises(InvalidKey):
        s.save([_rec("fine"), MemoryRecord(content="x", scope="/" + "s" * 2000)])
    assert s.count() == 0  # a bad record in a batch: none of the batch is written
    with pytest.raises(InvalidArgument):
        s.search([])
    with pytest.raises(InvalidArgument):
        s.search([1.0], limit=0)
    with pytest.raises(InvalidArgument):
        s.list_records(limit=-1)
    with pytest.raises(InvalidArgument):
        s.delete(older_than="yesterday")  # type: ignore[arg-type]
    s.close()


def test_memory_tools_work_inside_an_agent_run(url: str, namespace: str) -> None:
    tools = memory_tools(namespace, url=url)
    assert [t.name for t in tools] == ["Remember a fact", "Recall a fact", "List remembered keys", "Forget a fact"]
    llm = ScriptedLLM(model="scripted")
    llm.replies = [
        'Thought: I should store it\nAction: Remember a fact\nAction Input: {"key": "colour", "value": "teal"}',
        'Thought: check\nAction: Recall a fact\nAction Input: {"key": "colour"}',
        'Thought: list\nAction: List remembered keys\nAction Input: {"pattern": "*"}',
        "Thought: done\nFinal Answer: stored",
    ]
    agent = Agent(role="Notes", goal="Keep notes", backstory="Careful", llm=llm, tools=tools)
    task = Task(description="Remember that my favourite colour is teal", expected_output="ok", agent=agent)
    result = Crew(agents=[agent], tasks=[task]).kickoff()
    assert str(result) == "stored"
    # the tools' results were fed back to the model, and the fact is a plain Memory key
    observed = "\n".join(llm.prompts)
    assert "stored 'colour'" in observed and "teal" in observed.split("Recall a fact")[-1]
    with Memory(namespace, url=url) as mem:
        assert mem.get("colour") == "teal"
        mem.set("other", "x")
    assert tools[2].run(pattern="*") == "colour, other"
    assert tools[3].run(key="colour") == "forgot 'colour'"
    assert tools[1].run(key="colour") == "not found"
    assert tools[3].run(key="colour") == "'colour' was not in memory"
    with pytest.raises(InvalidNamespace):
        memory_tools("bad ns")
