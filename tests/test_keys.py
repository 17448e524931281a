"""Keys: any non-empty str up to 1024 UTF-8 bytes round-trips, and list_keys follows fnmatch.

The pure properties of the encoding are checked without a server; the rest against the session's
real nats-server.
"""

from __future__ import annotations

import glob
import re
import uuid
from collections.abc import Iterator
from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botwire_stream import Memory, keys
from botwire_stream.errors import InvalidKey
from tests.servers import NatsServer
from tests.workers import take

# Segments that stress the encoding: NATS wildcards and separators, the escape character '=',
# whitespace, unicode, empty segments; joined with ':' into keys.
SEGMENTS = st.one_of(
    st.sampled_from(
        ["", ".", "..", "*", ">", " ", "=", "=x", "==", "=YQ", "a", "user", "42", "ü", "héllo wörld",
         "$KV", "a.b", "*>", "\t", "-", "_", "日本", "🙂", "\x00", "a b", "%2E"]
    ),
    st.text(st.characters(codec="utf-8"), max_size=8),
)


def _small(key: str) -> bool:
    return bool(key) and len(key.encode()) <= keys.MAX_KEY_BYTES


KEYS = st.one_of(
    st.lists(SEGMENTS, min_size=1, max_size=6).map(":".join),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
).filter(_small)

# Glob patterns built from the same segments plus fnmatch wildcards.
PATTERN_SEGMENTS = st.one_of(SEGMENTS, st.sampled_from(["*", "?", "a*", "*b", "[ab]", "[!a]", "u?er", "4*"]))
PATTERNS = st.lists(PATTERN_SEGMENTS, min_size=1, max_size=4).map(":".join).filter(_small)

_TOKEN = re.compile(r"[A-Za-z0-9_=-]+")
BIG_KEYS = [
    "k" * 1024,  # 1024 ASCII bytes, one plain token
    "é" * 512,  # 1024 UTF-8 bytes, one encoded token
    ":" * 1024,  # 1025 empty segments
    ".:" * 512,  # 513 segments that need encoding
    "🙂" * 256,  # 1024 bytes of 4-byte characters
]


def _subject_matches(filter_subject: str, subject: str) -> bool:
    """NATS subject matching: '*' is one token, a final '>' one or more."""
    f, s = filter_subject.split("."), subject.split(".")
    for i, tok in enumerate(f):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(f) == len(s)


# -- the encoding, without a server ----------------------------------------------------------------
@given(KEYS)
@settings(max_examples=300)
def test_encoding_is_reversible_and_subject_safe(key: str) -> None:
    encoded = keys.encode_key(key)
    assert keys.decode_key(encoded) == key
    tokens = encoded.split(".")
    assert len(tokens) == key.count(":") + 1  # one token per ':'-segment, none empty
    assert all(_TOKEN.fullmatch(t) for t in tokens), encoded  # no wildcard, space or empty token


@given(KEYS, KEYS)
@settings(max_examples=300)
def test_distinct_keys_never_share_a_subject(a: str, b: str) -> None:
    if a != b:
        assert keys.encode_key(a) != keys.encode_key(b)


@pytest.mark.parametrize("key", ["user:42:history", "a-b_c", "A:b:C9"])
def test_plain_segments_stay_readable(key: str) -> None:
    assert keys.encode_key(key) == key.replace(":", ".")


@pytest.mark.parametrize("key", ["=", "=abc", "a:=b", "x:==:y"])
def test_keys_starting_with_the_escape_character_round_trip(key: str) -> None:
    assert keys.decode_key(keys.encode_key(key)) == key


@given(KEYS, PATTERNS)
@settings(max_examples=300)
def test_pattern_filter_keeps_every_matching_key(key: str, pattern: str) -> None:
    """The server-side filter may hold extra keys, but never drops a key fnmatch accepts."""
    subject_filter, exact = keys.pattern_filter(pattern)
    if exact:
        assert subject_filter == keys.encode_key(pattern)
    if fnmatchcase(key, pattern):
        assert _subject_matches(subject_filter, keys.encode_key(key)), (key, pattern, subject_filter)


@pytest.mark.parametrize("key", BIG_KEYS)
def test_1024_byte_keys_are_accepted(key: str) -> None:
    assert len(key.encode()) == 1024
    assert keys.decode_key(keys.encode_key(key)) == key


@pytest.mark.parametrize("key", ["k" * 1025, "é" * 512 + "x", "🙂" * 257])
def test_keys_over_1024_bytes_are_refused(key: str) -> None:
    with pytest.raises(InvalidKey, match="1024"):
        keys.encode_key(key)


# -- against the server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def memory(nats_server: NatsServer) -> Iterator[Memory]:
    """One namespace for the whole module (hypothesis runs many examples per test)."""
    with Memory("t" + uuid.uuid4().hex[:16], url=nats_server.url) as m:
        yield m


@given(KEYS, st.integers())
@settings(max_examples=50, deadline=None)
def test_awkward_keys_round_trip(memory: Memory, key: str, value: int) -> None:
    rev = memory.set(key, {"key": key, "n": value})
    assert memory.get(key) == {"key": key, "n": value}
    assert key in memory
    assert memory.list_keys(glob.escape(key)) == [key]  # a pattern matching only this key
    assert [r.revision for r in memory.revisions(key)][-1] == rev
    assert memory.delete(key) is True
    assert memory.get(key, "gone") == "gone"
    assert key not in memory
    assert memory.list_keys(glob.escape(key)) == []


@pytest.mark.parametrize("key", BIG_KEYS)
def test_1024_byte_keys_round_trip(memory: Memory, key: str) -> None:
    memory.set(key, "big key")
    assert memory.get(key) == "big key"
    assert memory.list_keys(glob.escape(key)) == [key]
    with memory.watch(glob.escape(key)) as watch:
        memory.set(key, "again")
        (change,) = take(watch, 1)
    assert (change.key, change.op, change.value) == (key, "set", "again")
    assert memory.delete(key)


@given(st.lists(KEYS, min_size=1, max_size=8, unique=True), st.lists(PATTERNS, min_size=1, max_size=4))
@settings(max_examples=50, deadline=None)
def test_list_keys_is_sorted_fnmatch(nats_server: NatsServer, stored: list[str], patterns: list[str]) -> None:
    with Memory("t" + uuid.uuid4().hex[:16], url=nats_server.url) as m:
        for k in stored:
            m.set(k, 1)
        assert m.list_keys() == sorted(stored)
        for pattern in patterns:
            assert m.list_keys(pattern) == sorted(k for k in stored if fnmatchcase(k, pattern)), pattern


def test_star_spans_colons_and_question_mark_is_one_character(memory: Memory) -> None:
    base = "fn" + uuid.uuid4().hex[:8]
    stored = [f"{base}:a", f"{base}:a:b", f"{base}:a:b:c", f"{base}:ab", f"{base}x:a", f"{base}:[x]"]
    for k in stored:
        memory.set(k, k)
    assert memory.list_keys(f"{base}:*") == sorted([f"{base}:a", f"{base}:a:b", f"{base}:a:b:c", f"{base}:ab", f"{base}:[x]"])
    assert memory.list_keys(f"{base}:a*") == sorted([f"{base}:a", f"{base}:a:b", f"{base}:a:b:c", f"{base}:ab"])
    assert memory.list_keys(f"{base}:a:*") == [f"{base}:a:b", f"{base}:a:b:c"]
    assert memory.list_keys(f"{base}:?") == [f"{base}:a"]
    assert memory.list_keys(f"{base}:??") == [f"{base}:ab"]
    assert memory.list_keys(f"{base}*:a") == [f"{base}:a", f"{base}x:a"]
    assert memory.list_keys(f"{base}:[[]x]") == [f"{base}:[x]"]
    assert memory.list_keys(f"{base}:a") == [f"{base}:a"]  # no wildcard: exactly that key
    assert memory.list_keys(f"{base}:zz") == []


def test_change_key_is_the_original_key(memory: Memory) -> None:
    prefix = "w" + uuid.uuid4().hex[:8]
    awkward = [f"{prefix}:{s}" for s in ["", ".", "*", ">", " ", "=x", "a::b", "ü:日本", "a.b:c", "x:"]]
    with memory.watch(f"{prefix}:*") as watch:
        for k in awkward:
            memory.set(k, k)
        memory.delete(awkward[0])
        seen = [(c.key, c.op, c.value) for c in take(watch, len(awkward) + 1)]
    assert seen == [(k, "set", k) for k in awkward] + [(awkward[0], "delete", None)]
    assert memory.list_keys(f"{prefix}:*") == sorted(awkward[1:])


@pytest.mark.parametrize("bad", ["", 5, None, b"bytes", "\ud800"])
def test_list_keys_refuses_bad_patterns(memory: Memory, bad: object) -> None:
    with pytest.raises(InvalidKey):
        memory.list_keys(bad)  # type: ignore[arg-type]


def test_glob_escape_lists_a_prefix_literally() -> None:
    from botwire_stream.keys import glob_escape, matches

    prefix = "a*b?c[d]"
    assert glob_escape(prefix) == "a[*]b[?]c[[]d]"
    assert matches(prefix + ":x", glob_escape(prefix) + "*")
    assert not matches("aXbYcd:x", glob_escape(prefix) + "*")
