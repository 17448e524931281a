"""The sync faces: thin wrappers that run the async core on the shared event loop (portal.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from functools import partial
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from . import _backend, codec, keys, portal
from .audit import (
    Event,
    RestoreReport,
    Retention,
    areplay,
    arestore,
    aretention,
    check_bound,
    check_replay,
    check_retention,
    check_time,
)
from .cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, Miss
from .chat import AsyncChatHistory
from .memory import AsyncMemory
from .models import Change, Entry, Revision, SessionInfo
from .portal import call
from .settings import ConnectOptions, resolve
from .tokens import AppendResult, AsyncTokenStream, TokenRead, TokenStreamInfo

__all__ = ["ChatHistory", "Memory", "SyncWatch", "TokenStream", "replay", "restore", "retention"]

T = TypeVar("T")


def _first_use(opts: ConnectOptions) -> None:
    """Before the first sync call: start the embedded server (when needed) and the portal's
    thread together, so that the server boots while the thread starts."""
    if opts.embedded and not portal.started():
        _backend.prepare(opts, portal.get_portal)
T_co = TypeVar("T_co", covariant=True)


class _AsyncWatch(Protocol[T_co]):
    async def start(self) -> Any: ...
    async def __anext__(self) -> T_co: ...
    async def aclose(self) -> None: ...


class SyncWatch(Generic[T]):
    """A blocking iterator over an async watch; ``close()`` it (or use ``with``) when done."""

    def __init__(self, watch: _AsyncWatch[T]) -> None:
        self._watch = watch
        call(watch.start)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return call(self._watch.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        call(self._watch.aclose)

    def __enter__(self) -> SyncWatch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Memory:
    """Namespaced key-value memory, sync face of ``AsyncMemory`` (same arguments and semantics).

    ``memory = Memory("chat-app"); memory.set("user:42:history", [], ttl=86400)``.
    """

    def __init__(
        self,
        namespace: str,
        *,
        url: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
        history: int | None = None,
        replicas: int | None = None,
        timeout: float = 5.0,
        cache: bool = False,
        cache_entries: int = DEFAULT_MAX_ENTRIES,
        cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._core = AsyncMemory(
            namespace,
            url=url,
            token=token,
            user=user,
            password=password,
            creds=creds,
            history=history,
            replicas=replicas,
            timeout=timeout,
            cache=cache,
            cache_entries=cache_entries,
            cache_bytes=cache_bytes,
        )
        self.namespace = self._core.namespace
        _first_use(self._core._opts)
        call(self._core.open)

    def get(self, key: str, default: Any = None, *, at: datetime | None = None) -> Any:
        """The value of ``key``, or ``default`` when missing or expired; ``at``: as of that moment
        (a moment in the future: ``InvalidArgument``)."""
        if at is not None:
            return call(partial(self._core.get, at=at), key, default)
        cache = self._core._cache
        if cache is not None:  # a cached value is looked up in this thread: no hop to the loop
            hit = cache.lookup(keys.check_key(key))
            if not isinstance(hit, Miss):
                return default if hit is None else codec.decode(hit)
        return call(self._core.get, key, default)

    def set(self, key: str, value: Any, *, ttl: float | timedelta | None = None) -> int:
        """Store ``value``; return its revision. ``ttl`` in seconds or a timedelta (None: forever)."""
        return call(partial(self._core.set, ttl=ttl), key, value)

    def delete(self, key: str) -> bool:
        """Delete ``key``; True when it existed."""
        return call(self._core.delete, key)

    def __contains__(self, key: str) -> bool:
        return call(self._core.contains, key)

    def list_keys(self, pattern: str = "*", *, limit: int | None = None, after: str | None = None) -> list[str]:
        """Keys matching the glob ``pattern``, sorted; a page: at most ``limit``, sorted after ``after``."""
        return call(partial(self._core.list_keys, limit=limit, after=after), pattern)

    def update(
        self,
        key: str,
        fn: Callable[[Any], Any],
        *,
        default: Any = None,
        ttl: float | timedelta | None = None,
        max_attempts: int = 1000,
    ) -> Any:
        """Read-modify-write without lost updates; returns the new value."""
        return call(partial(self._core.update, default=default, ttl=ttl, max_attempts=max_attempts), key, fn)

    def revisions(self, key: str) -> list[Revision]:
        """The audit trail of ``key``, oldest first."""
        return call(self._core.revisions, key)

    def watch(self, pattern: str = "*") -> SyncWatch[Change]:
        """Live changes of matching keys from any process; subscribed when this returns."""
        return SyncWatch(self._core.watch(pattern))

    def replay(
        self, pattern: str = "*", *, start: int | datetime | None = None, end: int | datetime | None = None
    ) -> SyncWatch[Event]:
        """The kept events of matching keys, oldest first (a blocking iterator; ``close()`` it)."""
        keys.pattern_filter(pattern)
        check_bound(start, "start")
        check_bound(end, "end")
        return SyncWatch(_Started(self._core.replay(pattern, start=start, end=end)))

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


class ChatHistory:
    """One conversation log, sync face of ``AsyncChatHistory`` (same arguments and semantics).

    ``chat = ChatHistory("user-42", namespace="chat", ttl=None); chat.append({"role": "user", ...})``.
    """

    def __init__(
        self,
        session_id: str,
        *,
        namespace: str = "chat",
        ttl: float | timedelta | None = None,
        url: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
        replicas: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._core = AsyncChatHistory(
            session_id,
            namespace=namespace,
            ttl=ttl,
            url=url,
            token=token,
            user=user,
            password=password,
            creds=creds,
            replicas=replicas,
            timeout=timeout,
        )
        self.session_id = session_id
        self.namespace = namespace
        _first_use(self._core._opts)
        call(self._core.open)

    @classmethod
    def _wrap(cls, core: AsyncChatHistory) -> ChatHistory:
        obj = cls.__new__(cls)
        obj._core, obj.session_id, obj.namespace = core, core.session_id, core.namespace
        return obj

    def append(self, message: Mapping[str, Any]) -> int:
        """Append one message; return its sequence number."""
        return call(self._core.append, message)

    def extend(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Append several messages, all or nothing; return their sequence numbers."""
        return call(self._core.extend, messages)

    def messages(
        self, last: int | None = None, *, at: datetime | None = None, window: int | None = None
    ) -> list[dict[str, Any]]:
        """The messages, oldest first, exactly as appended; ``at``: as of that moment (a moment
        in the future: ``InvalidArgument``); ``window=N``: the latest summary and at most N
        messages after it."""
        return call(partial(self._core.messages, at=at, window=window), last)

    def compact(self, summary: str | Mapping[str, Any], *, upto: int) -> int:
        """Record a summary covering the messages up to ``upto`` (the messages stay)."""
        return call(partial(self._core.compact, upto=upto), summary)

    def last_summary(self) -> Event | None:
        """The latest summary recorded by ``compact`` still in force (None: none)."""
        return call(self._core.last_summary)

    def entries(self, after: int | None = None, last: int | None = None) -> list[Entry]:
        """Messages with sequence and time."""
        return call(self._core.entries, after, last)

    def __len__(self) -> int:
        return call(self._core.count)

    def clear(self) -> None:
        """Remove every message of this conversation."""
        call(self._core.clear)

    def watch(self, after: int | None = None) -> SyncWatch[Entry]:
        """Live new entries from any process; subscribed when this returns."""
        return SyncWatch(self._core.watch(after))

    def fork(self, session_id: str, upto: int | None = None) -> ChatHistory:
        """A new conversation with this one's messages up to and including ``upto``."""
        return ChatHistory._wrap(call(self._core.fork, session_id, upto))

    @staticmethod
    def sessions(
        namespace: str = "chat",
        pattern: str = "*",
        *,
        limit: int | None = 100,
        offset: int = 0,
        before: SessionInfo | tuple[datetime, str] | None = None,
        url: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
    ) -> list[SessionInfo]:
        """Conversations matching the glob: id, message count, last activity; newest first.

        ``before=page[-1]`` gives the next page, stable under concurrent writes."""
        sessions = partial(
            AsyncChatHistory.sessions,
            limit=limit,
            offset=offset,
            before=before,
            url=url,
            token=token,
            user=user,
            password=password,
            creds=creds,
        )
        return call(sessions, namespace, pattern)

    def close(self) -> None:
        call(self._core.close)

    def __enter__(self) -> ChatHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ChatHistory({self.session_id!r}, namespace={self.namespace!r})"


class _Started(Generic[T]):
    """An async iterator with the ``start`` a ``SyncWatch`` calls (a generator needs none)."""

    def __init__(self, it: AsyncIterator[T]) -> None:
        self._it = it

    async def start(self) -> None:
        pass

    async def __anext__(self) -> T:
        return await self._it.__anext__()

    async def aclose(self) -> None:
        close = getattr(self._it, "aclose", None)
        if close is not None:
            await close()


class TokenStream:
    """One resumable token stream, sync face of ``AsyncTokenStream`` (same arguments and semantics).

    ``s = TokenStream("answers/42"); s.create(content_type="text/plain"); s.append("Hel")``.
    """

    def __init__(
        self,
        path: str,
        *,
        url: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
        replicas: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._core = AsyncTokenStream(
            path, url=url, token=token, user=user, password=password, creds=creds, replicas=replicas, timeout=timeout
        )
        self.path = path
        _first_use(self._core._client._opts)
        call(self._core.open)

    def create(
        self,
        *,
        content_type: str = "application/octet-stream",
        ttl: int | None = None,
        expires_at: datetime | str | None = None,
        data: bytes = b"",
        closed: bool = False,
    ) -> bool:
        """Create the stream; False when it exists with the same settings."""
        create = partial(self._core.create, content_type=content_type, ttl=ttl, expires_at=expires_at, data=data, closed=closed)
        return call(create)

    def fork(self, path: str, offset: str | None = None, sub_offset: int = 0) -> TokenStream:
        """A new stream at ``path`` with this one's chunks up to ``offset`` (default: all)."""
        core = call(self._core.fork, path, offset, sub_offset)
        twin = TokenStream.__new__(TokenStream)
        twin._core, twin.path = core, path
        return twin

    def append(
        self,
        data: bytes | str,
        *,
        producer: tuple[str, int, int] | None = None,
        stream_seq: str | None = None,
        close: bool = False,
    ) -> AppendResult:
        """Append a chunk; ``producer=(id, epoch, seq)`` makes retries store it once."""
        return call(partial(self._core.append, data, producer=producer, stream_seq=stream_seq, close=close))

    def close_stream(self, *, producer: tuple[str, int, int] | None = None) -> AppendResult:
        """Close the stream: no more appends."""
        return call(partial(self._core.close_stream, producer=producer))

    def read(self, offset: str = "-1") -> TokenRead:
        """The chunks after ``offset``, up to the tail."""
        return call(self._core.read, offset)

    def wait(self, offset: str, timeout: float = 30.0) -> TokenRead:
        """Long-poll: the chunks after ``offset`` once there are any, or an empty read at ``timeout``."""
        return call(self._core.wait, offset, timeout)

    def follow(self, offset: str = "-1") -> SyncWatch[TokenRead]:
        """Catch up, then every new chunk live, until the stream is closed."""
        return SyncWatch(_Started(self._core.follow(offset)))

    def info(self) -> TokenStreamInfo:
        return call(self._core.info)

    def delete(self) -> None:
        call(self._core.delete)

    def close(self) -> None:
        call(self._core.close)

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TokenStream({self.path!r})"


# -- replay, restore, retention of a namespace (audit.py) --------------------------------------
def replay(
    namespace: str,
    *,
    start: int | datetime | None = None,
    end: int | datetime | None = None,
    keys: str | None = "*",
    conversations: str | None = "*",
    url: str | None = None,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    timeout: float = 5.0,
) -> SyncWatch[Event]:
    """Sync face of ``areplay``: a blocking iterator of ``Event`` (``close()`` it, or use ``with``)."""
    check_replay(namespace, start, end, keys, conversations)  # errors here, not at the first event
    opts = resolve(url, token=token, user=user, password=password, creds=creds)
    _first_use(opts)
    it = areplay(
        namespace, start=start, end=end, keys=keys, conversations=conversations, url=url, token=token,
        user=user, password=password, creds=creds, timeout=timeout,
    )
    return SyncWatch(_Started(it))


def retention(
    namespace: str,
    *,
    key_history: int | None = None,
    log_messages: int | None = None,
    log_age: float | timedelta | None = None,
    url: str | None = None,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    timeout: float = 5.0,
) -> Retention:
    """Sync face of ``aretention``."""
    keys.check_namespace(namespace)
    check_retention(key_history, log_messages, log_age)
    _first_use(resolve(url, token=token, user=user, password=password, creds=creds))

    async def run() -> Retention:
        return await aretention(
            namespace, key_history=key_history, log_messages=log_messages, log_age=log_age, url=url,
            token=token, user=user, password=password, creds=creds, timeout=timeout,
        )

    return call(run)


def restore(
    source: str,
    *,
    at: datetime,
    into: str,
    overwrite: bool = False,
    url: str | None = None,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    timeout: float = 5.0,
) -> RestoreReport:
    """Sync face of ``arestore``."""
    check_time(at)
    _first_use(resolve(url, token=token, user=user, password=password, creds=creds))

    async def run() -> RestoreReport:
        return await arestore(
            source, at=at, into=into, overwrite=overwrite, url=url, token=token, user=user,
            password=password, creds=creds, timeout=timeout,
        )

    return call(run)
