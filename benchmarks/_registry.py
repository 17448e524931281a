"""The registry of benchmarks and the context they share.

A module joins the suite with::

    from benchmarks._registry import Context, benchmark
    from benchmarks._report import Table

    @benchmark("chat-append", "ChatHistory.append vs raw js.publish")
    def chat_append(ctx: Context) -> list[Table]:
        ...

``__main__`` imports every public module of the package, so a new file is all it takes. The
context starts the nats-server (and redis-server) on first use and stops them at the end.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._report import Table
from ._server import NatsServer, RedisServer

if TYPE_CHECKING:
    import redis

T = TypeVar("T")
BenchFn = Callable[["Context"], list[Table]]


@dataclass(frozen=True)
class Benchmark:
    name: str
    help: str
    group: str  # the module's short name: ``--only kv`` runs every benchmark of kv.py
    fn: BenchFn


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, help: str) -> Callable[[BenchFn], BenchFn]:
    """Register ``fn`` under ``name`` (unique across the suite)."""

    def register(fn: BenchFn) -> BenchFn:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} is registered twice")
        group = fn.__module__.rsplit(".", 1)[-1]
        REGISTRY[name] = Benchmark(name=name, help=help, group=group, fn=fn)
        return fn

    return register


class Context:
    """What every benchmark gets: the run mode, the servers, and one event loop for async code.

    ``run(coro)`` runs on one ``asyncio.Runner`` for the whole suite, so async clients opened in
    one call stay usable in the next; sync faces are called between ``run`` calls, never inside.
    """

    def __init__(self, *, quick: bool, project_root: Path) -> None:
        self.quick = quick
        self.project_root = project_root
        self._tmp = tempfile.TemporaryDirectory(prefix="botwire-bench-")
        self.tmp = Path(self._tmp.name)
        self._runner = asyncio.Runner()
        self._nats: NatsServer | None = None
        self._redis: RedisServer | None = None
        self._redis_skip: str | None = None

    def pick(self, quick: T, full: T) -> T:
        """``quick`` under ``--quick``, else ``full``."""
        return quick if self.quick else full

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    @property
    def nats(self) -> NatsServer:
        """The suite's nats-server (started on first use)."""
        if self._nats is None:
            self._nats = NatsServer(self.tmp / "nats").start()
        return self._nats

    @property
    def nats_url(self) -> str:
        return self.nats.url

    def redis(self) -> redis.Redis | None:
        """A client of the suite's redis-server, or None (the reason is in ``redis_skip``)."""
        if self._redis is None and self._redis_skip is None:
            if RedisServer.binary() is None:
                self._redis_skip = "no redis-server on PATH"
            else:
                try:
                    import redis as _redis  # noqa: F401
                except ImportError:
                    self._redis_skip = "redis-py not installed (pip install 'botwire-stream[bench]')"
            if self._redis_skip is None:
                try:
                    self._redis = RedisServer(self.tmp / "redis").start()
                except RuntimeError as exc:
                    self._redis_skip = str(exc)
            if self._redis_skip is not None:
                print(f"redis: skipped ({self._redis_skip})", flush=True)
        if self._redis is None:
            return None
        import redis as _redis

        return _redis.Redis(host="127.0.0.1", port=self._redis.port)

    @property
    def redis_skip(self) -> str | None:
        return self._redis_skip

    def versions(self) -> dict[str, str]:
        out = {"python": sys.version.split()[0]}
        if self._nats is not None:
            out["nats-server"] = self._nats.version
        if self._redis is not None:
            out["redis-server"] = self._redis.version
        return out

    def close(self) -> None:
        """Stop the servers this run started (by PID) and remove the temporary folder."""
        try:
            self._runner.close()
        finally:
            for server in (self._nats, self._redis):
                if server is not None:
                    server.stop()
            self._nats = self._redis = None
            self._tmp.cleanup()
