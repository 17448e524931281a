"""Shared fixtures: a real nats-server per session, a fresh namespace per test, a private
BOTWIRE_HOME for tests of the embedded server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from botwire_stream.nats import embedded
from tests.servers import NatsServer

for _var in ("BOTWIRE_URL", "BOTWIRE_TOKEN", "BOTWIRE_CREDS", "BOTWIRE_API_KEY"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server shared by the session, with the default 1 MiB max_payload (as most deployments)."""
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


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
    from tests.http_serve import serving

    with serving(nats_server.url, tmp_path_factory.mktemp("serve") / "serve.log") as serve:
        yield serve.base
