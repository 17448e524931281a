"""The hosted memory API's wire format at ``/memory/...``, so that the ``botwire`` client from
PyPI (0.2.1) works unchanged with ``BOTWIRE_URL=http://host:port``.

Every value is a string there; it is stored as that string under the same key as
``Memory(namespace).set(key, value)`` would, so either side reads what the other wrote. A value
our library stored that is not a string goes out as its JSON text (the hosted client parses text
starting with ``[`` or ``{``, as it does for what it wrote itself). Times are the kept revisions'
(``created_at``: the first write since the key last held no value, as far as the history
reaches). Errors are ``{"detail": ...}`` with the hosted server's statuses (400, 404).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from datetime import UTC, datetime

import msgspec
from nats.aio.msg import Msg
from starlette.requests import Request
from starlette.responses import Response

from .. import codec, errors, keys
from .._backend import Current, KeyRevision
from ..memory import AsyncMemory
from ..nats.kv import CREATED, created_of
from ..times import parse_time
from .headers import COMMON
from .rest import Namespaces, raw_segments, read_body

__all__ = ["Hosted", "MAX_VALUE_CHARS"]

MAX_VALUE_CHARS = 100_000  # the hosted server's limit on a value (characters)
_LIST_CONCURRENCY = 32
_GET_TRIES = 5
# a PUT body holding the largest value: JSON with ASCII escapes (Python's json.dumps, requests)
# spends 12 bytes on a character outside the BMP (\ud83d\ude00); 4 a character refused valid values (QA-9)
_MAX_PUT_BODY = 12 * MAX_VALUE_CHARS + 1024
_SEEN = 4096  # keys whose last revision a process remembers, for PUT's conditional write


class PutBody(msgspec.Struct):
    value: str


class Stored(msgspec.Struct):
    namespace: str
    key: str
    stored: bool
    bytes: int


class Item(msgspec.Struct):
    namespace: str
    key: str
    value: str
    created_at: float
    updated_at: float


class RemovedItem(msgspec.Struct):
    deleted: bool
    namespace: str
    key: str


class KeyInfo(msgspec.Struct):
    key: str
    bytes: int
    updated_at: float


class Listing(msgspec.Struct):
    namespace: str
    count: int
    keys: list[KeyInfo]


def _json(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status, {**COMMON, "content-type": "application/json"})


def _detail(status: int, message: str) -> Response:
    return _json({"detail": message}, status)


def _text(data: bytes) -> str:
    value = codec.decode(data)
    return value if isinstance(value, str) else data.decode()


def _live(revs: list[KeyRevision]) -> tuple[KeyRevision, float] | None:
    """The last revision when it holds a value, and the time of the first write since the key
    last held none."""
    if not revs or revs[-1].op != "set":
        return None
    first = revs[-1]
    for r in reversed(revs):
        if r.op != "set":
            break
        first = r
    return revs[-1], first.time.timestamp()


def _stamp(ts: float) -> str:
    """``ts`` as a NATS-style RFC 3339 time (what ``parse_time`` reads)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Hosted:
    """``/memory/...``. A GET is one direct get of the key's last message: ``updated_at`` is its
    stored time, ``created_at`` the ``Botwire-Created`` header that writes conditional on the
    revision they replace carry (``nats.kv``). A PUT is such a write when this process knows the
    key's last revision (it read or wrote it; a bounded LRU), else, or when another writer came
    in between, a plain set; a value written without the header (by ``Memory.set``, or by
    another server process first) costs its first GET a read of the key's kept revisions."""

    def __init__(self, spaces: Namespaces) -> None:
        self.spaces = spaces
        # (namespace, key) -> its last revision as this process saw it, with CREATED resolved
        self._seen: OrderedDict[tuple[str, str], Current] = OrderedDict()

    def _remember(self, where: tuple[str, str], current: Current | None) -> None:
        if current is None:
            self._seen.pop(where, None)
            return
        self._seen[where] = current
        self._seen.move_to_end(where)
        if len(self._seen) > _SEEN:
            self._seen.popitem(last=False)

    async def _get(self, mem: AsyncMemory, namespace: str, key: str) -> Response:
        backend = await mem._connection()
        for _ in range(_GET_TRIES):
            current = await backend.get(key)
            msg = None if current is None else current.handle
            if current is None or current.data is None or not isinstance(msg, Msg):
                self._remember((namespace, key), None)
                return _detail(404, "Key not found")
            data, hdr = current.data, msg.headers or {}
            updated = parse_time(hdr["Nats-Time-Stamp"]).timestamp()
            created_text = created_of(hdr)
            seen = self._seen.get((namespace, key))
            if created_text is None and seen is not None and seen.revision == current.revision:
                created_text = created_of(seen.handle.headers or {})  # the same revision, read before
                current = seen
            if created_text is not None:
                created = parse_time(created_text).timestamp()
            else:  # written by a plain set: the first write since the key last held no value
                found = _live(await backend.revisions(key))
                if found is None or found[0].revision != current.revision:
                    continue  # written or deleted in between: read again
                created = found[1]
                msg = dataclasses.replace(msg, headers={**hdr, CREATED: _stamp(created)})
                current = Current(current.revision, data, msg)
            self._remember((namespace, key), current)
            return _json(Item(namespace, key, _text(data), created, updated))
        raise errors.ChangedWhileRead(f"{key!r} kept changing while it was read; read it again")

    async def _put(self, mem: AsyncMemory, namespace: str, key: str, value: str) -> None:
        """Conditional on the revision this process last saw (so that it carries ``created_at``),
        else a plain set; a conflict (another writer) falls back to a plain set."""
        where = (namespace, key)
        known = self._seen.pop(where, None)
        data = codec.encode(value)
        if known is not None:
            try:
                revision = await mem._write(key, data, None, expected=known.revision, replaced=known, what="set")
            except errors.Conflict:
                pass
            else:
                created = created_of((known.handle.headers or {}) if isinstance(known.handle, Msg) else {})
                conn = getattr(await mem._connection(), "conn", None)
                if created is not None and len(data) <= getattr(conn, "max_body", 0):  # not chunked
                    handle = Msg(known.handle._client, headers={CREATED: created})
                    self._remember(where, Current(revision, data, handle))
                return
        await mem.set(key, value)


    async def __call__(self, request: Request) -> Response:
        try:
            parts = raw_segments(request, b"/memory/")
            namespace = keys.check_namespace(parts[0])
            if len(parts) == 1:
                if request.method != "GET":
                    return _detail(405, "Method Not Allowed")
                return await self._list(request, namespace)
            if len(parts) != 2:
                return _detail(404, "Not Found")
            key = keys.check_key(parts[1])
            mem = self.spaces.memory(namespace)
            if request.method == "PUT":
                body = msgspec.json.decode(await read_body(request, _MAX_PUT_BODY), type=PutBody)
                if len(body.value) > MAX_VALUE_CHARS:
                    return _detail(400, f"value exceeds {MAX_VALUE_CHARS} characters")
                await self._put(mem, namespace, key, body.value)
                return _json(Stored(namespace, key, True, len(body.value.encode())))
            if request.method == "GET":
                return await self._get(mem, namespace, key)
            if request.method == "DELETE":
                self._seen.pop((namespace, key), None)
                if not await mem.delete(key):
                    return _detail(404, "Key not found")
                return _json(RemovedItem(True, namespace, key))
            return _detail(405, "Method Not Allowed")
        except (errors.InvalidKey, errors.InvalidNamespace, errors.InvalidArgument, errors.InvalidValue) as exc:
            return _detail(400, str(exc))
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _detail(422, f"invalid body: {exc}")
        except errors.BotWireError as exc:
            return _detail(exc.http_status, str(exc))

    async def _list(self, request: Request, namespace: str) -> Response:
        text = request.query_params.get("limit", "100")
        if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 1000:
            return _detail(422, "limit must be an integer from 1 to 1000")
        limit = int(text)
        mem = self.spaces.memory(namespace)
        backend = await mem._connection()
        names = await mem.list_keys("*")
        gate = asyncio.Semaphore(_LIST_CONCURRENCY)

        async def info(key: str) -> KeyInfo | None:
            async with gate:
                found = _live(await backend.revisions(key))
            if found is None:
                return None
            last, _ = found
            size = len(_text(last.data).encode()) if last.data is not None else 0
            return KeyInfo(key, size, last.time.timestamp())

        items = [i for i in await asyncio.gather(*(info(k) for k in names)) if i is not None]
        items.sort(key=lambda i: i.updated_at, reverse=True)
        items = items[:limit]
        return _json(Listing(namespace, len(items), items))
