"""Opening a NATS client: fail the first connect fast, never send credentials unverified.

With the embedded server: TLS first, pinned to its own certificate, the token read at every
(re)connect. With any server: a ``tls://`` URL never gets CONNECT in clear, a refused credential
raises ``Unauthorized`` at once, and closes are bounded (a hung peer would hold them for good).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.client import Server

from ..errors import InvalidArgument, ServerNotTrusted, ServerUnavailable, Unauthorized
from ..settings import redact
from . import embedded
from .errors import translate

__all__ = ["ORIGIN", "CONNECT_TIMEOUT", "origin_headers"]

ORIGIN = f"{socket.gethostname()}/{os.getpid()}"


def _reset_origin() -> None:
    global ORIGIN
    ORIGIN = f"{socket.gethostname()}/{os.getpid()}"


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_origin)


def origin_headers() -> dict[str, str]:
    """Headers that say who wrote an event (host/pid), for replay and audit."""
    # Header names on the wire (Botwire-Origin here, Botwire-Blob and Botwire-Forked-From in the
    # cores) are stored with the data: they keep this spelling, whatever the brand's spelling in code.
    return {"Botwire-Origin": ORIGIN}


CONNECT_TIMEOUT = 5.0
_closing: set[asyncio.Future[None]] = set()  # old clients still closing in the background


async def _close_soon(nc: NATS, wait: float = 1.0) -> None:
    """Close ``nc``, waiting at most ``wait`` seconds; the rest of the close goes on in the background.

    nats-py's close waits for the TLS transport to close, which never happens when the peer does not
    answer: a SIGSTOP'd server (a `botwire get` took > 100 s), or a client left reconnecting after
    a failed handshake (a new certificate, a stranger on the old port: `Memory.close()` hung for good).
    """
    closing = asyncio.ensure_future(nc.close())
    _closing.add(closing)
    closing.add_done_callback(_closing.discard)
    closing.add_done_callback(lambda f: f.cancelled() or f.exception())
    await asyncio.wait({closing}, timeout=wait)


class _PlainTextRefused(nats.errors.Error):
    """A ``tls://`` server did not set up TLS: the CONNECT (with credentials) was not sent."""


class _Client(NATS):
    """nats-py's client, which never sends CONNECT (and its credentials) in clear to a ``tls://`` URL.

    nats-py 2.16 upgrades to TLS only when the server's INFO says ``tls_required`` (or with
    ``tls_handshake_first``); otherwise it sends CONNECT in clear even for ``tls://``. This check runs
    on every connect and reconnect, just before CONNECT is written.
    """

    def _next_server(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
        """``_next_server`` told which server was just lost: nats-py calls the handler before it
        replaces ``_current_server``."""
        current = self._current_server
        return _next_server(servers, info, current.uri.netloc if current is not None else None)

    def _connect_command(self) -> bytes:
        server = self._current_server
        if (
            server is not None
            and server.uri.scheme == "tls"
            and not (self.options.get("tls_handshake_first") or self._server_info.get("tls_required"))
        ):
            raise _PlainTextRefused(
                f"{redact(server.uri.geturl())} does not offer TLS, so no credentials were sent; "
                "use nats:// to connect without TLS, or enable TLS on the server"
            )
        data: bytes = super()._connect_command()
        return data


class _QuietTlsEof(logging.Filter):
    """Drops asyncio's warning "returning true from eof_received() has no effect when using ssl",
    logged (to stderr when logging is not set up) each time a TLS server closes a nats-py stream
    connection: it says nothing to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("returning true from eof_received()")


logging.getLogger("asyncio").addFilter(_QuietTlsEof())


pinned_context = embedded.pinned_context

# Reconnect backoff to a list of servers: the first try after a loss is immediate, then each full
# round of failed servers doubles the wait (0.1, 0.2, 0.4 s), up to 0.5 s, with jitter so that
# the clients of a server that went away do not all come back in step. A cluster's surviving
# servers take a client within the first round (tests/test_cluster.py kills the client's server:
# its next calls succeed on another); the doubling only spaces out tries while every server is away.
# The cap is low because a call waits for the reconnect within its own timeout: with 2 s, a server
# restarted after a 2 s absence was found up to 2 s later and a 1 s call failed (seen in CI,
# tests/test_errors.py); two tries a second against a server that is away cost it nothing.
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 0.5


# A server that stops answering without closing the connection (SIGSTOP, a frozen VM, a stalled
# link) is noticed only by unanswered pings: nats-py's defaults (every 120 s, gone after 2
# unanswered) left a client on a frozen cluster node for about 4 minutes. Every 2 s (settings'
# BOTWIRE_PING_INTERVAL) with 2 unanswered allowed, a frozen server is left 4-6 s after it froze
# (tests/test_cluster.py). Not on the embedded server: there a PING queued behind hundreds of
# MiB of writes can wait seconds (retry.py), and its calls probe for a hung server instead.
MAX_OUTSTANDING_PINGS = 2


def _next_server(
    servers: list[Server], info: dict[str, Any], lost: str | None = None
) -> tuple[Server | None, float]:
    """nats-py's ``reconnect_to_server_handler``: the server tried least (any of the list, and
    those the cluster advertised), not ``lost`` (the host:port just left) on a tie, and how long to
    wait before trying it.

    Avoiding ``lost`` matters for a frozen server: it still accepts TCP connections (the kernel
    does) but never greets, so trying it again cost the whole 2 s connect timeout."""
    if not servers:
        return None, 0.0
    chosen = min(servers, key=lambda s: (s.reconnects, s.uri.netloc == lost))
    rounds = chosen.reconnects  # every server failed this many times in a row
    if rounds == 0:
        return chosen, 0.0
    wait = min(_BACKOFF_FIRST * 2 ** (rounds - 1), _BACKOFF_MAX)
    return chosen, wait * random.uniform(0.5, 1.0)


async def _connect_embedded(state: embedded.ServerState, timeout: float = CONNECT_TIMEOUT) -> NATS:
    """Connect to the embedded server: TLS first, trusting its own certificate only, and the token
    read from its file at every (re)connect, after the server proved it holds the certificate's key.

    The server gets a new token at each start, so a client that reconnects after a restart
    presents the new one; one that reaches an impostor on the old port sends it nothing.
    """
    home = Path(state.home)
    try:
        context = pinned_context(state.ca_file)
    except (OSError, ssl.SSLError) as exc:  # removed or spoiled since ensure() looked: start again
        raise ServerUnavailable(f"cannot read the embedded server's certificate {state.ca_file}: {exc}") from exc
    last = [embedded.load_token(home) or ""]

    def token() -> str:
        last[0] = embedded.load_token(home) or last[0]
        return last[0]

    return await _connect(
        [state.url], token=token, timeout=timeout, tls=context, tls_handshake_first=True
    )


async def _connect(
    servers: list[str],
    *,
    token: str | Callable[[], str] | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    timeout: float = CONNECT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
    tls_handshake_first: bool = False,
    backoff: bool = False,
    ping_interval: float | None = None,
) -> NATS:
    """Connect, reconnecting forever afterwards, but failing the first connect fast.

    ``backoff``: reconnect to the least tried server of the list (and of those the cluster
    advertises) with an exponential, jittered wait (``_next_server``), rather than nats-py's
    fixed 0.1 s wait per server. ``ping_interval``: seconds between pings, the server counted
    gone after ``MAX_OUTSTANDING_PINGS`` unanswered (None: nats-py's 120 s).

    nats-py retries a first connect forever when reconnects are unlimited, even on a refused
    token; here a refused credential raises ``Unauthorized`` at once, a server that cannot be
    verified (``tls://`` without TLS, a certificate we do not trust) ``ServerNotTrusted`` at once,
    and an unreachable server ``ServerUnavailable`` after ``timeout`` seconds.
    """
    kwargs: dict[str, Any] = {}
    if tls is not None:
        kwargs["tls"] = tls
        kwargs["tls_handshake_first"] = tls_handshake_first
    if token:
        kwargs["token"] = token
    if user:
        kwargs["user"] = user
        kwargs["password"] = password
    if creds:
        kwargs["user_credentials"] = creds
    nc = _Client()
    if backoff:
        kwargs["reconnect_to_server_handler"] = nc._next_server
    if ping_interval is not None:
        kwargs["ping_interval"] = ping_interval
        kwargs["max_outstanding_pings"] = MAX_OUTSTANDING_PINGS
    refused = asyncio.Event()
    last_error: list[BaseException] = []
    untrusted: list[BaseException] = []

    async def on_error(exc: Exception) -> None:  # nats-py would log every reconnect attempt
        last_error[:] = [exc]
        if isinstance(exc, (_PlainTextRefused, ssl.SSLCertVerificationError)):
            untrusted[:] = [exc]
            refused.set()
        elif isinstance(exc, nats.errors.AuthorizationError) or "authorization" in str(exc).lower():
            refused.set()

    connecting = asyncio.ensure_future(
        nc.connect(
            servers=servers,
            connect_timeout=2,
            reconnect_time_wait=0.1,  # type: ignore[arg-type]  # seconds; a float works
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            error_cb=on_error,
            name=f"botwire-stream {ORIGIN}",
            **kwargs,
        )
    )
    watching = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({connecting, watching}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
    if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
        return nc
    connecting.cancel()
    await _close_soon(nc)  # a hung (SIGSTOP'd) server would hold the close (measured: > 100 s)
    where = redact(", ".join(servers))
    if untrusted:
        if isinstance(untrusted[0], _PlainTextRefused):
            raise ServerNotTrusted(str(untrusted[0]))
        raise ServerNotTrusted(
            f"{where} did not present a certificate we trust ({untrusted[0]}), so no credentials were sent"
        )
    if refused.is_set():
        raise Unauthorized(
            f"{where} refused the credentials; check token=/user=/creds= or BOTWIRE_TOKEN/BOTWIRE_CREDS"
        )
    if connecting.done() and not connecting.cancelled() and (failure := connecting.exception()) is not None:
        if creds and not isinstance(failure, (nats.errors.Error, OSError, asyncio.TimeoutError)):
            # nats-py parses the creds file only when the server asks for a signature, and fails
            # with a TypeError or ValueError on a file that holds no user JWT and seed (measured).
            raise InvalidArgument(
                f"the creds file {creds!r} is not a NATS .creds file (a user JWT and its nkey seed): {failure!r}"
            ) from failure
        raise translate(failure)
    detail = f": {redact(str(last_error[0]) or type(last_error[0]).__name__)}" if last_error else ""
    raise ServerUnavailable(f"cannot connect to {where} within {timeout:.0f} s{detail}; is the server running?")
