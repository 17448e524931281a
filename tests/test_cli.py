"""The ``botwire`` command line, in process (click's CliRunner) and as a real subprocess.

Everything runs against a real nats-server: the session's test server (``url``) or the embedded
server in a private ``BOTWIRE_HOME``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from botwire_stream import Memory
from botwire_stream.cli import cli
from tests import procs


@pytest.fixture
def run(url: str, namespace: str) -> Iterator[Any]:
    """Invoke the CLI in process against the test server, in this test's namespace."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(cli, ["--url", url, "-n", namespace, *args], input=input, env=env)

    yield invoke


def _json(result: Result) -> Any:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return json.loads(result.stdout)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as stopped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True


def _botwire(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m botwire_stream`` (the same code as the installed script) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "botwire_stream", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
    )


# -- set / get ------------------------------------------------------------------------------------
def test_set_parses_json_else_stores_a_string(run: Any) -> None:
    cases = {
        "obj": ('{"name": "Ada", "tags": ["x", "ü"]}', {"name": "Ada", "tags": ["x", "ü"]}),
        "num": ("42", 42),
        "flag": ("true", True),
        "nothing": ("null", None),
        "quoted": ('"42"', "42"),
        "word": ("hello world", "hello world"),
    }
    for key, (text, expected) in cases.items():
        assert run("set", key, text).exit_code == 0
        assert _json(run("get", key, "--json")) == expected, key


def test_set_string_flag_and_stdin(run: Any) -> None:
    assert run("set", "forced", "42", "--string").exit_code == 0
    assert _json(run("get", "forced", "--json")) == "42"

    assert run("set", "piped", "-", input='{"from": "stdin"}\n').exit_code == 0
    assert _json(run("get", "piped", "--json")) == {"from": "stdin"}

    assert run("set", "text", "-", "--string", input="two\nlines\n").exit_code == 0
    assert _json(run("get", "text", "--json")) == "two\nlines"


def test_set_of_broken_json_stores_the_string_and_says_so(run: Any) -> None:
    result = run("set", "broken", '{"a": 1')
    assert result.exit_code == 0
    assert "not valid JSON" in result.stderr
    assert _json(run("get", "broken", "--json")) == '{"a": 1'


def test_set_reports_the_revision(run: Any) -> None:
    first = _json(run("set", "k", "1", "--json"))
    second = _json(run("set", "k", "2", "--json"))
    assert first["key"] == "k" and second["revision"] > first["revision"]
    human = run("set", "k", "3")
    assert human.exit_code == 0 and "revision" in human.stdout


def test_get_human_output(run: Any) -> None:
    run("set", "doc", '{"a": [1, 2], "b": "ü"}')
    run("set", "name", "Ada")
    doc = run("get", "doc")
    assert doc.exit_code == 0
    assert json.loads(doc.stdout) == {"a": [1, 2], "b": "ü"}
    assert doc.stdout.count("\n") > 1  # pretty-printed, not one line
    assert run("get", "name").stdout == "Ada\n"  # strings print as they are


def test_get_of_a_missing_key_exits_1(run: Any) -> None:
    for extra in ((), ("--json",)):
        result = run("get", "nope", *extra)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert "not found" in result.stderr


def test_ttl_expires_the_key(run: Any) -> None:
    assert run("set", "session", "x", "--ttl", "1s").exit_code == 0
    for _ in range(100):  # the server counts whole seconds; wait (bounded) until it expired
        if run("get", "session").exit_code == 1:
            break
        threading.Event().wait(0.1)
    else:
        pytest.fail("a key written with --ttl 1s never expired")


# -- namespaces -----------------------------------------------------------------------------------
def test_namespace_option_and_environment(url: str, namespace: str) -> None:
    runner = CliRunner()
    other = namespace + "b"
    assert runner.invoke(cli, ["--url", url, "-n", namespace, "set", "k", "1"]).exit_code == 0
    # the option also works after the command name, and the environment supplies the default
    assert runner.invoke(cli, ["get", "k", "--url", url, "--namespace", namespace]).stdout == "1\n"
    by_env = runner.invoke(cli, ["--url", url, "get", "k"], env={"BOTWIRE_NAMESPACE": namespace})
    assert by_env.stdout == "1\n"
    assert runner.invoke(cli, ["--url", url, "-n", other, "get", "k"]).exit_code == 1
    # a command-level option overrides the group-level one
    assert runner.invoke(cli, ["--url", url, "-n", namespace, "get", "k", "-n", other]).exit_code == 1


# -- del / keys / revisions -----------------------------------------------------------------------
def test_del(run: Any) -> None:
    run("set", "k", "1")
    assert _json(run("del", "k", "--json"))["deleted"] is True
    again = run("del", "k", "--json")
    assert again.exit_code == 1 and json.loads(again.stdout)["deleted"] is False
    human = run("del", "k")
    assert human.exit_code == 1 and "not found" in human.stderr
    run("set", "k", "2")
    human = run("del", "k")
    assert human.exit_code == 0 and "deleted" in human.stdout
    assert run("get", "k").exit_code == 1


def test_keys(run: Any) -> None:
    assert _json(run("keys", "--json")) == []
    for key in ("user:2:name", "user:1:name", "team:1", "odd key: ü"):
        run("set", key, "1")
    assert _json(run("keys", "--json")) == sorted(["user:2:name", "user:1:name", "team:1", "odd key: ü"])
    assert _json(run("keys", "user:*", "--json")) == ["user:1:name", "user:2:name"]
    human = run("keys", "user:*")
    assert human.exit_code == 0 and human.stdout == "user:1:name\nuser:2:name\n"


def test_keys_pages(run: Any) -> None:
    for i in range(5):
        run("set", f"page:{i}", "1")
    assert _json(run("keys", "page:*", "--limit", "2", "--json")) == ["page:0", "page:1"]
    assert run("keys", "page:*", "--limit", "2", "--after", "page:1").stdout == "page:2\npage:3\n"
    assert _json(run("keys", "page:*", "--after", "page:3", "--json")) == ["page:4"]
    assert run("keys", "--limit", "-1").exit_code == 2  # a usage error, nothing listed


def test_revisions(run: Any) -> None:
    run("set", "k", '{"v": 1}')
    run("set", "k", '{"v": 2}')
    run("del", "k")
    trail = _json(run("revisions", "k", "--json"))
    assert [(r["op"], r["value"]) for r in trail] == [("set", {"v": 1}), ("set", {"v": 2}), ("delete", None)]
    assert trail[0]["revision"] < trail[1]["revision"] < trail[2]["revision"]
    assert all(r["time"] for r in trail)
    lines = run("revisions", "k").stdout.splitlines()
    assert len(lines) == 3
    assert "set" in lines[0] and '{"v":1}' in lines[0] and "delete" in lines[2]

    missing = run("revisions", "never")
    assert missing.exit_code == 1 and "no revisions" in missing.stderr


# -- watch ----------------------------------------------------------------------------------------
def test_watch_count_json_in_process(run: Any, url: str, namespace: str) -> None:
    """watch --count N returns after N matching changes (a writer keeps writing until it does)."""
    done = threading.Event()

    def writer() -> None:
        with Memory(namespace, url=url) as memory:
            for i in range(400):  # bounded: 400 writes at most, every 25 ms
                if done.wait(0.025):
                    return
                memory.set("other", i)  # not matched by the pattern
                memory.set(f"user:{i}", {"i": i})

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = run("watch", "user:*", "--count", "3", "--json")
    finally:
        done.set()
        thread.join()
    assert result.exit_code == 0, result.stderr
    changes = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(changes) == 3
    assert all(c["op"] == "set" and c["key"].startswith("user:") for c in changes)
    numbers = [c["value"]["i"] for c in changes]
    assert numbers == list(range(numbers[0], numbers[0] + 3))  # consecutive, none skipped
    assert [c["key"] for c in changes] == [f"user:{n}" for n in numbers]


@pytest.mark.timeout(90)
def test_watch_subprocess_sees_exactly_the_matching_changes(url: str, namespace: str) -> None:
    with procs.watching("user:*", "--count", "2", "--json", "--url", url, "-n", namespace) as proc:
        with Memory(namespace, url=url) as memory:
            memory.set("other", 1)
            memory.set("user:1", {"n": 1})
            memory.delete("user:1")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    changes = [json.loads(line) for line in out.splitlines()]
    assert [(c["key"], c["op"], c["value"]) for c in changes] == [("user:1", "set", {"n": 1}), ("user:1", "delete", None)]


@pytest.mark.timeout(90)
def test_watch_human_output_until_ctrl_c(url: str, namespace: str) -> None:
    with procs.watching("--url", url, "-n", namespace) as proc:
        with Memory(namespace, url=url) as memory:
            memory.set("greeting", "hi")
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert " set " in line and "greeting" in line and '"hi"' in line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err, err


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, words",
    [
        (["get", ""], "not a key"),
        (["set", "k", "1", "--ttl", "0"], "ttl"),
        (["-n", "bad namespace", "get", "k"], "namespace"),
        (["--url", "http://127.0.0.1:1", "get", "k"], "HTTP"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(url: str, namespace: str, args: list[str], words: str) -> None:
    result = CliRunner().invoke(cli, ["--url", url, "-n", namespace, *args])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert words in result.stderr
    assert result.stdout == ""


def test_usage_errors_exit_2(run: Any) -> None:
    assert run("set", "k", "1", "--ttl", "soon").exit_code == 2
    assert run("watch", "--count", "0").exit_code == 2
    assert run("get").exit_code == 2


def test_errors_in_a_subprocess_have_no_traceback(url: str, namespace: str) -> None:
    proc = _botwire("--url", url, "-n", namespace, "set", "k", "v", "--ttl", "-5")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "where"),
    [
        ([b"set", b"k", b"-"], b"\xff\xfe{}\n", "stdin"),
        ([b"set", b"k", b"--string", b"-"], b"caf\xe9", "stdin"),
        ([b"set", b"k", b"caf\xe9"], b"", "VALUE"),
        ([b"set", b"k", b"--string", b"\xff"], b"", "VALUE"),
    ],
    ids=["stdin", "stdin-latin1-string", "argument", "argument-string"],
)
def test_set_of_bytes_that_are_not_utf8_exits_2_and_writes_nothing(
    url: str, namespace: str, args: list[bytes], stdin: bytes, where: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "botwire_stream", "--url", url, "-n", namespace, *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.startswith(f"error: {where} is not UTF-8 text") and err.count("\n") == 1
    with Memory(namespace, url=url) as memory:
        assert memory.revisions("k") == []


# -- real subprocesses ----------------------------------------------------------------------------
def test_subprocess_round_trip_against_the_test_server(url: str, namespace: str) -> None:
    base = ("--url", url, "-n", namespace)
    assert _botwire(*base, "set", "user:1", "-", input='{"name": "Ada"}').returncode == 0
    got = _botwire(*base, "get", "user:1", "--json")
    assert got.returncode == 0 and json.loads(got.stdout) == {"name": "Ada"}
    listed = _botwire(*base, "keys", "--json")
    assert json.loads(listed.stdout) == ["user:1"]
    missing = _botwire(*base, "get", "nope")
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_installed_script(url: str, namespace: str) -> None:
    script = Path(sys.executable).with_name("botwire")
    if not script.exists():
        pytest.skip("the botwire script is not installed next to this interpreter (pip install -e .)")
    proc = subprocess.run(
        [str(script), "--url", url, "-n", namespace, "set", "k", "[1, 2]", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["key"] == "k"
    with Memory(namespace, url=url) as memory:
        assert memory.get("k") == [1, 2]


@pytest.mark.timeout(120)
def test_embedded_server_lifecycle(botwire_home: Path, namespace: str) -> None:
    # `botwire nats ...` and its old spelling `botwire server ...` manage the same server.
    not_running = _botwire("nats", "status", "--json")
    assert not_running.returncode == 1
    assert json.loads(not_running.stdout)["running"] is False
    assert _botwire("server", "status").returncode == 1

    started = _botwire("nats", "start")
    assert started.returncode == 0 and "tls://127.0.0.1:" in started.stdout
    # The messages name the command (never `botwire server`, easily taken for `botwire serve`).
    assert started.stdout.startswith("botwire nats: the embedded nats-server started: ")

    status = _botwire("nats", "status", "--json")
    assert status.returncode == 0
    state = json.loads(status.stdout)
    assert state["running"] is True and state["url"].startswith("tls://127.0.0.1:")
    assert state["home"] == str(botwire_home)
    pid = state["pid"]
    assert _alive(pid)
    assert str(pid) in started.stdout

    assert _botwire("server", "start").stdout.startswith("botwire nats: the embedded nats-server is already running: ")
    again = _botwire("server", "start", "--json")
    assert json.loads(again.stdout)["pid"] == pid and json.loads(again.stdout)["started"] is False

    # data commands without --url use this server
    assert _botwire("-n", namespace, "set", "k", '{"via": "embedded"}').returncode == 0
    got = _botwire("-n", namespace, "get", "k", "--json")
    assert json.loads(got.stdout) == {"via": "embedded"}

    stopped = _botwire("server", "stop", "--json")
    assert stopped.returncode == 0 and json.loads(stopped.stdout) == {
        "stopped": True,
        "pid": pid,
        "home": str(botwire_home),
    }
    assert not _alive(pid)
    assert _botwire("server", "status").returncode == 1
    assert _botwire("nats", "status").returncode == 1
    nothing = _botwire("nats", "stop")
    assert nothing.returncode == 0 and "botwire nats: no embedded nats-server was running" in nothing.stdout
    missing = _botwire("nats", "status")
    assert "no embedded nats-server is running" in missing.stderr and "botwire nats start" in missing.stderr


def test_help_names_nats_and_marks_server_as_its_old_spelling() -> None:
    top = _botwire("--help")
    assert top.returncode == 0
    lines = {line.split()[0]: line for line in top.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert "embedded" in lines["nats"] and "Old spelling of `botwire nats`" in lines["server"]
    for group in ("nats", "server"):
        sub = _botwire(group, "--help")
        assert sub.returncode == 0
        assert all(f"  {command} " in sub.stdout for command in ("start", "stop", "status"))
