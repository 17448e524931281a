"""QA of the listings (issue 13 item 1): what ``list_keys`` and ``sessions`` give while the
namespace changes under them, at sizes past the server's per-reply limits."""

from __future__ import annotations

import asyncio
import threading

import nats
import pytest

from botwire_stream import Memory
from botwire_stream.keys import encode_key
from tests.test_listing import _bucket, _load


async def _purge_one_by_one(url: str, stream: str, subjects: list[str], started: threading.Event, stop: threading.Event) -> int:
    """Purge ``subjects`` in order (a stream purge: the subject leaves the server's index), as an
    operator's ``nats stream purge --subject`` would, until all are gone or ``stop`` is set."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        done = 0
        for subject in subjects:
            if stop.is_set():
                break
            await js.purge_stream(stream, subject=subject)
            done += 1
            started.set()
        return done
    finally:
        started.set()
        await nc.close()


@pytest.mark.slow
def test_keys_that_exist_throughout_are_listed_while_other_keys_vanish_past_100k(url: str, namespace: str) -> None:
    """Past 100,000 keys the server's subject index is read in pages (offset into its sorted
    names); keys sorted before the page boundary vanishing between two pages (purged, or an
    expiry marker gone) must not make a key that existed all along go missing."""
    stream, prefix = _bucket(namespace)
    gone = [f"a:{i:05d}" for i in range(3000)]
    kept = [f"b:{i:06d}" for i in range(100_000)]
    with Memory(namespace, url=url, timeout=30) as m:
        m.set("init", 0)
        asyncio.run(_load(url, namespace, gone + kept))
        started, stop = threading.Event(), threading.Event()
        purged: list[int] = []
        t = threading.Thread(
            target=lambda: purged.append(
                asyncio.run(_purge_one_by_one(url, stream, [prefix + encode_key(k) for k in gone], started, stop))
            )
        )
        t.start()
        try:
            assert started.wait(30)
            missing: set[str] = set()
            for _ in range(3):  # each listing spans two pages of the index
                listed = set(m.list_keys("*"))
                missing |= set(kept) - listed
        finally:
            stop.set()
            t.join(60)
        assert purged and purged[0] > 0
        assert not missing, f"{len(missing)} keys that existed throughout were not listed, e.g. {sorted(missing)[:3]}"


TRICKY = [
    "a", "a:", ":a", "::", "a::b", "a:b:c", "a:b", "a*b:c", "a?b:c", "a[b]:c", "[:x", "]:x", "a.b:c", "a>b",
    "a b:c d", "ü:ö", "üser:42:x", "user:42:x", "user:42:", "user:420:y", "user:4:2", "*", "?", "[", "[!]",
    "日本:語", "emoji:🙂:1", "tab\tkey", "x:" + "é" * 510, "y:" + "a" * 1020, "z" * 1024,
]
GLOBS = [
    "*", "a*", "a:*", "a:?", "a:b*", "?:*", "[ab]:*", "[!a]*", "[a-c]:*", "a[*]b:*", "a[?]b:c", "a[[]b]:c",
    "[[]:x", "]:*", "[]]:x", "*:c", "*:c*", "ü:*", "üser:*", "user:4*", "user:42:*", "user:42:?", "user:42*",
    "[*]", "[?]", "[[]", "[[]![]]", "日*", "emoji:*:1", "tab*", "x:é*", "y:" + "a" * 1020, "y:*a", "z*",
    "*:", "*::*", ":*", "a.b:*", "a>*", "a b:*", "user:42:x", "user", "[",
]


def test_every_glob_feature_lists_what_fnmatch_matches(url: str, namespace: str) -> None:
    """Keys holding glob metacharacters, empty segments, unicode and 1024-byte keys; patterns
    with ``*``, ``?``, ``[...]``, ``[!...]``, ranges and bracket escapes: ``list_keys`` gives
    what fnmatch matches among the keys, sorted, and pages of 1 and 3 give the same."""
    from fnmatch import fnmatchcase

    from botwire_stream.keys import glob_escape

    with Memory(namespace, url=url) as m:
        for i, k in enumerate(TRICKY):
            m.set(k, i)
        m.set("gone:1", 1)
        m.delete("gone:1")
        for pattern in GLOBS + [glob_escape(k) for k in TRICKY] + [glob_escape(k[:3]) + "*" for k in TRICKY]:
            expected = sorted(k for k in TRICKY if fnmatchcase(k, pattern))
            assert m.list_keys(pattern) == expected, pattern
            for size in (1, 3):
                pages: list[str] = []
                while True:
                    page = m.list_keys(pattern, limit=size, after=pages[-1] if pages else None)
                    assert len(page) <= size
                    if not page:
                        break
                    pages += page
                assert pages == expected, (pattern, size)
            assert m.list_keys(pattern, limit=0) == []
            if expected:
                assert m.list_keys(pattern, after=expected[-1]) == []
                assert m.list_keys(pattern, after=expected[0] + "\x00") == expected[1:]  # a key that is not there
