"""Values JSON cannot hold as they are raise the documented ``TypeError`` and write nothing:
NaN and infinities (msgspec would store ``null``, read back as a missing value), lone surrogates,
nesting too deep to encode. ``None`` and nulls inside values still round-trip."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from botwire_stream import Memory


@dataclasses.dataclass
class Point:
    x: float
    y: float | None


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
def memory(url: str, namespace: str) -> Iterator[Memory]:
    with Memory(namespace, url=url) as m:
        yield m


BAD: list[Any] = [
    float("nan"),
    float("inf"),
    -float("inf"),
    [1.0, None, float("nan")],
    {"a": None, "b": {"c": [float("inf")]}},
    Point(float("nan"), None),
    "lone \ud800 surrogate",
    {"k": ["\udcff"]},
    _nested(2000),
]
BAD_IDS = ["nan", "inf", "-inf", "nan-in-list", "inf-deep-in-dict", "nan-in-dataclass", "surrogate", "surrogate-in-list", "2000-deep"]


@pytest.mark.parametrize("value", BAD, ids=BAD_IDS)
def test_values_json_cannot_hold_raise_type_error_and_write_nothing(memory: Memory, value: Any) -> None:
    with pytest.raises(TypeError, match="cannot store"):
        memory.set("k", value)
    assert memory.revisions("k") == []
    memory.set("n", 1)
    with pytest.raises(TypeError, match="cannot store"):
        memory.update("n", lambda _: value)
    assert memory.get("n") == 1
    assert len(memory.revisions("n")) == 1


@pytest.mark.parametrize(
    "value",
    [None, {"a": None}, [None, 1.5, "null"], (None, 2), {1: None}, Point(1.5, None), _nested(200), "null", 1e308],
    ids=lambda v: ascii(v)[:30],
)
def test_values_with_nulls_still_round_trip(memory: Memory, value: Any) -> None:
    expected = {"(None, 2)": [None, 2], "{1: None}": {"1": None}, "Point(x=1.5, y=None)": {"x": 1.5, "y": None}}
    memory.set("k", value)
    assert memory.get("k", "missing") == expected.get(repr(value), value)
