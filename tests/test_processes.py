"""Several OS processes on one namespace: what one writes the others read and watch, and
concurrent read-modify-writes lose nothing. Children run ``python -m tests.workers``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from botwire_stream import AsyncMemory, Memory
from tests import workers
from tests.servers import NatsServer
from tests.workers import take


def test_update_from_eight_processes_loses_no_increment(url: str, namespace: str, tmp_path: Path) -> None:
    results = workers.run_together(8, tmp_path / "go", "incr", url, namespace, "counter", "50", str(tmp_path / "go"))
    with Memory(namespace, url=url) as m:
        assert m.get("counter") == 400
    written = sorted(v for r in results for v in r)
    assert written == list(range(1, 401))  # every update returned a distinct new value


def test_one_process_writes_another_reads(url: str, namespace: str) -> None:
    value = {"role": "user", "content": "héllo", "n": [1, 2.5, None]}
    rev = workers.run("set", url, namespace, "user:42:history", json.dumps(value))
    assert workers.run("get", url, namespace, "user:42:history") == {"found": True, "value": value}
    with Memory(namespace, url=url) as m:
        assert m.get("user:42:history") == value
        assert m.revisions("user:42:history")[-1].revision == rev
        m.set("from-parent", [1])
    assert workers.run("get", url, namespace, "from-parent") == {"found": True, "value": [1]}
    assert workers.run("get", url, namespace, "nothing") == {"found": False, "value": None}


def test_processes_share_the_embedded_server(botwire_home: Path, namespace: str) -> None:
    workers.run("set", "-", namespace, "k", json.dumps({"from": "child"}))
    assert workers.run("get", "-", namespace, "k") == {"found": True, "value": {"from": "child"}}
    with Memory(namespace) as m:
        assert m.get("k") == {"from": "child"}
        m.set("k2", "from parent")
    assert workers.run("get", "-", namespace, "k2") == {"found": True, "value": "from parent"}


def test_sync_watch_sees_changes_of_another_process(url: str, namespace: str) -> None:
    ops = [
        ["set", "other:1", 0],
        ["set", "user:1", {"a": 1}],
        ["set", "users", 0],
        ["set", "user:2:x", "b"],
        ["delete", "user:1"],
        ["delete", "other:1"],
        ["set", "user:done", True],
    ]
    with Memory(namespace, url=url) as m, m.watch("user:*") as watch:
        revs = workers.run("ops", url, namespace, json.dumps(ops))
        changes = take(watch, 4)
    assert [(c.key, c.op, c.value) for c in changes] == [
        ("user:1", "set", {"a": 1}),
        ("user:2:x", "set", "b"),
        ("user:1", "delete", None),
        ("user:done", "set", True),
    ]
    assert changes[0].revision == revs[1]
    assert changes[-1].revision == revs[-1]


async def test_async_watch_sees_changes_of_another_process(url: str, namespace: str) -> None:
    ops = [["set", "a:1", 1], ["set", "b:1", 1], ["delete", "a:1"], ["set", "a:2", 2]]
    async with AsyncMemory(namespace, url=url) as memory:
        async with memory.watch("a:*") as watch:
            await asyncio.to_thread(workers.run, "ops", url, namespace, json.dumps(ops))
            got = []
            async with asyncio.timeout(20):
                async for change in watch:
                    got.append((change.key, change.op, change.value))
                    if len(got) == 3:
                        break
    assert got == [("a:1", "set", 1), ("a:1", "delete", None), ("a:2", "set", 2)]


def test_watch_on_the_embedded_server_sees_another_process(botwire_home: Path, namespace: str) -> None:
    with Memory(namespace) as m, m.watch() as watch:
        workers.run("ops", "-", namespace, json.dumps([["set", "k", "v"], ["delete", "k"]]))
        changes = take(watch, 2)
    assert [(c.key, c.op) for c in changes] == [("k", "set"), ("k", "delete")]


def test_acknowledged_writes_survive_kill_9_and_restart_of_the_server(own_server: NatsServer, namespace: str) -> None:
    big = "b" * (3 * 1024 * 1024)  # chunked on this 1 MiB server
    with Memory(namespace, url=own_server.url) as m:
        revs = {f"k:{i}": m.set(f"k:{i}", {"i": i}) for i in range(200)}
        m.set("big", big)
        m.set("deleted", 1)
        m.delete("deleted")
        assert m.update("counter", lambda v: v + 1, default=0) == 1
        child_rev = workers.run("set", own_server.url, namespace, "from-child", '"child"')

        own_server.kill()
        own_server.start()  # same port, same store

        assert m.get("k:199") == {"i": 199}  # the open memory reconnects by itself
        assert m.update("counter", lambda v: v + 1, default=0) == 2
    with Memory(namespace, url=own_server.url) as fresh:
        assert fresh.list_keys() == sorted([*revs, "big", "counter", "from-child"])
        assert all(fresh.get(k) == {"i": int(k[2:])} for k in revs)
        assert all(fresh.revisions(k)[-1].revision == rev for k, rev in revs.items())
        assert fresh.get("big") == big
        assert fresh.get("from-child") == "child"
        assert fresh.revisions("from-child")[-1].revision == child_rev
        assert "deleted" not in fresh
