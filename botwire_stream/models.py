"""Public result types: small frozen msgspec structs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

__all__ = ["Change", "Entry", "Op", "Revision", "SessionInfo"]

Op = Literal["set", "delete", "expire"]


class Revision(msgspec.Struct, frozen=True):
    """One write of a key, as kept in its audit trail (``Memory.revisions``)."""

    revision: int
    op: Op
    value: Any
    time: datetime


class Change(msgspec.Struct, frozen=True):
    """A live change of a key seen by ``Memory.watch``: set, delete, or expiry by TTL."""

    key: str
    op: Op
    value: Any
    revision: int
    time: datetime


class Entry(msgspec.Struct, frozen=True):
    """One message of a conversation log with its sequence number and time."""

    seq: int
    time: datetime
    message: dict[str, Any]


class SessionInfo(msgspec.Struct, frozen=True):
    """A conversation as listed by ``ChatHistory.sessions``.

    ``title`` (the first user message, cut to 80 characters), ``first_activity`` and ``tokens``
    (an estimate: bytes / 4) come from the history materialiser's summary (over NATS, while
    ``botwire consume materialise`` keeps the namespace): None when there is none, or when it
    lags the conversation (it is never shown stale)."""

    session_id: str
    message_count: int
    last_activity: datetime
    title: str | None = None
    first_activity: datetime | None = None
    tokens: int | None = None
