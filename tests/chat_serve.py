"""Reading the chat endpoint's answers (the serve processes: the ``serves`` fixture, ``serves.chat``)."""

from __future__ import annotations

import time

import httpx


def read_answer(client: httpx.Client, answer_url: str, bound: float = 30.0, offset: str = "-1") -> str:
    """The answer's text after ``offset``, read by long-polls until the stream says it is closed."""
    text = ""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        r = client.get(answer_url, params={"offset": offset, "live": "long-poll"})
        assert r.status_code in (200, 204), r.text
        if r.status_code == 200:
            text += r.text
        offset = r.headers["stream-next-offset"]
        if r.headers.get("stream-closed") == "true":
            return text
    raise AssertionError(f"the answer was not closed within {bound} s; got {text!r}")
