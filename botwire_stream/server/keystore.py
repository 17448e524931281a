"""API keys for ``botwire serve``, kept in the NATS KV bucket ``botwire_apikeys`` so that every
serve process sees the same keys, revocations included, at once.

A key reads ``bwk_<id>_<secret>``: ``id`` (12 hex digits) names its record, ``secret`` is 32 random
bytes. The record keeps only ``sha256(secret)``: the secret has 256 bits of entropy, so no salt or
slow KDF is needed (those protect guessable passwords; nobody enumerates 2^256 secrets), and one
hash costs ~1 µs per request where scrypt would cost ~50 ms. The plain key is shown once, at
creation. A revocation holds on every serve process within a second (``KeyStore.verify``). ``last_used`` is written at most once a minute per key and process, not per request.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
import time
from typing import Literal

import msgspec
import nats.js.errors
from nats.js.api import StreamConfig

from ..errors import InvalidArgument
from ..nats.jetstream import Connection
from . import NATS_TIMEOUT

__all__ = ["BUCKET", "SCOPES", "ApiKey", "KeyStore", "Scope", "allows"]

BUCKET = "botwire_apikeys"
Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")  # each includes the ones before it
_RANK = {s: i for i, s in enumerate(SCOPES)}
_TOKEN = re.compile(r"bwk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_CACHE_TTL = 1.0  # seconds a verified key is reused without a KV get
_CACHE_MAX = 10_000
_TOUCH_EVERY = 60.0  # seconds between two last_used writes of one key by one process


class ApiKey(msgspec.Struct):
    """One key's record (never its secret)."""

    id: str
    digest: str  # sha256 of the secret, hex
    namespaces: list[str]  # globs over namespace names (fnmatch, case-sensitive)
    scope: Scope
    created: float
    revoked: float | None = None
    last_used: float | None = None
    writes_per_day: int | None = None
    requests_per_second: int | None = None

    def reaches(self, namespace: str) -> bool:
        return any(fnmatch.fnmatchcase(namespace, glob) for glob in self.namespaces)


def allows(have: str, need: str) -> bool:
    """True when scope ``have`` includes ``need`` (read < write < admin)."""
    return _RANK[have] >= _RANK[need]  # type: ignore[index]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """The keys, on a ``Connection`` (``KeyStore.open(conn)``)."""

    def __init__(self, conn: Connection, kv: object, timeout: float = NATS_TIMEOUT) -> None:
        self.conn = conn
        self._kv = kv
        self.timeout = timeout  # serve's: a keys bucket electing its leader takes 4-9 s under load
        self._touched: dict[str, float] = {}
        self._cache: dict[str, tuple[float, ApiKey]] = {}  # token -> (reuse until, live record)

    @classmethod
    async def open(cls, conn: Connection) -> KeyStore:
        try:
            kv = await conn.js.key_value(BUCKET)
        except nats.js.errors.BucketNotFoundError:
            placed = conn.placed(StreamConfig())  # replicated like the namespaces (3 on a cluster)
            kv = await conn.js.create_key_value(
                bucket=BUCKET, history=1, replicas=placed.num_replicas or 1, placement=placed.placement
            )
        return cls(conn, kv)

    async def create(
        self,
        namespaces: list[str],
        scope: str,
        *,
        writes_per_day: int | None = None,
        requests_per_second: int | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key: the plain key (show it once; it is not kept) and its record."""
        if scope not in SCOPES:
            raise InvalidArgument(f"scope {scope!r}: use read, write or admin")
        if not namespaces or any(not g or len(g) > 256 for g in namespaces):
            raise InvalidArgument("give at least one --namespace GLOB (1-256 characters)")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        record = ApiKey(
            key_id,
            _digest(secret),
            list(namespaces),
            scope,
            time.time(),
            writes_per_day=writes_per_day,
            requests_per_second=requests_per_second,
        )
        await self._kv.create(key_id, msgspec.json.encode(record))  # type: ignore[attr-defined]
        return f"bwk_{key_id}_{secret}", record

    async def get(self, key_id: str) -> ApiKey | None:
        """The key's record (revoked ones too), None when there is none.

        Retried by the library (``Connection.call``) within ``timeout``: nats-py's KV get alone
        gave up after its own 5 s, so serve answered 503 while the bucket elected a leader."""

        async def run() -> bytes | None:
            try:
                entry = await self._kv.get(key_id)  # type: ignore[attr-defined]
            except nats.js.errors.KeyNotFoundError:
                return None
            value: bytes | None = entry.value
            return value

        value = await self.conn.call(run, timeout=self.timeout)
        return msgspec.json.decode(value, type=ApiKey) if value else None

    async def list(self) -> list[ApiKey]:
        try:
            ids = await self._kv.keys()  # type: ignore[attr-defined]
        except nats.js.errors.NoKeysError:
            return []
        found = [await self.get(i) for i in sorted(ids)]
        return [k for k in found if k is not None]

    async def revoke(self, key_id: str) -> bool:
        """Mark the key revoked (kept, for the audit); False when there is no such live key."""
        while True:
            try:
                entry = await self._kv.get(key_id)  # type: ignore[attr-defined]
            except nats.js.errors.KeyNotFoundError:
                return False
            record = msgspec.json.decode(entry.value, type=ApiKey)
            if record.revoked is not None:
                return False
            record.revoked = time.time()
            try:
                await self._kv.update(key_id, msgspec.json.encode(record), last=entry.revision)  # type: ignore[attr-defined]
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # a last_used write came between: read again

    async def verify(self, token: str) -> ApiKey | None:
        """The live key that ``token`` is, else None (malformed, unknown, wrong secret, revoked).

        A key found live is reused for ``_CACHE_TTL`` seconds: the KV get it saves cost 0.2-0.8 ms
        of a ~1.4 ms GET over HTTP (measured on the 2-core CI machine), so a revocation holds on
        every serve process within a second. Refusals are never cached.
        """
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now:
            return hit[1]
        m = _TOKEN.fullmatch(token)
        if m is None:
            return None
        record = await self.get(m.group(1))
        if record is None or record.revoked is not None:
            self._cache.pop(token, None)
            return None
        if not hmac.compare_digest(record.digest, _digest(m.group(2))):
            return None
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (now + _CACHE_TTL, record)
        return record

    async def touch(self, record: ApiKey) -> None:
        """Record the key's use, at most once a minute per process (a failed write is retried later)."""
        now = time.time()
        if now - self._touched.get(record.id, 0.0) < _TOUCH_EVERY:
            return
        self._touched[record.id] = now
        try:
            entry = await self._kv.get(record.id)  # type: ignore[attr-defined]
            fresh = msgspec.json.decode(entry.value, type=ApiKey)
            if fresh.revoked is not None:
                return
            fresh.last_used = now
            await self._kv.update(record.id, msgspec.json.encode(fresh), last=entry.revision)  # type: ignore[attr-defined]
        except (nats.errors.Error, msgspec.DecodeError):
            self._touched.pop(record.id, None)
