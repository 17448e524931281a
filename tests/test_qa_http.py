"""QA-9: attacks on the HTTP API (issue 9) with a real nats-server and real ``botwire serve``."""

from __future__ import annotations

import asyncio

import httpx

from botwire_stream import AsyncMemory
from tests.http_serve import Serve
from tests.test_auth import bearer, new_key, raw_request, server

__all__ = ["server"]  # the module-scoped --auth serve of tests/test_auth.py


def test_a_percent_encoded_route_prefix_never_reaches_a_namespace_auth_did_not_check(
    server: Serve, url: str, namespace: str
) -> None:
    """Auth reads the decoded path, the dispatchers the raw one: with the prefix itself encoded
    (``/v1/%6Es/keys/k`` decodes to ``/v1/ns/keys/k``, namespace ``keys``) the raw path cut at
    the prefix's length named another namespace (``s``), which a key for ``keys`` then wrote."""
    victim = "s"  # the namespace the raw cut lands in; must stay untouched
    key = new_key(url, "keys", scope="write")
    text = {"content-type": "application/json"}
    crafted = [
        (b"PUT", b"/v1/%6Es/keys/" + namespace.encode(), b'{"value": "EVIL"}'),
        (b"GET", b"/v1/%6Es/keys/" + namespace.encode(), b""),
        (b"PUT", b"/memor%79/" + namespace.encode(), b'{"value": "EVIL"}'),
        (b"GET", b"/memor%79/" + namespace.encode(), b""),
    ]
    for method, target, body in crafted:
        status, response = raw_request(server, target, method, {**bearer(key), **text}, body)
        assert status < 500, (target, response)
        assert b"EVIL" not in response

    async def stored() -> tuple[object, object]:
        async with AsyncMemory(namespace=victim, url=url) as m1, AsyncMemory(namespace="9", url=url) as m2:
            return await m1.get(namespace), await m2.get(namespace)

    assert asyncio.run(stored()) == (None, None)
    # the honest spelling of the same routes still works for the key's own namespace
    r = httpx.put(server.base + f"/v1/ns/keys/keys/{namespace}", json={"value": "ok"}, headers=bearer(key))
    assert r.status_code < 300, r.text
