"""The HTTP transport specifically (the public-API suites run over it too, see conftest.py):
errors come back as the library's classes, an absent server is ``ServerUnavailable``."""

from __future__ import annotations

import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, Memory
from botwire_stream.errors import InvalidArgument, ServerUnavailable, ValueTooLarge
from tests.http_serve import free_port


async def test_an_error_of_the_server_is_raised_as_its_class_and_nothing_is_stored(http_server: str, url: str, namespace: str) -> None:
    # nats-server's max_payload is 1 MiB: the server refuses a larger message (413 value_too_large)
    async with AsyncChatHistory("s", namespace=namespace, url=http_server) as chat:
        with pytest.raises(ValueTooLarge):
            await chat.append({"text": "x" * (2 * 1024 * 1024)})
        assert await chat.count() == 0
    async with AsyncChatHistory("s", namespace=namespace, url=url) as direct:
        assert await direct.messages() == []


async def test_no_server_at_the_url_is_server_unavailable(namespace: str) -> None:
    async with AsyncMemory(namespace, url=f"http://127.0.0.1:{free_port()}", timeout=1) as m:
        with pytest.raises(ServerUnavailable):
            await m.get("k")


def test_the_sync_face_over_http_shares_data_with_nats(http_server: str, url: str, namespace: str) -> None:
    with Memory(namespace, url=http_server) as over_http, Memory(namespace, url=url) as over_nats:
        over_http.set("k", {"a": [1, None]}, ttl=60)
        assert over_nats.get("k") == {"a": [1, None]}
        over_nats.set("n", None)
        assert over_http.get("n", default="missing") is None  # a stored null is a value
        assert over_http.get("absent", default="missing") == "missing"


def test_one_http_url_only(namespace: str) -> None:
    with pytest.raises(InvalidArgument):
        Memory(namespace, url="http://127.0.0.1:1,http://127.0.0.1:2")
    with pytest.raises(InvalidArgument):
        Memory(namespace, url="nats://127.0.0.1:1,http://127.0.0.1:2")
