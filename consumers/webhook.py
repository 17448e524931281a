"""Webhooks: POST each change whose key or conversation matches a glob to a URL, signed.

The body is the event as ``audit.event_record`` writes it (JSON). Headers: ``Botwire-Event-Id``
(``<stream>:<sequence>``, the same on every retry and redelivery: receivers drop repeats by it,
since delivery is at least once), ``Botwire-Timestamp`` (Unix seconds) and ``Botwire-Signature:
sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" with the shared secret>`` (a receiver checks it
and refuses old timestamps, so a captured request cannot be replayed later).

A 2xx answer delivers the event. Anything else (another status, no answer within the timeout, no
connection) is tried again after ``backoff``, doubled each time, ``attempts`` tries in all; then
the event goes to the dead-letter subject ``botwire.<ns>.deadletter.<consumer>`` (stream
``BOTWIRE_DEADLETTER_<ns>``) with the last error, and the next event is sent. Events are sent one
at a time in order, and each is acknowledged once delivered or dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from typing import Final

import httpx
import msgspec
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from botwire_stream import keys
from botwire_stream.errors import InvalidArgument

from .audit import event_record
from .runtime import Source, Worker

__all__ = ["Webhook", "deadletter_stream", "deadletter_subject", "sign"]

_TIMEOUT: Final = 10.0  # seconds an attempt waits for the receiver


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``Botwire-Signature`` header value for ``body`` sent at ``timestamp``."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def deadletter_stream(namespace: str) -> str:
    return f"BOTWIRE_DEADLETTER_{namespace}"


def deadletter_subject(namespace: str, durable: str) -> str:
    return f"botwire.{namespace}.deadletter.{durable}"


class Webhook(Worker):
    """``botwire consume webhook -n NS --match GLOB --to URL --secret-file FILE``."""

    kind = "webhook"
    batch = 100

    def __init__(
        self,
        namespaces: list[str],
        pattern: str,
        target: str,
        secret: bytes,
        *,
        name: str | None = None,
        attempts: int = 5,
        backoff: float = 0.5,
    ) -> None:
        super().__init__(namespaces, ["keys", "chat"], name=name)
        keys.pattern_filter(pattern)  # InvalidArgument for a bad glob
        try:
            url = httpx.URL(target)
        except (httpx.InvalidURL, TypeError):
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            # else every event would fail to send and be dead-lettered, one by one
            raise InvalidArgument(f"the webhook target must be an http:// or https:// URL, not {target!r}")
        self.pattern = pattern
        self.target = target
        self.secret = secret
        self.attempts = attempts
        self.backoff = backoff
        self._http: httpx.AsyncClient | None = None

    async def setup(self) -> None:
        for ns in self.namespaces:
            await self.conn.ensure_stream(
                StreamConfig(
                    name=deadletter_stream(ns),
                    subjects=[f"botwire.{ns}.deadletter.>"],
                    allow_direct=True,
                    metadata={"botwire.namespace": ns, "botwire.role": "webhook dead letters"},
                )
            )
        self._http = httpx.AsyncClient(timeout=_TIMEOUT)

    async def finish(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def handle(self, source: Source, msgs: list[Msg], caught_up: bool) -> None:
        for m in msgs:
            name = keys.decode_key(source.token(m)[1])
            if keys.matches(name, self.pattern) and not await self._deliver(source, m):
                return  # stopped mid-retry or taken over: this event and the rest stay unacknowledged
            await m.ack()

    async def _deliver(self, source: Source, m: Msg) -> bool:
        """Send ``m`` (retried, else dead-lettered): True when done with it, False when stopped."""
        assert self._http is not None
        record = event_record(source, m)
        body = msgspec.json.encode(record)
        error = ""
        for attempt in range(self.attempts):
            if attempt:
                await m.in_progress()  # a long retry is not redelivered meanwhile
                # a stop (SIGTERM) ends the wait: the backoff doubles (0.5 s x 2^n by default,
                # without bound) and a stop lets the batch in hand finish
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.backoff * 2 ** (attempt - 1))
                if self.stopping.is_set():
                    return False  # not acknowledged: the next run delivers it again
            if not await self.held():
                # stalled (e.g. in this backoff) and taken over: the new holder sends it (measured
                # before: a resumed webhook POSTed an event the new holder had delivered)
                return False
            ts = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "Botwire-Event-Id": record["id"],
                "Botwire-Timestamp": ts,
                "Botwire-Signature": sign(self.secret, ts, body),
            }
            try:
                resp = await self._http.post(self.target, content=body, headers=headers)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            if 200 <= resp.status_code < 300:
                return True
            error = f"HTTP {resp.status_code}"
        dl_headers = {
            "Nats-Msg-Id": f"{self.durable}:{record['id']}",  # dead-lettered once, also when redelivered
            "Botwire-Event-Id": record["id"],
            "Botwire-Error": error[:500],
            "Botwire-Attempts": str(self.attempts),
            "Botwire-Target": self.target,
        }
        await self.conn.publish(deadletter_subject(source.namespace, self.durable), body, dl_headers, 10.0)
        return True
