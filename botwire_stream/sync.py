"""The sync faces: thin wrappers that run the async core on the shared blocking portal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from types import TracebackType
from typing import Any

from .memory import AsyncMemory, Watch
from .models import Change, Revision
from .portal import call


class SyncWatch:
    """A blocking iterator of ``Change``; ``close()`` it (or use ``with``) when done."""

    def __init__(self, watch: Watch) -> None:
        self._watch = watch
        call(watch.start)

    def __iter__(self) -> Iterator[Change]:
        return self

    def __next__(self) -> Change:
        try:
            return call(self._watch.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        call(self._watch.aclose)

    def __enter__(self) -> SyncWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Memory:
    """Namespaced key-value memory, sync face of ``AsyncMemory`` (same arguments and semantics).

    ``memory = Memory("chat-app"); memory.set("user:42:history", [], ttl=86400)``.
    """

    def __init__(self, namespace: str, **options: Any) -> None:
        self._core = AsyncMemory(namespace, **options)
        self.namespace = self._core.namespace
        call(self._core.open)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when missing or expired."""
        return call(self._core.get, key, default)

    def set(self, key: str, value: Any, *, ttl: float | timedelta | None = None) -> int:
        """Store ``value``; return its revision. ``ttl`` in seconds or a timedelta (None: forever)."""
        return call(self._core._write_value, key, value, ttl)

    def delete(self, key: str) -> bool:
        """Delete ``key``; True when it existed."""
        return call(self._core.delete, key)

    def __contains__(self, key: str) -> bool:
        return call(self._core.contains, key)

    def list_keys(self, pattern: str = "*") -> list[str]:
        """Keys matching the glob ``pattern``, sorted."""
        return call(self._core.list_keys, pattern)

    def update(
        self, key: str, fn: Callable[[Any], Any], *, default: Any = None, ttl: float | timedelta | None = None
    ) -> Any:
        """Read-modify-write without lost updates; returns the new value."""
        return call(self._core._update, key, fn, default, ttl)

    def revisions(self, key: str) -> list[Revision]:
        """The audit trail of ``key``, oldest first."""
        return call(self._core.revisions, key)

    def watch(self, pattern: str = "*") -> SyncWatch:
        """Live changes of matching keys from any process; subscribed when this returns."""
        return SyncWatch(self._core.watch(pattern))

    def close(self) -> None:
        """Release the connection."""
        call(self._core.close)

    def __enter__(self) -> Memory:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Memory({self.namespace!r})"
