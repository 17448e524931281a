"""Where to connect: ``url=`` argument, else ``BOTWIRE_URL``, else the embedded server.

An explicit ``url=`` that names no server (``""``, ``" "``, ``","``) is an error, as is a
``BOTWIRE_URL`` made only of commas and blanks; an empty or blank ``BOTWIRE_URL`` means unset.

Replication of the namespaces this client creates (a NATS URL only): ``?replicas=N`` on the URL
(any server of the list; 1-5), else ``BOTWIRE_REPLICAS``, else 3 on a cluster and 1 on a single
server when the namespace is created (``nats/jetstream.py``); ``?tag=ssd&tag=eu`` (else
``BOTWIRE_PLACEMENT_TAGS``, comma-separated) places them on servers with those tags.

Read consistency on a cluster (a NATS URL only): ``?reads=leader`` (else ``BOTWIRE_READS``) has
every read answered as the stream leader has it, so a read sees every write acknowledged to anyone
before it started (another connection or process included); ``?reads=any`` (the default) lets any
replica answer, which sees this connection's own writes but may miss, for a few ms, another's.

``BOTWIRE_PING_INTERVAL`` (seconds, default 2; a NATS URL only): how often the client pings its
server; after two unanswered pings it counts the server gone (frozen, or the link stalled) and
moves to another of the list (``nats/connect.py``).
"""

from __future__ import annotations

import os
import re
import urllib.parse
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
    replicas: int | None = None  # None: 3 on a cluster, 1 on a single server
    tags: tuple[str, ...] = ()  # placement tags of the streams this client creates
    ping_interval: float = 2.0  # seconds between pings to a NATS server (BOTWIRE_PING_INTERVAL)
    reads: str = "any"  # "leader": reads as the stream leader has them (?reads=, BOTWIRE_READS)

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
    servers, replicas, tags, reads = _placement(servers, source)
    return ConnectOptions(
        servers=servers,
        token=token,
        user=user,
        password=password,
        creds=creds,
        replicas=replicas,
        tags=tags,
        ping_interval=_ping_interval(),
        reads=reads,
    )


def _ping_interval() -> float:
    """``BOTWIRE_PING_INTERVAL`` in seconds (default 2; from 0.1 to 3600)."""
    text = os.environ.get("BOTWIRE_PING_INTERVAL", "").strip()
    if not text:
        return ConnectOptions.ping_interval
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 3600:  # NaN fails too
        raise InvalidArgument(f"BOTWIRE_PING_INTERVAL must be a number of seconds from 0.1 to 3600, not {text!r}")
    return value


_OPTIONS = ("replicas", "tag", "reads")
_READS = ("any", "leader")


def _reads(text: str, where: str) -> str:
    value = text.strip().lower()
    if value not in _READS:
        raise InvalidArgument(f"{where} must be one of {', '.join(_READS)}, not {text!r}")
    return value


def _replicas(text: str, where: str) -> int:
    # ASCII digits only: str.isdigit() also passes "²", which int() then refuses with a ValueError.
    if not (text.strip().isascii() and text.strip().isdigit()) or not 1 <= int(text) <= 5:
        raise InvalidArgument(f"{where} must be an int from 1 to 5, not {text!r}")
    return int(text)


def _placement(
    servers: tuple[str, ...], source: str
) -> tuple[tuple[str, ...], int | None, tuple[str, ...], str]:
    """The servers without their ``?replicas=N&tag=T&reads=R`` options, and the options (URL
    first, then ``BOTWIRE_REPLICAS`` / ``BOTWIRE_PLACEMENT_TAGS`` / ``BOTWIRE_READS``). An unknown
    option is an error: nats-py would pass it on silently."""
    replicas: int | None = None
    tags: list[str] = []
    reads: str | None = None
    plain = []
    for s in servers:
        parts = urllib.parse.urlsplit(s)
        if parts.scheme.lower() in ("http", "https") and {
            name for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        } & set(_OPTIONS):  # kept in the address, it failed every request with an obscure 405
            raise InvalidArgument(
                f"{redact(s)}: " + ", ".join(f"{o}=" for o in _OPTIONS)
                + " apply to a NATS URL; give them on the URL `botwire serve` connects with"
            )
        if parts.scheme.lower() not in ("nats", "tls", "ws", "wss") or not parts.query:
            plain.append(s)
            continue
        for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if name == "replicas":
                replicas = _replicas(value, f"{source} option replicas=")
            elif name == "tag" and value.strip():
                tags.append(value.strip())
            elif name == "reads":
                value = _reads(value, f"{source} option reads=")
                if reads is not None and value != reads:  # else the last server's silently won
                    raise InvalidArgument(f"{source} gives reads={reads} and reads={value}; give one")
                reads = value
            else:
                raise InvalidArgument(
                    f"{redact(s)}: unknown URL option {name!r}; supported: " + ", ".join(f"{o}=" for o in _OPTIONS)
                )
        plain.append(urllib.parse.urlunsplit(parts._replace(query="")))
    env = os.environ.get("BOTWIRE_REPLICAS", "").strip()
    if replicas is None and env:
        replicas = _replicas(env, "BOTWIRE_REPLICAS")
    if not tags:
        tags = [t.strip() for t in os.environ.get("BOTWIRE_PLACEMENT_TAGS", "").split(",") if t.strip()]
    env = os.environ.get("BOTWIRE_READS", "").strip()
    env_reads = _reads(env, "BOTWIRE_READS") if env else "any"  # checked even when the URL has reads=
    if reads is None:
        reads = env_reads
    return tuple(plain), replicas, tuple(tags), reads
