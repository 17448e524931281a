"""Server-sent events as the tests read them: one parser for every SSE response the tests take
apart (``botwire serve``'s key watches, conversation feeds and Durable Streams, the examples)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator


def sse_events(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """The events of a response's ``lines``, each a dict of its fields (``event``, ``id``,
    ``data``: its data lines joined by newlines), as the SSE spec parses them: one space after the
    colon dropped, comment lines (``: live``) skipped, an event yielded at its blank line.

    Stops reading ``lines`` right after an event's blank line, so a caller may stop iterating and
    read the rest of the same ``lines`` later (with another call)."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        event[field] = f"{event[field]}\n{value}" if field == "data" and "data" in event else value


def take_events(lines: Iterator[str], kind: str, n: int, ident: str) -> list[dict[str, object]]:
    """The JSON data of the next ``n`` events of type ``kind`` in ``lines`` (other events
    skipped), each event's id checked against its data's ``ident`` field (a key watch's
    ``revision``, a conversation's ``seq``)."""
    out: list[dict[str, object]] = []
    for event in sse_events(lines):
        if event.get("event") == kind:
            data = json.loads(event["data"])
            assert int(event["id"]) == data[ident], event
            out.append(data)
            if len(out) == n:
                return out
    raise AssertionError(f"the stream ended after {out}")
