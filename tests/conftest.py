"""Shared fixtures: a real nats-server per session, a fresh namespace per test, a private
BOTWIRE_HOME for tests of the embedded server.

Under pytest-xdist (``addopts`` in pyproject.toml) a session is one worker: each worker has its
own nats-server and ``botwire serve`` (random loopback ports), temp dirs (``tmp_path_factory``
gives each worker its own) and environment, so no two workers share a server, port or file."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from botwire_stream.nats import embedded
from tests.http_serve import Serves, serving
from tests.servers import NatsServer

for _var in ("BOTWIRE_URL", "BOTWIRE_TOKEN", "BOTWIRE_CREDS", "BOTWIRE_API_KEY"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server shared by the session, with the default 1 MiB max_payload (as most deployments)."""
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


# The heaviest tests (tens of thousands of messages or keys, 64 MiB values, the npm conformance
# suite) saturate CPU and disk by themselves; run side by side on other workers they starved each
# other into 5 s NATS timeouts (4 workers on 2 cores). One xdist group runs them one after another
# on one worker (``--dist loadgroup``) while the light tests share the other workers.
HEAVY = {
    "tests/test_chat_large.py",
    "tests/test_conformance.py",
    "tests/test_qa_listing.py::test_keys_that_exist_throughout_are_listed_while_other_keys_vanish_past_100k",
    "tests/test_listing_sessions.py::test_more_than_1024_interleaved_conversations",
    "tests/test_errors.py::test_value_over_64_mib_is_refused_and_64_mib_is_not",
    "tests/test_qa_chat.py::test_a_read_racing_a_clear_and_an_append_gives_all_old_or_the_new_never_a_mix",
    "tests/test_qa_chat.py::test_reads_racing_clears_in_another_process_never_mix_old_and_new_messages",
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        base = item.nodeid.split("[", 1)[0]
        if base in HEAVY or base.split("::", 1)[0] in HEAVY:
            item.add_marker(pytest.mark.xdist_group("heavy"))


# Test modules of the public API run twice: over NATS and over HTTP (a ``botwire serve`` of the
# session's nats-server), with the same expectations; a test marked ``nats_only`` runs once.
HTTP_MODULES = {"tests.test_memory", "tests.test_chat"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if (
        metafunc.module.__name__ in HTTP_MODULES
        and "url" in metafunc.fixturenames
        and metafunc.definition.get_closest_marker("nats_only") is None
    ):
        metafunc.parametrize("transport", ["nats", "http"], indirect=True)


@pytest.fixture
def transport(request: pytest.FixtureRequest) -> str:
    """``"nats"``, or ``"http"`` where ``pytest_generate_tests`` parametrizes it."""
    return str(getattr(request, "param", "nats"))


@pytest.fixture
def url(nats_server: NatsServer, transport: str, request: pytest.FixtureRequest) -> str:
    """The URL a test connects to: the nats-server, or over HTTP a ``botwire serve`` of it."""
    if transport == "http":
        base: str = request.getfixturevalue("http_server")
        return base
    return nats_server.url


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses."""
    return "t" + uuid.uuid4().hex[:16]


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test alone, for tests that stop, kill or restart it."""
    server = NatsServer(tmp_path / "own").start()
    yield server
    server.stop()


@pytest.fixture
def botwire_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private BOTWIRE_HOME; the embedded server started in it is stopped afterwards."""
    home = tmp_path / "home"
    monkeypatch.setenv("BOTWIRE_HOME", str(home))
    yield home
    embedded.stop(home)


@pytest.fixture(scope="session")
def http_server(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``botwire serve`` process over the session's nats-server, shared by the session: its
    base URL (``http://127.0.0.1:PORT``)."""
    with serving(nats_server.url, tmp_path_factory.mktemp("serve") / "serve.log") as serve:
        yield serve.base


@pytest.fixture
def serves(tmp_path: Path) -> Iterator[Serves]:
    """Starts ``botwire serve`` processes for this test (``serves.start(url, ...)``,
    ``serves.chat(url, env)``) and stops them all when it ends; free ports, logs in ``tmp_path``.
    Ask for it after ``own_server`` so that the serve processes stop before their NATS does."""
    started = Serves(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()
