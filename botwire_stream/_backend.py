"""The backend protocols: what the async cores need from a transport, at the level of our
operations (implemented over NATS in ``botwire_stream.nats``)."""

from __future__ import annotations

__all__ = ["CommitResult", "Snapshot", "TokenBackend", "TokenState"]  # the token part (issue 7)

# --- token streams (issue 7) ---
import asyncio as _asyncio
from collections.abc import Sequence as _Sequence
from typing import Protocol as _Protocol

import msgspec as _msgspec


class TokenState(_msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """A token stream's stored state (everything but its chunks).

    ``base``: for a fork, the ``(key, after, upto)`` segments it shares with its sources, oldest
    first; ``sources``: the keys whose ``refs`` it holds. ``refs``: how many forks read this
    stream's chunks (a deleted stream with refs is only marked ``deleted``). ``fork``: the fork
    request as given (path, offset, sub-offset), to tell a re-creation from a conflict.
    """

    path: str
    content_type: str
    created: float
    ttl: int | None = None
    expires_at: str | None = None
    expires: float | None = None
    closed: bool = False
    closed_by: tuple[str, int, int] | None = None
    producers: dict[str, tuple[int, int]] = {}
    stream_seq: str | None = None
    base: list[tuple[str, int, int]] = []
    sources: list[str] = []
    fork: tuple[str, int, int] | None = None
    refs: int = 0
    deleted: bool = False


class Snapshot(_msgspec.Struct):
    """A loaded state: its ``version`` (compare-and-set token), the sequence of the stream's own
    last chunk (0: none), and the time of its last write or read (POSIX seconds)."""

    key: str
    state: TokenState
    version: int
    last: int
    activity: float


class CommitResult(_msgspec.Struct):
    """The stored chunk's sequence (0: no chunk) and the state's version after the commit."""

    seq: int
    version: int


class TokenBackend(_Protocol):
    """Storage of token streams: every write is compare-and-set on the state's version."""

    @property
    def max_chunk(self) -> int: ...

    def key(self, path: str) -> str: ...

    async def load(self, key: str) -> Snapshot | None: ...

    async def commit(self, key: str, version: int, chunk: bytes | None, state: TokenState | None) -> CommitResult: ...

    async def read(self, segments: _Sequence[tuple[str, int, int]], max_bytes: int) -> list[tuple[int, bytes]]: ...

    async def purge(self, key: str) -> None: ...

    async def touch(self, key: str) -> None: ...

    async def watch(self, key: str, event: _asyncio.Event) -> None: ...

    async def unwatch(self, key: str, event: _asyncio.Event) -> None: ...
