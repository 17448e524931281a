"""Replay and time travel over the HTTP transport (``Memory("ns", url="http://...")`` against
``botwire serve``): the same events, past values and messages as over NATS, ``BeforeRetention``
as 410, and the endpoints in /openapi.json."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, areplay
from botwire_stream.errors import BeforeRetention, InvalidArgument

from .servers import NatsServer

pytestmark = pytest.mark.nats_only


def _brief(events: list) -> list[tuple]:  # type: ignore[type-arg]
    return [(e.source, e.seq, e.time, e.kind, e.key, e.value, e.origin, e.upto) for e in events]


async def test_replay_over_http_yields_what_replay_over_nats_does(
    nats_server: NatsServer, http_server: str, namespace: str
) -> None:
    async with AsyncMemory(namespace, url=http_server) as m, AsyncChatHistory("c:1", namespace=namespace, url=http_server) as c:
        await m.set("user:1", {"n": 1})
        await c.append({"role": "user", "content": "hi"})
        await m.set("user:1", {"n": 2})
        between = datetime.now(UTC)
        assert await m.delete("user:1")
        await c.extend([{"role": "user", "content": "a"}, {"role": "user", "content": "ü ."}])
        await m.set("other", [1, 2])
        over_http = [e async for e in areplay(namespace, url=http_server)]
        over_nats = [e async for e in areplay(namespace, url=nats_server.url)]
        assert _brief(over_http) == _brief(over_nats)
        assert [(e.kind, e.key) for e in over_http][:3] == [("set", "user:1"), ("append", "c:1"), ("set", "user:1")]
        assert len(over_http) == 7
        # filters and bounds cross too
        only = [e async for e in areplay(namespace, url=http_server, keys="user:*", conversations=None, start=2)]
        assert [(e.kind, e.seq) for e in only] == [("set", 2), ("delete", 3)]
        assert _brief([e async for e in areplay(namespace, url=http_server, start=between)]) == _brief(over_http[3:])
        assert _brief([e async for e in m.replay("user:*")]) == _brief([e for e in over_nats if e.key == "user:1"])
        with pytest.raises(InvalidArgument):
            [e async for e in areplay(namespace, url=http_server, start=1)]  # a sequence needs one log


async def test_get_at_and_messages_at_over_http_answer_the_past(
    nats_server: NatsServer, http_server: str, namespace: str
) -> None:
    async with AsyncMemory(namespace, url=nats_server.url, history=2):
        pass  # the history depth is the server's to set over HTTP
    async with AsyncMemory(namespace, url=http_server) as m, AsyncChatHistory(
        "c", namespace=namespace, url=http_server
    ) as c:
        await m.set("k", "first")
        await c.append({"n": 1})
        t1 = datetime.now(UTC)
        await m.set("k", "second")
        await c.append({"n": 2})
        t2 = datetime.now(UTC)
        assert await m.get("k", at=t1) == "first"
        assert await m.get("k", at=t2) == "second"
        assert await m.get("never", "dflt", at=t2) == "dflt"
        assert await c.messages(at=t1) == [{"n": 1}]
        assert await c.messages(at=t2) == [{"n": 1}, {"n": 2}]
        await m.set("k", "third")  # history=2: "first" is no longer kept
        with pytest.raises(BeforeRetention, match="keeps 2 revisions per key"):
            await m.get("k", at=t1)
        await c.clear()
        with pytest.raises(BeforeRetention, match="it was cleared at"):
            await c.messages(at=t2)  # the server records the clear, as over NATS
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{http_server}/v1/ns/{namespace}/past/keys/k", params={"at": t1.isoformat()})
        assert r.status_code == 410 and r.json()["error"]["code"] == BeforeRetention.code
        r = await client.get(f"{http_server}/v1/ns/{namespace}/past/keys/k", params={"at": "2026-13-01"})
        assert r.status_code == 400
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        for past in ("past/keys/k", "past/chats/c"):  # as over NATS: not known yet (before: today's state)
            r = await client.get(f"{http_server}/v1/ns/{namespace}/{past}", params={"at": future})
            assert r.status_code == 400 and r.json()["error"]["code"] == InvalidArgument.code, r.text
            assert "is in the future" in r.json()["error"]["message"]
        r = await client.get(f"{http_server}/v1/ns/{namespace}/replay", params={"keys": "k", "conversations": ""})
        assert r.headers["content-type"] == "application/x-ndjson"
        assert [(e["key"], e["value"]) for e in map(json.loads, r.text.splitlines())] == [("k", "second"), ("k", "third")]
        doc = (await client.get(f"{http_server}/openapi.json")).json()
    for path in ("/v1/ns/{namespace}/replay", "/v1/ns/{namespace}/past/keys/{key}", "/v1/ns/{namespace}/past/chats/{session}"):
        assert "get" in doc["paths"][path]
    assert {"EventOut", "PastValue", "PastMessages"} <= set(doc["components"]["schemas"])
