"""Where to connect: ``url=`` argument, else ``BOTWIRE_URL``, else the embedded server."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import BotWireError


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?[^/\s,]*@")


def redact(url: str) -> str:
    """``url`` with any ``user:password@`` (or ``token@``) replaced by ``***@``, for messages."""
    return _USERINFO.sub(lambda m: (m.group("scheme") or "") + "***@", url)


@dataclass(frozen=True)
class ConnectOptions:
    """Resolved connection settings; hashable so that one connection serves equal settings."""

    servers: tuple[str, ...] | None  # None: the embedded server of ``home``
    home: str | None = None
    token: str | None = None
    user: str | None = None
    password: str | None = None
    creds: str | None = None

    @property
    def embedded(self) -> bool:
        return self.servers is None


def resolve(
    url: str | None = None,
    *,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
) -> ConnectOptions:
    """Resolve settings in the documented order (arguments, environment, embedded default)."""
    url = url or os.environ.get("BOTWIRE_URL") or None
    token = token or os.environ.get("BOTWIRE_TOKEN") or None
    creds = creds or os.environ.get("BOTWIRE_CREDS") or None
    if url is None:
        from .embedded import home_dir

        return ConnectOptions(servers=None, home=str(home_dir()))
    servers = tuple(u.strip() for u in url.split(",") if u.strip())
    for s in servers:
        scheme = s.split("://", 1)[0].lower() if "://" in s else ""
        if scheme in ("http", "https"):
            raise BotWireError(
                f"{redact(s)}: the HTTP transport (a botwire HTTP server) is not available in this version; "
                "use a nats:// or tls:// URL"
            )
        if scheme not in ("nats", "tls", "ws", "wss"):
            raise BotWireError(f"{redact(s)}: unsupported URL scheme; use nats://host:port or tls://host:port")
    return ConnectOptions(servers=servers, token=token, user=user, password=password, creds=creds)
