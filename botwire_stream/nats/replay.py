"""``ReplayBackend`` over NATS: a namespace's two logs read as events, and its past states.

A namespace's key writes are its KV bucket's stream (``KV_botwire_<ns>``), its conversations the
chat stream (``BOTWIRE_CHAT_<ns>``); each write carries ``Botwire-Origin`` (host/pid, set by
``connect.origin_headers`` on every publish: no extra round trip). Replay reads a log in stream
order by batch direct gets from a sequence or a time (``start_time``), with headers, since the
sequence, time and origin are in them. Conversation events that are not messages (summaries from
``compact``, records of ``clear``) go on a third subject per conversation,
``botwire.<ns>.chatev.<id>``, so that reads of messages never see them and a ``clear`` (a purge of
the messages' subject) keeps them.

What a past state can reach is what the server keeps: a key's last ``history`` revisions (the
stream's ``max_msgs_per_subject``), none before a write with a TTL (it rolls up the key's older
revisions, so that the key reads as missing once it expires), and a conversation's messages
within the namespace's retention and since its last ``clear``. Asked for an older moment, the
reads raise ``BeforeRetention`` rather than answer from what happens to be left.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import msgspec
import nats.errors
from nats.aio.msg import Msg

from .. import keys
from .._backend import Bound, LogEntry, RawEvent, RetentionState
from ..errors import BeforeRetention, BotWireError, InvalidArgument
from ..settings import ConnectOptions
from ..times import parse_time
from .blobs import op_of
from .chatlog import _TAIL_MESSAGES, AGE_LIMITED, stream_name
from .connect import origin_headers
from .errors import raise_api_error
from .jetstream import Connection
from .kv import DEFAULT_HISTORY, NatsMemory
from .pool import acquire, release
from .rawsub import RawSubscription, header, status

__all__ = ["NatsReplay", "open_replay"]

# Messages per batch direct get: large replies amortise the request (the server also cuts a reply
# at its max_pending bytes, 64 MiB by default, and the pending count says when to page on).
_BATCH: Final = 10_000
_NS: Final = 1_000_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_INACTIVE: Final = 10.0  # seconds without a pull request before the server deletes a replay's consumer
_MIN_DUPLICATE_WINDOW: Final = 120.0  # the chat stream's de-duplication window (s): capped by max_age


def _rfc3339(t: datetime) -> str:
    try:
        return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except OverflowError:  # before year 1 or after 9999 in UTC: said in its own zone
        return t.isoformat()


def _kv_kind(hdr: bytes | None) -> str:
    """set, delete, purge or expire, from a KV message's raw headers."""
    if not hdr or (b"\r\nNats-Marker-Reason:" not in hdr and b"\r\nKV-Operation:" not in hdr):
        return "set"  # the usual write: two substring checks instead of two header lookups
    reason = header(hdr, b"Nats-Marker-Reason")
    if reason is not None:
        return "expire" if reason == "MaxAge" else ("purge" if reason == "Purge" else "delete")
    op = header(hdr, b"KV-Operation")
    return "delete" if op == "DEL" else "purge" if op == "PURGE" else "set"


_ORIGIN_FIRST: Final = b"NATS/1.0\r\nBotwire-Origin:"  # our writes put it first (connect.origin_headers)
_origins: dict[bytes, str] = {}  # a replay meets few writers: each origin decoded once


def _origin(hdr: bytes | None) -> str | None:
    """``header(hdr, b"Botwire-Origin")``, at a fixed place when it is the first header: half the
    time of the search (measured 0.57 vs 0.85 µs), once per event of a replay."""
    if hdr is None or not hdr.startswith(_ORIGIN_FIRST):
        return header(hdr, b"Botwire-Origin")
    n = len(_ORIGIN_FIRST)
    j = hdr.find(b"\r\n", n)
    raw = hdr[n : j if j >= 0 else len(hdr)]
    origin = _origins.get(raw)
    if origin is None:
        origin = raw.strip().decode()
        if len(_origins) < 4096:
            _origins[raw] = origin
    return origin


def _glob(pattern: str, exact: bool) -> Callable[[str], re.Match[str] | None] | None:
    """``keys.matches`` against ``pattern`` as one compiled match (the same fnmatch regex, without
    its per-call cache lookup); None when the subject filter already selects exactly: a plain key,
    or ``*`` (every key)."""
    if exact or pattern == "*":
        return None
    return re.compile(fnmatch.translate(pattern)).match


async def open_replay(opts: ConnectOptions, namespace: str, *, timeout: float) -> NatsReplay:
    """The shared connection for ``opts``; the namespace's streams are not created (a replay of a
    namespace that was never written yields nothing)."""
    conn = await acquire(opts)
    return NatsReplay(conn, namespace, timeout)


class NatsReplay:
    """One namespace's logs on a shared ``Connection`` (a ``_backend.ReplayBackend``)."""

    def __init__(self, conn: Connection, namespace: str, timeout: float) -> None:
        self.conn = conn
        self.namespace = namespace
        self.timeout = timeout
        self.kv = NatsMemory(conn, namespace, history=None, replicas=1, timeout=timeout)
        self.chat_stream = stream_name(namespace)
        self.chat = f"botwire.{namespace}.chat."
        self.events = f"botwire.{namespace}.chatev."
        self._events_ready = False

    async def close(self) -> None:
        await release(self.conn)

    # -- raw stream access ----------------------------------------------------------------------
    async def _info(self, stream: str) -> dict[str, Any] | None:
        """The stream's info (config and state) as the server sends it; None: no such stream."""

        async def run() -> dict[str, Any] | None:
            msg = await self.conn.request(f"$JS.API.STREAM.INFO.{stream}", b"", None, self.timeout)
            info: dict[str, Any] = msgspec.json.decode(msg.data)
            error = info.get("error")
            if error:
                if error.get("err_code") == 10059:  # stream not found
                    return None
                raise_api_error(error)
            return info

        return await self.conn.call(run, timeout=self.timeout)

    async def _update(self, stream: str, change: Callable[[dict[str, Any]], bool]) -> None:
        """Read the stream's raw config, let ``change`` edit it (False: nothing to change), write it
        back: fields this nats-py does not model are kept as they are."""

        async def run() -> None:
            info = await self._info(stream)
            if info is None:
                raise InvalidArgument(f"namespace {self.namespace!r} has no stream {stream}")
            config = info["config"]
            if not change(config):
                return
            resp = await self.conn.request(
                f"$JS.API.STREAM.UPDATE.{stream}", msgspec.json.encode(config), None, self.timeout
            )
            result: dict[str, Any] = msgspec.json.decode(resp.data)
            if result.get("error"):
                error = result["error"]
                raise InvalidArgument(f"the server refused the retention of {stream}: {error.get('description')}")

        await self.conn.call(run, timeout=self.timeout)

    async def _scan(
        self, stream: str, subject_filter: str, start: Bound, end: Bound
    ) -> AsyncIterator[list[tuple[bytes, int, datetime, bytes | None, bytes]]]:
        """``(subject, seq, time, raw headers, body)`` of the messages matching ``subject_filter``
        from ``start`` to ``end``, in stream order, up to the last one stored when the scan began,
        a list per burst of deliveries (one generator step per burst, not per event).

        Through an ephemeral pull consumer (acks off, in memory, gone 10 s after its last use),
        fetched ``_BATCH`` at a time: a delivered message carries only its own headers (origin,
        message id) and takes its sequence and time from the reply subject. A batch direct get
        carries eight more headers per message, and nats-py parses headers character by character
        (measured: 6 of 8 s of a 20k-event replay went to that parse). The deliveries bypass
        nats-py's ``Msg`` too (``rawsub``): 17k -> 42k events/s measured, same load.
        """
        config: dict[str, Any] = {
            "ack_policy": "none",
            "filter_subject": subject_filter,
            "inactive_threshold": int(_INACTIVE * _NS),
            "mem_storage": True,
            "num_replicas": 1,
        }
        since = start if isinstance(start, datetime) else None
        if since is not None:
            # An event's time is its stored nanoseconds rounded to the µs (``_stored_time``), so
            # the write at ``e.time`` may be stored up to 0.5 µs before it: asked from 1 µs
            # earlier, and what still precedes ``start`` skipped below (measured: asked from
            # ``e.time`` itself, a replay from an event's own time could leave that event out).
            try:
                config.update(
                    deliver_policy="by_start_time", opt_start_time=_rfc3339(since - timedelta(microseconds=1))
                )
            except OverflowError:  # year 1 or 9999 in UTC: before or after every stored message
                if since.year > 1:
                    return
                config["deliver_policy"] = "all"
        elif start:
            config.update(deliver_policy="by_start_sequence", opt_start_seq=start)
        else:
            config["deliver_policy"] = "all"
        conn, timeout = self.conn, self.timeout

        async def create() -> tuple[str, int] | None:
            """A consumer from ``config``: its name and how many messages it has; None: no stream."""
            body = msgspec.json.encode({"stream_name": stream, "config": config})
            resp = await conn.request(f"$JS.API.CONSUMER.CREATE.{stream}", body, None, timeout)
            created: dict[str, Any] = msgspec.json.decode(resp.data)
            if created.get("error"):
                if created["error"].get("err_code") == 10059:  # no such stream: nothing was written
                    return None
                raise_api_error(created["error"])
            return created["name"], created["num_pending"]

        made = await create()
        if made is None:
            return
        name, left = made
        # Deliveries as the parser gives them (rawsub): no nats-py Msg, no header parse beyond a
        # split, handled in bursts (measured: 17k events/s through nats-py's Msg at load 19).
        arrived: deque[tuple[bytes, bytes, bytes, bytes | None]] = deque()
        ready = asyncio.Event()

        def sink(subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
            arrived.append((subject, reply, data, hdr))
            ready.set()

        raw = await RawSubscription(conn.nc, conn.nc.new_inbox(), sink).start()
        by_seq, by_time = isinstance(end, int), isinstance(end, datetime)
        last = 0  # the stream sequence of the last message delivered
        resumed = 0  # consumers made again in a row without a delivery
        stalls = 0  # requests in a row answered "no messages" while the consumer has some
        try:
            while left > 0:
                want = min(_BATCH, left)
                req = msgspec.json.encode({"batch": want, "no_wait": True})
                await conn.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", req, reply=raw.subject)
                got = 0
                gone = cut = False
                while got < want and not gone and not cut:
                    if not await _burst(arrived, ready, timeout):
                        # No answer in time: a restarted server lost the pull request and its
                        # in-memory consumer (measured: the replay raised a bare TimeoutError).
                        gone = True
                        break
                    burst: list[tuple[bytes, int, datetime, bytes | None, bytes]] = []
                    done = False
                    popleft, append = arrived.popleft, burst.append
                    while arrived and got < want:
                        subject, reply, data, hdr = popleft()
                        if not reply:
                            code = status(hdr, data)
                            if code == 503 or (code == 409 and hdr is not None and b"Deleted" in hdr):
                                gone = True  # the consumer is gone: made again below
                            elif code in (404, 408):
                                cut = True  # no more messages now: the end, or cut short (below)
                            else:
                                raise BotWireError(f"the server stopped the replay of {stream}: {(hdr or b'').decode(errors='replace').strip()}")
                            break
                        got += 1
                        # The stream sequence and stored time (ns) from the reply subject,
                        # ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>``
                        # (or 12 tokens: domain and account hash after ``$JS.ACK``, a random token
                        # at the end); inline and on bytes, as this runs once per event.
                        tokens = reply.split(b".")
                        if len(tokens) == 9:
                            seq, ns = int(tokens[5]), int(tokens[7])
                        else:
                            seq, ns = int(tokens[7]), int(tokens[9])
                        last = seq
                        t = _EPOCH + timedelta(0, 0, (ns + 500) // 1000)  # = _stored_time(ns)
                        if (by_seq and seq > end) or (by_time and t > end):  # type: ignore[operator]
                            done = True
                            break
                        if since is not None and t < since:
                            continue
                        append((subject, seq, t, hdr, data))
                    if got:
                        resumed = 0
                    if burst:
                        yield burst
                    if done:
                        return
                left -= got
                if cut and left > 0:
                    # A no_wait request can end in "404 No Messages" while more are stored
                    # (measured: 7,313 of 10,000 delivered, 420k left, nats-server 2.15 at load
                    # 15): the consumer's own count says whether the scan is done.
                    resp = await conn.request(f"$JS.API.CONSUMER.INFO.{stream}.{name}", b"", None, timeout)
                    info: dict[str, Any] = msgspec.json.decode(resp.data)
                    if info.get("error"):
                        gone = True
                    elif not info.get("num_pending"):
                        return  # removed since the scan began
                    elif got == 0:
                        stalls += 1
                        if stalls > 50:
                            raise BotWireError(f"the replay of {stream} gets no messages though {info['num_pending']} are pending")
                        await asyncio.sleep(0.01 * stalls)
                if got:
                    stalls = 0
                if gone:
                    # The server deletes a consumer _INACTIVE s after its last pull request: the
                    # reader paused that long (or a merge read the other log first, measured: a
                    # 1M-event replay lost all but the first 10k messages). Made again from the
                    # next sequence, for what is left of the count taken when the scan began.
                    resumed += 1
                    if resumed > 3:
                        raise BotWireError(f"the replay's consumer of {stream} keeps disappearing")
                    if last:
                        config.pop("opt_start_time", None)
                        config.update(deliver_policy="by_start_sequence", opt_start_seq=last + 1)
                    # A new inbox: late deliveries of the old consumer cannot mix in. ``call``
                    # waits for a reconnect within the timeout, else raises ServerUnavailable.
                    await raw.stop()
                    await conn.nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"")
                    arrived.clear()
                    made = await conn.call(create, timeout=timeout)
                    if made is None:
                        return
                    name, pending = made
                    raw = await RawSubscription(conn.nc, conn.nc.new_inbox(), sink).start()
                    left = min(left, pending)
        finally:
            await raw.stop()
            # else gone when inactive. A scan left unfinished is closed when its generator is
            # finalised, which can be after the connection closed (a reader that stopped early,
            # at the loop's shutdown): measured, an unhandled ConnectionClosedError traceback on
            # stderr; the server deletes the consumer after _INACTIVE s anyway.
            with contextlib.suppress(nats.errors.Error):
                await conn.nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"")

    # -- replay ---------------------------------------------------------------------------------
    # The events come a list per burst of deliveries (``key_bursts``/``chat_bursts``): one
    # generator step per burst, not per event, through every layer up to ``areplay`` (measured:
    # four async generators stepped per event were a fifth of a replay's time).
    async def key_events(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[RawEvent]:
        async for burst in self.key_bursts(pattern, start, end):
            for event in burst:
                yield event

    async def chat_events(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[RawEvent]:
        async for burst in self.chat_bursts(pattern, start, end):
            for event in burst:
                yield event

    async def key_bursts(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[list[RawEvent]]:
        subject_filter, exact = keys.pattern_filter(pattern)
        match = _glob(pattern, exact)
        kv = self.kv
        n = len(kv.prefix)
        async for burst in self._scan(kv.stream, kv.prefix + subject_filter, start, end):
            out: list[RawEvent] = []
            for subject, seq, t, hdr, body in burst:
                key = subject[n:].decode()  # plain tokens (the usual key): no per-token decode
                key = key.replace(".", ":") if "=" not in key else keys.decode_key(key)
                if match is not None and match(key) is None:
                    continue
                if hdr is None:
                    out.append(RawEvent("memory", seq, t, "set", key, body, None))
                    continue
                kind = _kv_kind(hdr)
                data = None
                if kind == "set":
                    data = body
                    if b"\r\nBotwire-Blob:" in hdr:  # = header(hdr, b"Botwire-Blob") is not None
                        try:
                            data = await kv.blobs.read(key, body)
                        except BotWireError:
                            data = None  # an overwritten large value: its chunks are reclaimed
                out.append(RawEvent("memory", seq, t, kind, key, data, _origin(hdr)))
            if out:
                yield out

    async def chat_bursts(self, pattern: str, start: Bound, end: Bound) -> AsyncIterator[list[RawEvent]]:
        subject_filter, exact = keys.pattern_filter(pattern)
        match = _glob(pattern, exact)
        prefix = f"botwire.{self.namespace}."
        n = len(prefix)
        async for burst in self._scan(self.chat_stream, f"{prefix}*.{subject_filter}", start, end):
            out: list[RawEvent] = []
            for subject, seq, t, hdr, body in burst:
                kind_of_subject, _, token_path = subject[n:].decode().partition(".")
                if kind_of_subject == "chat":
                    kind = "append" if body else "expire"  # an empty body: the expiry rollup
                    upto = None
                elif kind_of_subject == "chatev":
                    kind = header(hdr, b"Botwire-Event") or "summary"
                    mark = header(hdr, b"Botwire-Upto")
                    upto = int(mark) if mark is not None else None
                else:
                    continue  # an expiry schedule: how expiry works, not an event
                session_id = token_path.replace(".", ":") if "=" not in token_path else keys.decode_key(token_path)
                if match is not None and match(session_id) is None:
                    continue
                out.append(RawEvent("chat", seq, t, kind, session_id, body or None, _origin(hdr), upto))
            if out:
                yield out

    # -- past states ----------------------------------------------------------------------------
    async def key_at(self, key: str, at: datetime) -> bytes | None:
        kv = self.kv
        if await self._info(kv.stream) is None:
            return None
        msgs = await self.conn.read_subject(kv.stream, kv.subject(key), page=1000, timeout=self.timeout)
        best: Msg | None = None
        for m in msgs:
            if parse_time((m.headers or {})["Nats-Time-Stamp"]) > at:
                break
            best = m
        if best is None:
            if not msgs:
                return None  # never written (or expired: the server then removes all of it)
            hdr = msgs[0].headers or {}
            first = hdr["Nats-Time-Stamp"]
            if "Nats-Rollup" in hdr:
                raise BeforeRetention(
                    f"{key!r} as of {_rfc3339(at)}: its revisions before {first} were removed by a write "
                    "with a TTL (which rolls up the older revisions) or its expiry"
                )
            info = await self._info(kv.stream)
            history = (info or {}).get("config", {}).get("max_msgs_per_subject", DEFAULT_HISTORY)
            if history > 0 and len(msgs) >= history:
                raise BeforeRetention(
                    f"{key!r} as of {_rfc3339(at)}: the namespace keeps {history} revisions per key, "
                    f"the oldest kept from {first}; raise its key_history to reach further"
                )
            return None  # its first write came after ``at``
        if op_of(best.headers) != "set":
            return None
        try:
            return await kv._data(key, best)
        except BotWireError as exc:
            raise BeforeRetention(
                f"{key!r} as of {_rfc3339(at)} was a large value since overwritten: its chunks are reclaimed"
            ) from exc

    async def log_at(self, session_id: str, at: datetime) -> list[LogEntry]:
        info = await self._info(self.chat_stream)
        if info is None:
            return []
        token_path = keys.encode_key(session_id)
        for m in await self.conn.read_subject(self.chat_stream, self.events + token_path, timeout=self.timeout):
            hdr = m.headers or {}
            cleared = parse_time(hdr["Nats-Time-Stamp"])
            if hdr.get("Botwire-Event") == "clear" and cleared > at:
                raise BeforeRetention(
                    f"conversation {session_id!r} as of {_rfc3339(at)}: it was cleared at {_rfc3339(cleared)}, "
                    "which removed its messages before"
                )
        config = info["config"]
        max_age = config.get("max_age", 0) / _NS
        if max_age and at < datetime.now(UTC) - timedelta(seconds=max_age):
            raise BeforeRetention(
                f"conversation {session_id!r} as of {_rfc3339(at)}: the namespace keeps its logs for {max_age:g} s"
            )
        msgs = await self.conn.read_subject(self.chat_stream, self.chat + token_path, timeout=self.timeout)
        out: list[LogEntry] = []
        for m in msgs:
            hdr = m.headers or {}
            t = parse_time(hdr["Nats-Time-Stamp"])
            if t > at:
                if not out:
                    limit = config.get("max_msgs_per_subject", -1)
                    if not m.data:
                        raise BeforeRetention(
                            f"conversation {session_id!r} as of {_rfc3339(at)}: it expired at {_rfc3339(t)}"
                        )
                    if limit > 0 and len(msgs) >= limit:
                        raise BeforeRetention(
                            f"conversation {session_id!r} as of {_rfc3339(at)}: the namespace keeps {limit} "
                            f"messages per conversation, the oldest kept from {_rfc3339(t)}"
                        )
                break
            if m.data:
                out.append(LogEntry(int(hdr["Nats-Sequence"]), t, m.data))
        return out

    # -- conversation events --------------------------------------------------------------------
    async def ensure_events(self) -> None:
        """Give the chat stream the events subject (streams made before it existed lack it)."""
        if self._events_ready:
            return
        wanted = f"{self.events}>"

        def add(config: dict[str, Any]) -> bool:
            subjects = config.setdefault("subjects", [])
            if wanted in subjects:
                return False
            subjects.append(wanted)
            return True

        await self._update(self.chat_stream, add)
        self._events_ready = True

    async def _record(self, session_id: str, kind: Literal["summary", "clear"], data: bytes, upto: int | None) -> int:
        await self.ensure_events()
        headers = origin_headers()
        headers["Botwire-Event"] = kind
        token_path = keys.encode_key(session_id)
        if upto is not None:
            headers["Botwire-Upto"] = str(upto)
            # One id per (namespace, conversation, upto): a summary published again for the same
            # range (a caller retrying after OutcomeUnknown, a compaction re-run) within the
            # stream's de-duplication window is dropped by the server, which answers with the
            # first one's sequence.
            headers["Nats-Msg-Id"] = f"botwire-summary.{self.namespace}.{token_path}.{upto}"
        subject = self.events + token_path
        return await self.conn.publish(subject, data, headers, self.timeout, what=kind)

    async def add_summary(self, session_id: str, data: bytes, upto: int) -> int:
        subject = self.chat + keys.encode_key(session_id)
        probe = await self.conn.direct_batch(
            self.chat_stream, {"next_by_subj": subject, "seq": upto, "batch": 1}, self.timeout
        )
        m = probe.msgs[0] if probe.msgs else None
        if m is None or int((m.headers or {})["Nats-Sequence"]) != upto or not m.data:
            raise InvalidArgument(
                f"upto={upto} is not a message of conversation {session_id!r}: a summary covers the "
                "messages up to one of its own sequences (nothing was written)"
            )
        return await self._record(session_id, "summary", data, upto)

    async def last_summary(self, session_id: str) -> RawEvent | None:
        # one request: the caller has opened the conversation, so the stream exists (a stream made
        # before the events subject existed answers "no message")
        m = await self.conn.direct_get_last(self.chat_stream, self.events + keys.encode_key(session_id), self.timeout)
        hdr = (m.headers or {}) if m is not None else {}
        if m is None or hdr.get("Botwire-Event") != "summary":
            return None  # none, or cleared since
        return RawEvent(
            "chat",
            int(hdr["Nats-Sequence"]),
            parse_time(hdr["Nats-Time-Stamp"]),
            "summary",
            session_id,
            m.data,
            hdr.get("Botwire-Origin"),
            int(hdr["Botwire-Upto"]),
        )

    async def record_clear(self, session_id: str) -> None:
        await self._record(session_id, "clear", b"", None)  # the caller has opened the stream

    # -- retention ------------------------------------------------------------------------------
    async def retention(self) -> RetentionState:
        kv_info = await self._info(self.kv.stream)
        chat_info = await self._info(self.chat_stream)
        history = DEFAULT_HISTORY if kv_info is None else kv_info["config"].get("max_msgs_per_subject", DEFAULT_HISTORY)
        messages = age = None
        if chat_info is not None:
            limit = chat_info["config"].get("max_msgs_per_subject", -1)
            messages = limit if limit > 0 else None
            age = chat_info["config"].get("max_age", 0) / _NS or None
            (AGE_LIMITED.add if age else AGE_LIMITED.discard)(self.chat_stream)
        return RetentionState(history, messages, age, _oldest(kv_info), _oldest(chat_info))

    async def set_retention(self, key_history: int | None, log_messages: int | None, log_age: float | None) -> None:
        if key_history is not None:
            await self.conn.ensure_stream(self.kv.config(), self.timeout)
            await self.conn.set_max_per_subject(self.kv.stream, key_history, self.timeout)
        if log_messages is not None and 0 < log_messages < _TAIL_MESSAGES:
            raise InvalidArgument(
                f"log_messages must be 0 (keep all) or at least {_TAIL_MESSAGES}, not {log_messages}: "
                f"a process serves last=N (N up to {_TAIL_MESSAGES}) from the newest messages it read"
            )
        if log_messages is None and log_age is None:
            return
        from .chatlog import NatsChat

        await self.conn.ensure_stream(NatsChat(self.namespace, self.timeout).config(1), self.timeout)

        def change(config: dict[str, Any]) -> bool:
            before = dict(config)
            if log_messages is not None:
                config["max_msgs_per_subject"] = log_messages or -1
            if log_age is not None:
                config["max_age"] = int(log_age * _NS)
                # the server refuses a de-duplication window longer than max_age
                window = _MIN_DUPLICATE_WINDOW if not log_age else min(_MIN_DUPLICATE_WINDOW, log_age)
                config["duplicate_window"] = int(window * _NS)
            return config != before

        await self._update(self.chat_stream, change)
        if log_age is not None:
            (AGE_LIMITED.add if log_age else AGE_LIMITED.discard)(self.chat_stream)


async def _burst(arrived: deque[Any], ready: asyncio.Event, timeout: float) -> bool:
    """Wait for deliveries (one wait per burst, not per message); False: none within ``timeout``."""
    while not arrived:
        ready.clear()
        try:
            async with asyncio.timeout(timeout):
                await ready.wait()
        except TimeoutError:
            return False
    return True


def _stored_time(ns: int) -> datetime:
    """A stored time (ns since the epoch) as ``parse_time`` reads it from ``Nats-Time-Stamp``, to
    the same microsecond (rounded half up, as msgspec rounds the nanoseconds): ``get(at=)`` and
    ``messages(at=)`` compare that header, and an event's own time must reach its write (``ns /
    1e9`` as a float rounds differently: measured, 1 µs lower for some writes, which ``at=`` then
    missed). Integer arithmetic, no text: checked equal to ``parse_time`` over 25k times, ties and
    second carries included, and 1.2 µs instead of 1.6 µs."""
    return _EPOCH + timedelta(0, 0, (ns + 500) // 1000)


def _oldest(info: dict[str, Any] | None) -> datetime | None:
    state = (info or {}).get("state") or {}
    if not state.get("messages"):
        return None
    return parse_time(state["first_ts"])
