"""Server-sent events: one ``data`` event per append, each followed by a ``control`` event."""

from __future__ import annotations

import base64
import re

import msgspec

__all__ = ["control", "data_event"]

_LINES = re.compile(r"\r\n|\r|\n")


def _event(kind: str, payload: str) -> bytes:
    # Every line of the payload gets its own data: line, so no payload can inject an event:
    # line (a lone \r ends a line for SSE parsers too). No space after "data:": a client strips
    # exactly one, which would eat a payload's own leading space.
    lines = "\n".join("data:" + line for line in _LINES.split(payload))
    return f"event: {kind}\n{lines}\n\n".encode()


def data_event(chunk: bytes, *, base64_encoded: bool) -> bytes:
    text = base64.b64encode(chunk).decode() if base64_encoded else chunk.decode("utf-8", "replace")
    return _event("data", text)


def control(next_offset: str, *, cursor: str | None = None, up_to_date: bool = False, closed: bool = False) -> bytes:
    body: dict[str, object] = {"streamNextOffset": next_offset}
    if closed:
        body["streamClosed"] = True
    else:
        if cursor is not None:
            body["streamCursor"] = cursor
        if up_to_date:
            body["upToDate"] = True
    return _event("control", msgspec.json.encode(body).decode())
