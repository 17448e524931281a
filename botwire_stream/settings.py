"""Where to connect: ``url=`` argument, else ``BOTWIRE_URL``, else the embedded server.

An explicit ``url=`` that names no server (``""``, ``" "``, ``","``) is an error, as is a
``BOTWIRE_URL`` made only of commas and blanks; an empty or blank ``BOTWIRE_URL`` means unset.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from .errors import InvalidArgument

__all__ = ["SCHEMES", "ConnectArgs", "ConnectOptions", "home_dir", "redact", "resolve"]

# The URL schemes and the transport (``_backend``'s implementation) that serves each.
SCHEMES = {"nats": "nats", "tls": "nats", "ws": "nats", "wss": "nats", "http": "http", "https": "http"}

# After a scheme, everything up to the last "@" before the host (a password may hold spaces or "@":
# nats-py takes them raw); the stops are characters that end a URL's authority or start the text
# around it in our messages ("within 5 s: [Errno ...]", "; is the server running?").
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\[\],]*@|[^/\s,]*@")


class ConnectArgs(TypedDict, total=False):
    """The connection arguments, defined once: every class that connects (``Memory``,
    ``AsyncMemory``, ``ChatHistory``, ``AsyncChatHistory``, ``sessions()``) and ``resolve`` take
    exactly these keywords, each ``str | None = None`` (tests/test_faces.py checks it).

    The classes spell them out rather than taking ``**Unpack[ConnectArgs]``: explicit parameters
    are what an IDE, ``help()`` and the README show a user; this is the list they are checked against.
    """

    url: str | None  # nats://host:port or tls://... (comma-separated: a cluster); None: BOTWIRE_URL, else embedded
    token: str | None  # None: BOTWIRE_TOKEN
    user: str | None
    password: str | None
    creds: str | None  # a NATS credentials file; None: BOTWIRE_CREDS


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

    @property
    def transport(self) -> str:
        """Which backend serves these settings: ``"nats"`` (the embedded server is one too) or
        ``"http"`` (a ``botwire serve`` REST API)."""
        if self.servers is None:
            return "nats"
        return SCHEMES[self.servers[0].split("://", 1)[0].lower()]


def home_dir() -> Path:
    """``BOTWIRE_HOME``, else the platform's user data folder for botwire (the embedded server's)."""
    env = os.environ.get("BOTWIRE_HOME")
    if env:
        # Absolute: the server's command line names its config by this path, and a relative one
        # (`.botwire`) would name another project's server alike.
        return Path(env).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_data_dir("botwire", appauthor=False))


def resolve(
    url: str | None = None,
    *,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
) -> ConnectOptions:
    """Resolve settings in the documented order (arguments, environment, embedded default)."""
    source = "url="
    if url is None:
        source = "BOTWIRE_URL"
        url = os.environ.get("BOTWIRE_URL", "").strip() or None
    elif not isinstance(url, str):
        raise InvalidArgument(f"url= must be a str such as 'nats://host:4222', not {type(url).__name__}")
    token = token or os.environ.get("BOTWIRE_TOKEN") or None
    creds = creds or os.environ.get("BOTWIRE_CREDS") or None
    if creds is not None and not os.path.isfile(creds):
        # nats-py reads it only when the server asks for a signature, and then fails obscurely.
        raise InvalidArgument(f"the creds file {creds!r} (creds= or BOTWIRE_CREDS) is not a file")
    if url is None:
        return ConnectOptions(servers=None, home=str(home_dir()))
    servers = tuple(u.strip() for u in url.split(",") if u.strip())
    if not servers:
        # nats-py would try an empty server list forever, at full CPU and deaf to Ctrl-C.
        raise InvalidArgument(
            f"{source} {url!r} names no server; give nats://host:port (comma-separated for a cluster)"
            + (", or leave url= out for the embedded server" if source == "url=" else ", or unset it")
        )
    for s in servers:
        scheme = s.split("://", 1)[0].lower() if "://" in s else ""
        if scheme not in SCHEMES:
            supported = ", ".join(f"{name}://" for name in SCHEMES)
            raise InvalidArgument(
                f"{redact(s)}: unsupported URL scheme; use nats://host:port, tls://host:port or "
                f"http://host:port (botwire serve) (supported: {supported})"
            )
    if len({SCHEMES[s.split("://", 1)[0].lower()] for s in servers}) > 1 or (
        SCHEMES[servers[0].split("://", 1)[0].lower()] == "http" and len(servers) > 1
    ):
        raise InvalidArgument(
            f"{source} names several servers over HTTP; give one http(s):// URL (a load balancer in front of serve processes)"
        )
    return ConnectOptions(servers=servers, token=token, user=user, password=password, creds=creds)
