"""Hypothesis fuzzing through the public API: keys, values, namespaces and chat messages either
round-trip exactly or raise the documented error with nothing written, and no namespace ever sees
another's data. Bounded: a fixed number of examples per property, no deadline (a real server)."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from botwire_stream import ChatHistory, Memory
from botwire_stream.errors import BotWireError, InvalidKey, InvalidNamespace, InvalidSessionId
from tests.servers import NatsServer

FUZZ = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5),
    max_leaves=20,
)
keys = st.text(max_size=40) | st.text(alphabet=":.*> /\\$%#?", max_size=10) | st.text(min_size=300, max_size=400)


def _equal(a: Any, b: Any) -> bool:
    """Equality where -0.0 == 0.0 and ints and floats of the same value match (JSON has one number)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and math.isclose(a, b, rel_tol=0, abs_tol=0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.fixture
def pair(nats_server: NatsServer) -> Iterator[tuple[Memory, Memory]]:
    """Two namespaces on the session's server."""
    a = Memory("fa" + uuid.uuid4().hex[:12], url=nats_server.url, cache=False)
    b = Memory("fb" + uuid.uuid4().hex[:12], url=nats_server.url, cache=False)
    yield a, b
    a.close()
    b.close()


def _valid_key(key: str) -> bool:
    try:
        return 0 < len(key.encode("utf-8")) <= 1024
    except UnicodeEncodeError:  # a lone surrogate
        return False


@FUZZ
@given(key=keys, value=json_values)
def test_any_key_and_value_round_trip_or_are_refused_and_no_namespace_sees_the_other(
    pair: tuple[Memory, Memory], key: str, value: Any
) -> None:
    a, b = pair
    if not _valid_key(key):
        with pytest.raises(InvalidKey):
            a.set(key, value)
        return
    a.set(key, value)
    b.set(key, ["b", value])
    assert _equal(a.get(key), value)
    assert _equal(b.get(key), ["b", value])  # same key, other namespace: its own value
    assert key in a.list_keys() and key in b.list_keys()
    assert a.delete(key) is True
    assert a.get(key, "gone") == "gone"
    assert _equal(b.get(key), ["b", value])  # untouched by the other namespace's delete
    b.delete(key)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(namespace=st.text(max_size=70) | st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
def test_namespaces_are_valid_or_refused_with_invalid_namespace(nats_server: NatsServer, namespace: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", namespace):
        with pytest.raises(InvalidNamespace):
            Memory(namespace, url=nats_server.url)
        return
    ns = namespace[:40] + uuid.uuid4().hex[:8]  # fresh: examples must not see each other
    with Memory(ns, url=nats_server.url, cache=False) as m:
        assert m.list_keys() == []
        m.set("k", namespace)
        assert m.get("k") == namespace


messages = st.dictionaries(st.text(max_size=20), json_values, max_size=6)


@FUZZ
@given(session=st.text(max_size=40), batch=st.lists(messages, min_size=1, max_size=4))
def test_chat_messages_round_trip_in_order_and_stay_in_their_namespace(
    nats_server: NatsServer, session: str, batch: list[dict[str, Any]]
) -> None:
    ns = "fc" + uuid.uuid4().hex[:12]
    try:
        chat = ChatHistory(session, namespace=ns, url=nats_server.url)
    except InvalidSessionId:
        return  # the documented refusal (empty, too long, control characters)
    with chat:
        try:
            seqs = chat.extend(batch)
        except BotWireError as exc:  # documented: a value msgspec cannot encode as JSON, etc.
            assert chat.messages() == [], exc  # all or nothing
            return
        assert len(seqs) == len(batch) and seqs == sorted(seqs)
        chat.append({"last": True})
        got = chat.messages()
        assert _equal(got, [*batch, {"last": True}])
        other = ChatHistory(session, namespace=ns + "x", url=nats_server.url)
        with other:
            assert other.messages() == []  # another namespace: the same session id holds nothing
