"""The sync faces' event loop (botwire_stream/portal.py): a thread with no loop of its own runs the
shared loop itself for its call; other threads hand their calls over and take the loop over when
it is released; the background thread runs it between calls. What users rely on: calls from many
threads and from inside a running loop, watches that keep delivering meanwhile, Ctrl-C, fork, exit.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

from botwire_stream import Memory

_JOIN = 60.0  # seconds: a generous bound for "does not hang"


def _script(code: str, *args: str, timeout: float = _JOIN) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=timeout
    )


def test_update_runs_its_function_on_the_calling_thread(url: str, namespace: str) -> None:
    # No hand-off to a loop thread: the function sees the caller's thread (its thread-locals, a
    # non-thread-safe object made there), from the main thread and from any other one.
    seen: list[threading.Thread] = []

    def incr(v: int) -> int:
        seen.append(threading.current_thread())
        return v + 1

    with Memory(namespace, url=url) as m:
        assert m.update("n", incr, default=0) == 1
        worker = threading.Thread(target=lambda: m.update("n", incr))
        worker.start()
        worker.join(_JOIN)
        assert m.get("n") == 2
    assert seen == [threading.main_thread(), worker]


def test_eight_threads_call_at_once_while_a_sync_watch_waits(url: str, namespace: str) -> None:
    writers, per_writer = 8, 10
    errors: list[BaseException] = []
    changes: list[str] = []
    m = Memory(namespace, url=url)
    watch = m.watch("w:*")

    def watcher() -> None:
        try:
            for change in watch:
                changes.append(change.key)
                if len(changes) == writers * per_writer:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer(i: int) -> None:
        try:
            for j in range(per_writer):
                m.set(f"w:{i}:{j}", [i, j])
                assert m.get(f"w:{i}:{j}") == [i, j]
                m.update("count", lambda v: v + 1, default=0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    w = threading.Thread(target=watcher, daemon=True)
    w.start()
    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(writers)]
    for t in threads:
        t.start()
    for t in [*threads, w]:
        t.join(_JOIN)
        assert not t.is_alive(), "a sync call hung"
    assert errors == []
    assert m.get("count") == writers * per_writer
    assert sorted(changes) == sorted(f"w:{i}:{j}" for i in range(writers) for j in range(per_writer))
    watch.close()
    m.close()


def test_sync_calls_inside_a_running_loop_while_other_threads_call(url: str, namespace: str) -> None:
    # A thread with its own running loop cannot run ours: its calls are run by whoever runs ours
    # (another thread's call, or the background thread when none), and its loop blocks meanwhile.
    m = Memory(namespace, url=url)
    stop = threading.Event()
    other_calls = 0

    def busy() -> None:
        nonlocal other_calls
        while not stop.is_set():
            m.set("busy", other_calls)
            other_calls += 1

    t = threading.Thread(target=busy, daemon=True)
    t.start()

    async def main() -> list[Any]:
        out = []
        for i in range(50):
            m.set(f"inside:{i}", i)
            out.append(m.get(f"inside:{i}"))
        return out

    try:
        assert asyncio.run(main()) == list(range(50))
    finally:
        stop.set()
        t.join(_JOIN)
    assert other_calls > 0
    assert m.get("busy") == other_calls - 1

    async def alone() -> Any:  # nobody else calls: the background thread runs it
        m.set("alone", 1)
        return m.get("alone")

    assert asyncio.run(alone()) == 1
    m.close()


def test_ctrl_c_cancels_the_call_and_the_memory_keeps_working(url: str, namespace: str) -> None:
    # The main thread blocked in a sync watch runs the loop itself: Ctrl-C must cancel that call
    # (KeyboardInterrupt) without breaking the connection other calls share.
    out = _script(
        """
        import os, signal, sys, threading
        from botwire_stream import Memory
        m = Memory(sys.argv[2], url=sys.argv[1])
        m.set("before", 1)
        watch = m.watch("nothing:*")
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            next(watch)
        except KeyboardInterrupt:
            print("interrupted")
        m.set("after", 2)
        print(m.get("before"), m.get("after"), signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        with m.watch("after") as again:
            m.set("after", 3)
            print(next(again).value)
        m.close()
        """,
        url,
        namespace,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["interrupted", "1 2 True", "3"]


def test_exit_does_not_hang_on_a_watch_blocked_in_another_thread(url: str, namespace: str) -> None:
    started = time.monotonic()
    out = _script(
        """
        import sys, threading
        from botwire_stream import Memory
        m = Memory(sys.argv[2], url=sys.argv[1])
        watch = m.watch("nothing:*")
        ready = threading.Event()
        def wait():
            ready.set()
            next(watch)
        threading.Thread(target=wait, daemon=True).start()
        ready.wait()
        m.set("k", 1)
        print(m.get("k"))
        """,
        url,
        namespace,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert time.monotonic() - started < _JOIN / 2


def test_a_forked_child_makes_its_own_calls(url: str, namespace: str) -> None:
    out = _script(
        """
        import os, sys
        from botwire_stream import Memory
        url, ns = sys.argv[1], sys.argv[2]
        parent = Memory(ns, url=url)
        parent.set("parent", 1)
        pid = os.fork()
        if pid == 0:
            child = Memory(ns, url=url)
            child.set("child", 2)
            os._exit(0 if child.get("parent") == 1 else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), parent.get("child"))
        parent.close()
        """,
        url,
        namespace,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0 2"
