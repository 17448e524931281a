"""The chat endpoint of ``botwire serve``, its demo page, and the leases that close dead answers.

Routes (JSON bodies, sent as ``application/json``, else 415; a refusal is a 4xx with
``{"error": "..."}`` and nothing written):

- ``POST /v1/chat/<ns>`` ``{"user": U}`` -> 201 ``{"session", "conversation"}``: a new
  conversation ``U-<hex>``; ``GET /v1/chat/<ns>?user=U``: U's conversations, newest first.
- ``POST /v1/chat/<ns>/<session>/messages`` ``{"content": text}`` -> 202 ``{"answer", "seq"}``:
  appends the user message to the conversation (``AsyncChatHistory``; the message's ``meta``
  names the answer's stream), creates the answer's token stream (``text/plain``), starts the
  model and returns at once. ``answer`` is the Durable Stream URL the answer is read from. With an
  ``Idempotency-Key`` header (or ``idempotency_key`` in the body), a repeat within 24 h gets the
  same 202 and stores nothing (see ``ChatService._reserve``), also when the process that took the
  first one stopped between storing the question and recording the key: the question carries a
  ``Nats-Msg-Id`` derived from the key, and the key's hold names the answer the question carries.
- ``GET /`` and ``/static/...``: the chat page; ``/`` is served with the limits below
  (``page_limits``), so the page checks a user name and a message as the server does.

``<ns>`` and ``<session>`` are checked first: a namespace that is not 1-64 characters of
``[A-Za-z0-9_-]`` or a session id over 256 characters (or holding control characters) is a 400
naming the limit, before the body is read.

The producer appends the model's text coalesced (every ``flush_interval`` seconds at most one
append, see ``Producer``) with an idempotent producer id, so persisting costs a few appends per
second. When the model ends, the stream is closed, then the whole answer is appended to the
conversation (``meta``: ``stream``, ``answer``; ``incomplete: true`` if the model failed;
``truncated: true`` when it was cut to fit one message: the stream has it whole).

**Leases.** While it streams, the producer renews ``lease:<answer>`` (a ``Memory`` key with a
TTL of ``lease_ttl`` seconds) in the namespace ``botwire-answers``, where ``answer:<answer>``
lists the unfinished answer. Every serve process checks those every ``lease_ttl / 4`` seconds: an
answer whose lease expired is claimed (a compare-and-set on its ``answer:`` key, so one process
does it), its stream closed with the producer's next epoch (which fences the old producer, if it
was only slow) and its partial text appended to the conversation with ``incomplete: true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .. import errors
from ..chat import AsyncChatHistory
from ..keys import check_namespace, check_session_id
from ..memory import AsyncMemory
from ..tokens import TokenStreams
from . import NATS_TIMEOUT
from .headers import COMMON
from .model import ChatModel
from .protocol import ProtocolError
from .streams import read_body

__all__ = [
    "IDEMPOTENCY_KEY_PATTERN", "MAX_MESSAGE_CHARS", "REGISTRY_NAMESPACE", "STRUCTS", "USER_PATTERN", "ChatService", "page_limits", "schema_pattern",
]

log = logging.getLogger("botwire.serve.chat")

REGISTRY_NAMESPACE = "botwire-answers"
MAX_MESSAGE_CHARS = 32_000  # a user message; longer: 413 (the model's context is the real limit)
# JSON may spell any character as escapes, 12 bytes at most (an emoji as a surrogate pair,
# "\ud83d\ude00", which json.dumps writes by default): a message of the allowed length fits
_MAX_BODY = 12 * MAX_MESSAGE_CHARS + 1024
# The chat API's limits, written once: the handlers' checks (their messages and statuses) and the
# structs /openapi.json documents are both made from these.
_USER_CHARS = 40
_USER = re.compile(rf"[A-Za-z0-9_]{{1,{_USER_CHARS}}}")


def schema_pattern(pattern: str) -> str:
    """A JSON Schema ``pattern`` that takes exactly the strings ``re.fullmatch(pattern, s)`` takes.

    Schema patterns are unanchored (Python validators use ``re.search``, ECMA ``RegExp.test``).
    ``^...$`` is not enough: Python's ``$`` also matches before a final newline, so ``"ada\\n"``
    was valid by /openapi.json and refused here; ECMA has no ``\\Z``. "No character follows", a
    lookahead both dialects have, is the end in both."""
    return rf"^(?:{pattern})(?![\s\S])"


USER_PATTERN = schema_pattern(_USER.pattern)
_CONVERSATION = "botwire-chat:"  # the Memory key prefix of a conversation's record
_HISTORY = 50  # the newest messages the model sees
_STATIC = Path(__file__).with_name("static")
_PAGE = Path(__file__).with_name("chatpage.html")  # not in static/: served only filled in, by index()
_CLAIM_STALE = 30.0  # a recovery claimed this long ago by a process that then died is taken over
_IDEMPOTENCY_KEY_CHARS = 255
_IDEMPOTENCY_KEY = re.compile(rf"[\x21-\x7e]{{1,{_IDEMPOTENCY_KEY_CHARS}}}")  # visible ASCII, as a header can carry it
IDEMPOTENCY_KEY_PATTERN = schema_pattern(_IDEMPOTENCY_KEY.pattern)
_IDEMPOTENCY_WINDOW = 86_400  # seconds a key's 202 is kept: a repeat within it gets the same one
_IDEMPOTENCY_PENDING = 30.0  # seconds after which a key's unfinished request may be taken over
_IDEMPOTENCY_WAIT = 10.0  # a repeat waits this long for the first request to store its question


# The bodies of the routes, as structs: the handlers encode their answers and check their
# requests with them, and /openapi.json documents them (server/openapi.py).
class NewConversation(msgspec.Struct):
    """``POST /v1/chat/<ns>``: the user the conversation belongs to."""

    user: Annotated[str, msgspec.Meta(pattern=USER_PATTERN)]


class Created(msgspec.Struct):
    """A new conversation: its session id and the Durable Stream URL of its messages."""

    session: str
    conversation: str


class ConversationItem(msgspec.Struct):
    session: str
    title: str
    updated: float


class ConversationList(msgspec.Struct):
    """The user's conversations, newest activity first."""

    conversations: list[ConversationItem]


class Conversation(msgspec.Struct):
    session: str
    title: str
    conversation: str


class NewMessage(msgspec.Struct):
    """``POST .../messages``: the user's message (not blank); ``idempotency_key``: as the
    ``Idempotency-Key`` header (the same, if both are given)."""

    content: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MESSAGE_CHARS, pattern=r"\S")]  # not blank
    idempotency_key: Annotated[str, msgspec.Meta(pattern=IDEMPOTENCY_KEY_PATTERN)] | None = None


class Accepted(msgspec.Struct):
    """The question is stored (``seq``: its sequence in the conversation); its answer streams
    from ``answer`` (a Durable Stream URL; ``stream``: the token stream's name)."""

    answer: str
    stream: str
    seq: int


class ChatError(msgspec.Struct):
    """Every refusal of the chat routes (4xx; nothing was written)."""

    error: str


STRUCTS: tuple[type[msgspec.Struct], ...] = (NewConversation, Created, ConversationList, Conversation, NewMessage, Accepted, ChatError)


def page_limits() -> dict[str, Any]:
    """The limits the chat page checks before it sends, as the handlers check them: a user name
    (``user_pattern``, /openapi.json's pattern) and a message's characters (``message_chars``)."""
    return {"user_pattern": USER_PATTERN, "message_chars": MAX_MESSAGE_CHARS}


def _stop_if_cancelled() -> None:
    """Raise ``CancelledError`` when this task is being cancelled though no await raised it.

    Python 3.11's ``wait_for`` (in nats-py's requests) can swallow a cancel that arrives as its
    call ends: the lease watcher then looped on, and ``close()``, awaiting it, never returned (seen:
    2 of 25 short test services hung at exit under load)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _accepted(stream: str, seq: int) -> Accepted:
    return Accepted(f"/v1/stream/{stream}", stream, seq)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Taken(Exception):
    """The answer is finished or claimed by another process."""


class _Held(Exception):
    """The idempotency key is held by an earlier request (``value``: its record)."""

    def __init__(self, value: Any) -> None:
        super().__init__("held")
        self.value = value


def _reserving(mine: dict[str, Any], unless: Any = None) -> Any:
    """The compare-and-set that holds an idempotency key: taken when it holds ``unless`` (None:
    free; else the stale hold of a request whose process stopped), else ``_Held``."""

    def reserve(value: Any) -> Any:
        if value != unless:
            raise _Held(value)
        return mine

    return reserve


def _noting(error: str) -> Any:
    """The update that notes a failed model on an answer's record (``_Taken`` once it is gone)."""

    def note(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _Taken
        return {**value, "error": error}

    return note


def _json(status: int, body: object) -> Response:
    return Response(msgspec.json.encode(body), status, {**COMMON, "content-type": "application/json", "cache-control": "no-store"})


def _convert(body: Mapping[str, Any], kind: type[msgspec.Struct]) -> None:
    """Check ``body`` against the documented struct too (400 on a mismatch)."""
    try:
        msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise _Refused(400, f"invalid body: {exc}") from None


def _plain_message(message: Mapping[str, Any]) -> dict[str, str]:
    return {"role": str(message.get("role", "")), "content": str(message.get("content", ""))}


class Producer:
    """Appends one answer's text to its token stream, coalesced: text that arrives while an
    append is in flight, or within ``interval`` of the last one, goes out in the next append.

    An append took 2.4-3.5 ms on loopback NATS (measured, a closing one), so at a model's 20-100
    tokens per second nearly every token still goes out alone (tested: 20 tokens 30 ms apart, 10
    or more appends), while 2,000 tokens at full speed go out in a handful (tested: at most 10).
    """

    def __init__(
        self, store: TokenStreams, path: str, producer_id: str, interval: float = 0.02, ready: asyncio.Future[Any] | None = None
    ) -> None:
        """``ready``: the stream's creation, if still under way (the first append waits for it)."""
        self.store, self.path, self.id, self.interval = store, path, producer_id, interval
        self._ready = ready
        self.seq = 0
        self.text: list[str] = []
        self._buffer: list[str] = []
        self._pending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last = 0.0
        self._done = False
        self._finishing = asyncio.Event()

    def add(self, piece: str) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # an append failed (fenced, closed, server gone): stop the model
        self.text.append(piece)
        self._buffer.append(piece)
        self._pending.set()
        if self._task is None:
            self._task = asyncio.ensure_future(self._flusher())

    async def _append(self, data: bytes, close: bool = False) -> None:
        """``data`` in appends the server takes (a model faster than the appends could pile up
        more than one message's size), the last one closing the stream when ``close``."""
        if self._ready is not None:
            await self._ready
        size = max(1024, self.store._b.max_chunk // 2)
        parts: list[bytes] = []
        while len(data) > size:
            cut = size
            while data[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character: each part is text
                cut -= 1
            parts.append(data[:cut])
            data = data[cut:]
        parts.append(data)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part or (last and close):
                await self.store.append(
                    self.path, part, content_type="text/plain", close=close and last, producer=(self.id, 0, self.seq)
                )
                self.seq += 1

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._done:
            await self._pending.wait()
            delay = self._last + self.interval - loop.time()
            if delay > 0:  # finish() cuts this wait short (measured: it cost up to 20 ms per answer)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._finishing.wait(), delay)
            if self._done:
                return  # finish() appends the rest with the close
            self._pending.clear()
            data = "".join(self._buffer).encode()
            self._buffer.clear()
            self._last = loop.time()
            if data:
                await self._append(data)

    async def finish(self) -> None:
        """Append what is left and close the stream, in one append (``ProducerFenced`` or
        ``StreamClosed``: another process closed it, the lease having expired)."""
        self._done = True
        self._pending.set()
        self._finishing.set()
        if self._task is not None:
            await self._task  # lets an append in flight end: every append is stored once, in order
        await self._append("".join(self._buffer).encode(), close=True)
        self._buffer.clear()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class ChatService:
    """The chat routes, the producers of this process and its lease watcher."""

    def __init__(
        self,
        connect: Mapping[str, str | None],
        model: ChatModel,
        *,
        lease_ttl: int = 5,
        flush_interval: float = 0.02,
    ) -> None:
        self.store: TokenStreams = None  # type: ignore[assignment]  # set by start()
        self.connect = dict(connect)
        self.model = model
        self.lease_ttl = lease_ttl
        self.flush_interval = flush_interval
        self.owner = uuid.uuid4().hex[:12]
        self.claim_stale = _CLAIM_STALE  # seconds (tests shorten it)
        self.idempotency_pending = _IDEMPOTENCY_PENDING
        # a test hook, off unless set: SIGKILL this process right after a question is stored,
        # before its Idempotency-Key is recorded (tests/test_serve_review.py)
        self._die_after_question = os.environ.get("BOTWIRE_TEST_HOOK_KILL_AFTER_QUESTION") == "1"
        self._memories: dict[str, AsyncMemory] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._watcher: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def memory(self, namespace: str) -> AsyncMemory:
        mem = self._memories.get(namespace)
        if mem is None:
            mem = self._memories[namespace] = AsyncMemory(namespace, **{"timeout": NATS_TIMEOUT, **self.connect})  # type: ignore[arg-type]
        return mem

    def chat(self, namespace: str, session: str) -> AsyncChatHistory:
        return AsyncChatHistory(session, namespace=namespace, **{"timeout": NATS_TIMEOUT, **self.connect})  # type: ignore[arg-type]

    async def start(self, store: TokenStreams) -> None:
        self.store = store
        self._watcher = asyncio.ensure_future(self._watch_leases())

    async def close(self) -> None:
        """Stop the watcher and the producers: their leases expire and another process (or this
        one, restarted) closes their answers as incomplete."""
        tasks = [t for t in [self._watcher, *self._tasks.values()] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for mem in self._memories.values():
            await mem.close()

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.index, methods=["GET", "HEAD"]),
            Mount("/static", StaticFiles(directory=_STATIC), name="static"),
            Route("/v1/chat/{ns}", self.conversations, methods=["GET", "POST"]),
            Route("/v1/chat/{ns}/{session}", self.conversation, methods=["GET"]),
            Route("/v1/chat/{ns}/{session}/messages", self.post_message, methods=["POST"]),
        ]

    # -- routes -----------------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        """The chat page, with ``page_limits`` in its ``botwire-limits`` meta tag."""
        limits = html.escape(msgspec.json.encode(page_limits()).decode(), quote=True)
        page = _PAGE.read_text("utf-8").replace("{{limits}}", limits)
        return HTMLResponse(page, headers={**COMMON, "cache-control": "no-cache"})

    async def _guard(self, request: Request, handler: Any) -> Response:
        try:
            result: Response = await handler(request)
            return result
        except _Refused as exc:
            return _json(exc.status, ChatError(str(exc)))
        except ProtocolError as exc:
            return _json(exc.status, ChatError(exc.message))
        except errors.BotWireError as exc:
            return _json(exc.http_status, ChatError(str(exc).split("\n", 1)[0][:300]))

    async def _body(self, request: Request) -> dict[str, Any]:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            # a form or text/plain body is what a cross-site page may send without asking first
            raise _Refused(415, f"the body must be sent as application/json, not {media or 'no content type'}")
        raw = await read_body(request, _MAX_BODY)
        try:
            body = msgspec.json.decode(raw) if raw else {}
        except msgspec.DecodeError:
            raise _Refused(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _Refused(400, "the body must be a JSON object")
        return body

    @staticmethod
    def _names(request: Request) -> tuple[str, str]:
        """The route's ``ns`` and ``session`` ("" on a route without one), checked before anything
        else: over its limit, either is a 400 that names the limit (a long one was a 400 about an
        internal key's bytes, or cut before the limit by the error's 300-character cap)."""
        ns, session = request.path_params["ns"], request.path_params.get("session")
        check_namespace(ns)
        if session is not None:
            check_session_id(session)
        return ns, session or ""

    async def _record(self, ns: str, session: str) -> dict[str, Any]:
        try:
            record = await self.memory(ns).get(_CONVERSATION + session)
        except errors.InvalidKey:  # a valid id too long for a record's key (256 4-byte characters)
            record = None
        if not isinstance(record, dict):
            raise _Refused(404, f"no conversation {session!r} in namespace {ns!r}; create one with POST /v1/chat/{ns}")
        return record

    @staticmethod
    def _user(value: object) -> str:
        if not isinstance(value, str) or not _USER.fullmatch(value):
            raise _Refused(400, f"user must be 1-{_USER_CHARS} letters, digits or _")
        return value

    async def conversations(self, request: Request) -> Response:
        return await self._guard(request, self._conversations)

    async def _conversations(self, request: Request) -> Response:
        ns, _ = self._names(request)
        mem = self.memory(ns)
        if request.method == "POST":
            body = await self._body(request)
            user = self._user(body.get("user"))
            _convert(body, NewConversation)
            session = f"{user}-{uuid.uuid4().hex[:12]}"
            now = time.time()
            await mem.set(_CONVERSATION + session, {"user": user, "title": "New conversation", "created": now, "updated": now})
            return _json(201, Created(session, f"/v1/stream/chat/{ns}/{quote(session)}"))
        user = self._user(request.query_params.get("user"))
        out = []
        for key in await mem.list_keys(f"{_CONVERSATION}{user}-*"):
            record = await mem.get(key)
            if isinstance(record, dict):
                session = key[len(_CONVERSATION) :]
                out.append(ConversationItem(session, str(record.get("title", "")), float(record.get("updated", 0))))
        out.sort(key=lambda r: r.updated, reverse=True)
        return _json(200, ConversationList(out))

    async def conversation(self, request: Request) -> Response:
        return await self._guard(request, self._conversation)

    async def _conversation(self, request: Request) -> Response:
        ns, session = self._names(request)
        record = await self._record(ns, session)
        return _json(200, Conversation(session, str(record.get("title", "")), f"/v1/stream/chat/{ns}/{quote(session)}"))

    async def post_message(self, request: Request) -> Response:
        return await self._guard(request, self._post_message)

    async def _post_message(self, request: Request) -> Response:
        ns, session = self._names(request)
        body = await self._body(request)
        content = body.get("content")
        if not isinstance(content, str) or not content.strip():
            raise _Refused(400, "content must be a non-empty string")
        if len(content) > MAX_MESSAGE_CHARS:
            raise _Refused(413, f"a message holds at most {MAX_MESSAGE_CHARS} characters, not {len(content)}")
        key = self._idempotency_key(request, body)
        _convert(body, NewMessage)
        record = await self._record(ns, session)
        answer = uuid.uuid4().hex[:16]
        path = f"answers/{ns}/{answer}"
        registry = self.memory(REGISTRY_NAMESPACE)
        held: str | None = None
        msg_id: str | None = None
        if key is not None:
            digest = hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()
            held = "idem:" + hashlib.sha256(f"{ns}\0{session}\0{key}".encode()).hexdigest()[:40]
            # the question's write id: a retry whose key's record was never written (its process
            # stopped first) is dropped by the chat stream's duplicate window (120 s)
            msg_id = "botwire-idem-" + hashlib.sha256(f"{held}\0{digest}".encode()).hexdigest()[:40]
            earlier = await self._reserve(ns, session, held, {"content": digest, "answer": answer, "stream": path, "at": time.time()})
            if earlier is not None:
                return _json(202, earlier)
        stored = unsure = False
        try:
            await self.store.create(path, content_type="text/plain", ttl=7 * 86400)
            # the lease before the answer's record: a watcher never sees an answer without a lease
            await registry.set(f"lease:{answer}", self.owner, ttl=self.lease_ttl)
            await registry.set(f"answer:{answer}", {"ns": ns, "session": session, "stream": path, "owner": self.owner})
            chat = self.chat(ns, session)
            try:
                question = {"role": "user", "content": content, "meta": {"answer": answer, "stream": path}}
                try:
                    seq = await (chat.append(question) if msg_id is None else chat._append_once(question, msg_id))
                    stored = True
                except BaseException as exc:
                    # A write of unknown outcome may be stored: keep the answer's record (the lease
                    # watcher closes the answer, as incomplete if its question is there) and the
                    # key's hold (a retry finds the question through it, after the 120 s window too).
                    # A cancelled one (the request's task cancelled: a client gone, a shutdown) too:
                    # its publish may have left, and the server stores it without us
                    unsure = isinstance(exc, (errors.OutcomeUnknown, asyncio.CancelledError))
                    if not unsure:  # no answer without its question: forget it (a watcher would close it)
                        with contextlib.suppress(errors.BotWireError):
                            await registry.delete(f"answer:{answer}")
                    raise
                if self._die_after_question:
                    os.kill(os.getpid(), signal.SIGKILL)
                if held is not None:
                    first = await self._first_question(chat, seq, answer)
                    if first is not None:  # a repeat the duplicate window dropped: the first one's 202
                        await self._drop_answer(answer, path)
                        with contextlib.suppress(errors.BotWireError):
                            await registry.set(held, {"content": digest, **first, "seq": seq}, ttl=_IDEMPOTENCY_WINDOW)
                        return _json(202, _accepted(first["stream"], seq))
                    # a repeat now gets this 202 (or finds the question: _reserve)
                    with contextlib.suppress(errors.BotWireError):
                        await registry.set(held, {"content": digest, "answer": answer, "stream": path, "seq": seq}, ttl=_IDEMPOTENCY_WINDOW)
                history = [{"role": "user", "content": content}]
                with contextlib.suppress(errors.BotWireError):  # the question alone, if the rest cannot be read
                    # up to this question: one posted to the conversation at the same moment may already
                    # follow it, and the model would answer that one instead (it did, the fake model's echo)
                    upto = [_plain_message(e.message) for e in await chat.entries(last=_HISTORY + 1) if e.seq <= seq]
                    history = upto[-_HISTORY:] if upto else history
            finally:
                await chat.close()
        finally:
            if held is not None and not stored and not unsure:  # a retry with the key may ask again
                with contextlib.suppress(errors.BotWireError):
                    await registry.delete(held)
        title = record.get("title") if record.get("title") != "New conversation" else " ".join(content.split())[:60]
        await self.memory(ns).set(_CONVERSATION + session, {**record, "title": title, "updated": time.time()})
        self._tasks[answer] = asyncio.ensure_future(self._produce(ns, session, answer, path, history))
        return _json(202, _accepted(path, seq))

    @staticmethod
    def _idempotency_key(request: Request, body: Mapping[str, Any]) -> str | None:
        """The client's key for this message: the ``Idempotency-Key`` header or the body's
        ``idempotency_key`` (the same, if both are given); None without one."""
        header, field = request.headers.get("idempotency-key"), body.get("idempotency_key")
        if field is not None and not isinstance(field, str):
            raise _Refused(400, "idempotency_key must be a string")
        if header is not None and field is not None and header != field:
            raise _Refused(400, "the Idempotency-Key header and the body's idempotency_key differ")
        key = header if header is not None else field
        if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
            raise _Refused(400, f"an Idempotency-Key is 1-{_IDEMPOTENCY_KEY_CHARS} visible ASCII characters")
        return key

    async def _reserve(self, ns: str, session: str, held: str, mine: dict[str, Any]) -> Accepted | None:
        """Hold the idempotency key ``held`` for this request (None), or the 202 body of the
        earlier request that holds it, once that one stored its question.

        The hold is a create-only write (one request wins, whichever serve process it reached),
        kept for the whole window: it names the answer its question carries, so the question is
        found in the conversation even if its process stopped before recording the key. A repeat
        waits for the earlier request (it takes milliseconds); unfinished after
        ``_IDEMPOTENCY_WAIT``, and its question not in the conversation, 409 (the client retries
        later); a hold ``idempotency_pending`` seconds old whose question was never stored is taken
        over (its process stopped first)."""
        registry = self.memory(REGISTRY_NAMESPACE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _IDEMPOTENCY_WAIT
        unless: Any = None
        searched = False
        while True:
            try:
                await registry.update(held, _reserving(mine, unless), ttl=_IDEMPOTENCY_WINDOW)
                return None
            except _Held as exc:
                earlier = exc.value
            unless = None
            if not isinstance(earlier, dict) or earlier.get("content") != mine["content"]:
                raise _Refused(422, "this Idempotency-Key was used for another message")
            stream = str(earlier.get("stream"))
            if "seq" in earlier:
                return _accepted(stream, int(earlier["seq"]))
            stale = time.time() - float(earlier.get("at", 0)) >= self.idempotency_pending
            if stale or not searched or loop.time() >= deadline:
                searched = True
                seq = await self._asked(ns, session, str(earlier.get("answer")))
                if seq is not None:
                    with contextlib.suppress(errors.BotWireError):
                        await registry.set(held, {**earlier, "seq": seq}, ttl=_IDEMPOTENCY_WINDOW)
                    return _accepted(stream, seq)
                if stale:
                    unless = earlier  # its process stopped before storing the question: take it over
                    continue
                if loop.time() >= deadline:
                    raise _Refused(409, "a request with this Idempotency-Key is still being processed; retry later")
            await asyncio.sleep(0.05)

    async def _asked(self, ns: str, session: str, answer: str) -> int | None:
        """The sequence of the question that carries ``answer`` (None: not stored)."""
        chat = self.chat(ns, session)
        try:
            recent = await chat.entries(last=_HISTORY)
            found = [e for e in recent if e.message.get("role") == "user" and (e.message.get("meta") or {}).get("answer") == answer]
            if not found and len(recent) >= _HISTORY:  # older than these: read it all (after a crash only)
                found = [e for e in await chat.entries() if e.message.get("role") == "user" and (e.message.get("meta") or {}).get("answer") == answer]
            return found[0].seq if found else None
        finally:
            await chat.close()

    async def _first_question(self, chat: AsyncChatHistory, seq: int, answer: str) -> dict[str, Any] | None:
        """When the question just appended at ``seq`` was a repeat the duplicate window dropped:
        the answer and stream of the stored one (None: ``seq`` is this request's question)."""
        entries = await chat.entries(after=seq - 1, last=None)
        meta = entries[0].message.get("meta") if entries and entries[0].seq == seq else None
        if not isinstance(meta, dict) or meta.get("answer") == answer:
            return None
        return {"answer": str(meta.get("answer")), "stream": str(meta.get("stream"))}

    async def _drop_answer(self, answer: str, path: str) -> None:
        """Forget an answer whose question was not stored: its records, and its stream closed as a
        recoverer closes one (a reader of it ends at once)."""
        registry = self.memory(REGISTRY_NAMESPACE)
        with contextlib.suppress(errors.BotWireError):
            await registry.delete(f"answer:{answer}")
        with contextlib.suppress(errors.BotWireError):
            await registry.delete(f"lease:{answer}")
        with contextlib.suppress(errors.BotWireError):
            await self.store.append(path, b"", close=True, producer=(answer, 1, 0))

    # -- producing ----------------------------------------------------------------------------------
    async def _renew(self, answer: str) -> None:
        registry = self.memory(REGISTRY_NAMESPACE)
        while True:
            _stop_if_cancelled()
            await asyncio.sleep(self.lease_ttl / 4)
            with contextlib.suppress(errors.BotWireError):
                await registry.set(f"lease:{answer}", self.owner, ttl=self.lease_ttl)

    async def _produce(self, ns: str, session: str, answer: str, path: str, history: list[dict[str, str]]) -> None:
        renew = asyncio.ensure_future(self._renew(answer))
        producer = Producer(self.store, path, answer, self.flush_interval)
        failure: str | None = None
        try:
            try:
                async for piece in self.model.stream(history):
                    if piece:
                        producer.add(piece)
            except (errors.ProducerFenced, errors.StreamClosed):
                raise
            except Exception as exc:  # the model failed: keep what it said, marked incomplete
                log.warning("the model failed on answer %s: %r", answer, exc)
                failure = f"the model failed: {type(exc).__name__}"
                # noted on the answer's record before its stream is closed: should this process
                # stop before storing it, the one that recovers the closed stream marks it too
                with contextlib.suppress(_Taken):
                    await self.memory(REGISTRY_NAMESPACE).update(f"answer:{answer}", _noting(failure))
            await producer.finish()
            meta: dict[str, Any] = {"answer": answer, "stream": path}
            if failure:
                meta.update(incomplete=True, error=failure)
            await self._conclude(ns, session, answer, "".join(producer.text), meta)
        except (errors.ProducerFenced, errors.StreamClosed):
            log.warning("answer %s was closed by another process (its lease had expired)", answer)
        except errors.BotWireError as exc:
            log.warning("answer %s: %r (its lease will expire and another process closes it)", answer, exc)
        finally:
            producer.cancel()
            renew.cancel()
            self._tasks.pop(answer, None)

    async def _conclude(self, ns: str, session: str, answer: str, content: str, meta: dict[str, Any]) -> bool:
        """Store a closed answer into the conversation, unless another process claimed it first.

        The producer takes the same claim as ``recover`` (a compare-and-set on ``answer:``): a
        producer stalled past its lease between closing its stream and this append would otherwise
        store a second copy after the process that recovered it (False then)."""
        registry = self.memory(REGISTRY_NAMESPACE)
        try:
            await registry.update(f"answer:{answer}", self._claim(time.time()))
        except _Taken:
            log.warning("answer %s was stored by another process (its lease had expired)", answer)
            return False
        await self._store_answer(ns, session, content, meta)
        await registry.delete(f"answer:{answer}")
        await registry.delete(f"lease:{answer}")
        return True

    def _claim(self, now: float) -> Any:
        """The compare-and-set that makes one process the one to store an answer."""

        def claim(value: Any) -> Any:
            if not isinstance(value, dict):
                raise _Taken
            claimed = value.get("recovering")
            if isinstance(claimed, dict) and now - float(claimed.get("at", 0)) < self.claim_stale:
                raise _Taken
            return {**value, "recovering": {"by": self.owner, "at": now}}

        return claim

    async def _store_answer(self, ns: str, session: str, content: str, meta: dict[str, Any]) -> None:
        """The answer into the conversation; one larger than a message can be is cut (halved until
        it fits, ``meta.truncated``): the whole text stays in its stream."""
        chat = self.chat(ns, session)
        try:
            for _ in range(40):
                try:
                    await chat.append({"role": "assistant", "content": content, "meta": meta})
                    return
                except errors.ValueTooLarge:
                    content = content[: len(content) // 2]
                    meta = {**meta, "truncated": True}
        finally:
            await chat.close()

    # -- leases -------------------------------------------------------------------------------------
    async def _watch_leases(self) -> None:
        registry = self.memory(REGISTRY_NAMESPACE)
        while True:
            try:
                for key in await registry.list_keys("answer:*"):
                    answer = key[len("answer:") :]
                    if answer in self._tasks:
                        continue
                    if await registry.get(f"lease:{answer}") is None:
                        await self.recover(answer)
            except Exception as exc:  # the watcher must outlive any one bad record or outage
                log.warning("lease check failed: %r", exc)
            _stop_if_cancelled()
            await asyncio.sleep(self.lease_ttl / 4)

    async def recover(self, answer: str) -> bool:
        """Close an answer whose producer is gone; False when another process does (or did) it."""
        registry = self.memory(REGISTRY_NAMESPACE)
        try:
            record = await registry.update(f"answer:{answer}", self._claim(time.time()))
        except _Taken:
            return False
        ns, session, path = record["ns"], record["session"], record["stream"]
        complete = False
        try:
            await self.store.append(path, b"", close=True, producer=(answer, 1, 0))
        except errors.StreamClosed:
            # its producer closed it, then stopped before the conversation append. (A recoverer
            # that closed it and stopped leaves no StreamClosed: every recoverer closes as the
            # same producer, (answer, 1, 0), and a repeated close is a duplicate, not an error.)
            complete = True
        except errors.StreamNotFound:
            await registry.delete(f"answer:{answer}")
            return True
        got = await self.store.read(path, "-1", max_bytes=1 << 30)
        chat = self.chat(ns, session)
        try:
            recent = await chat.entries(last=_HISTORY)
            mine = [e.message for e in recent if (e.message.get("meta") or {}).get("answer") == answer]
            if not mine and len(recent) >= _HISTORY:  # its question is older than these: read it all (rare)
                mine = [e.message for e in await chat.entries() if (e.message.get("meta") or {}).get("answer") == answer]
            # a process stopped between registering the answer and storing its question: the client
            # got no 202, so no answer is stored (the stream is closed above: a late producer is fenced)
            asked = any(m.get("role") == "user" for m in mine)
            done = not asked or any(m.get("role") == "assistant" for m in mine)
            if not done:
                meta: dict[str, Any] = {"answer": answer, "stream": path}
                if not complete:
                    meta.update(incomplete=True, error="the process producing this answer stopped")
                elif isinstance(record.get("error"), str):  # the model failed, then its process stopped
                    meta.update(incomplete=True, error=record["error"])
        finally:
            await chat.close()
        if not done:
            await self._store_answer(ns, session, got.data.decode("utf-8", "replace"), meta)
        await registry.delete(f"answer:{answer}")
        log.warning("answer %s: its producer's lease expired; closed it%s", answer, "" if complete else " as incomplete" if asked else " (its question was never stored)")
        return True
