"""``botwire consume ...``: run a consumer, or show every consumer's lag.

``botwire_stream.cli`` hands ``consume`` to this group when it is used (imported then, never by
``botwire --help``). Connection options given to ``botwire`` itself (``--url``...) apply here too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from .runtime import Worker

__all__ = ["consume"]


def _url(ctx: click.Context, url: str | None) -> str | None:
    if url is not None:
        return url
    parent = ctx.find_object(object)
    return getattr(parent, "url", None)


def _namespaces(ctx: click.Context, given: tuple[str, ...]) -> list[str]:
    if given:
        return list(given)
    parent = ctx.find_object(object)
    resolve = getattr(parent, "resolved_namespace", None)
    return [resolve() if resolve else "default"]


def _go(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


_url_option = click.option("--url", metavar="URL", default=None, help="nats:// server (default: as for botwire).")
_F = TypeVar("_F", bound=Callable[..., Any])


def _worker_options(*, one_namespace: bool = False) -> Callable[[_F], _F]:
    """The options every worker command takes: --url, --namespace/-n (one, passed as
    ``namespace``, or repeatable, passed as ``namespaces``), --name and --batch."""
    if one_namespace:
        ns = click.option(
            "--namespace", "-n", "namespace", metavar="NAME", default=None, help="The namespace to materialise."
        )
    else:
        ns = click.option(
            "--namespace",
            "-n",
            "namespaces",
            multiple=True,
            metavar="NAME",
            help="Namespace (repeatable where it makes sense).",
        )
    name = click.option("--name", default=None, help="Consumer id, to run several of one kind (botwire-KIND-NAME).")
    batch = click.option(
        "--batch", default=None, type=click.IntRange(min=1), help="Events fetched at once (default: the consumer's own)."
    )

    def apply(f: _F) -> _F:
        return _url_option(ns(name(batch(f))))

    return apply


@click.group(name="consume")
def consume() -> None:
    """Long-running consumers on durable JetStream consumers (stop with SIGTERM or Ctrl-C).

    \b
      botwire consume materialise -n chats
      botwire consume compact -n chats --summarise mymodule:summarise --max-messages 200 --keep 20
      botwire consume audit -n chats -n app --dir ./audit --gzip
      botwire consume webhook -n app --match 'user:*' --to http://127.0.0.1:9000/hook --secret-file s
      botwire consume status [--json]
    """


def _start(ctx: click.Context, worker: Worker, url: str | None, batch: int | None) -> None:
    from .runtime import run

    if batch is not None:
        worker.batch = batch
    _go(run(worker, _url(ctx, url)))


@consume.command()
@_worker_options(one_namespace=True)
@click.pass_context
def materialise(
    ctx: click.Context, url: str | None, namespace: str | None, name: str | None, batch: int | None
) -> None:
    """Keep each conversation of a namespace as contiguous chunks, with a summary."""
    from .materialiser import Materialiser

    _start(ctx, Materialiser(_namespaces(ctx, (namespace,) if namespace else ())[0], name=name), url, batch)


@consume.command()
@_worker_options()
@click.option(
    "--summarise",
    "summariser",
    required=True,
    metavar="MODULE:FUNCTION",
    help="Called with the messages to summarise (sync or async); returns the summary text (or a message).",
)
@click.option(
    "--max-messages",
    default=100,
    show_default=True,
    type=click.IntRange(min=0),
    help="Summarise once more messages than this follow the last summary.",
)
@click.option(
    "--max-bytes", default=None, type=click.IntRange(min=0), help="...or once they encode to more bytes than this."
)
@click.option(
    "--keep", default=0, show_default=True, type=click.IntRange(min=0), help="The newest messages left unsummarised."
)
@click.pass_context
def compact(
    ctx: click.Context,
    url: str | None,
    namespaces: tuple[str, ...],
    name: str | None,
    batch: int | None,
    summariser: str,
    max_messages: int,
    max_bytes: int | None,
    keep: int,
) -> None:
    """Summarise each conversation grown past a size since its last summary (AsyncChatHistory.compact)."""
    from botwire_stream.errors import InvalidArgument

    from .compactor import Compactor, load_summariser

    try:
        fn = load_summariser(summariser)
    except InvalidArgument as exc:
        raise click.UsageError(str(exc)) from exc
    resolved = _url(ctx, url)
    worker = Compactor(
        _namespaces(ctx, namespaces),
        fn,
        max_messages=max_messages,
        max_bytes=max_bytes,
        keep=keep,
        url=resolved,
        name=name,
    )
    _start(ctx, worker, resolved, batch)


@consume.command()
@_worker_options()
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False), help="Where the files go.")
@click.option("--gzip", "compress", is_flag=True, help="Compress each file once it is rotated (.jsonl.gz).")
@click.option("--rotate-bytes", default=64 * 1024 * 1024, show_default=True, type=click.IntRange(min=1024))
@click.option(
    "--progress/--no-progress", default=None, help="A progress bar while catching up (default: on a terminal)."
)
@click.pass_context
def audit(
    ctx: click.Context,
    url: str | None,
    namespaces: tuple[str, ...],
    name: str | None,
    directory: str,
    compress: bool,
    rotate_bytes: int,
    batch: int | None,
    progress: bool | None,
) -> None:
    """Write every event (keys and conversations) of the namespaces to JSON Lines files."""
    from .audit import Audit

    worker = Audit(
        _namespaces(ctx, namespaces),
        directory,
        name=name,
        compress=compress,
        rotate_bytes=rotate_bytes,
        progress=progress,
    )
    _start(ctx, worker, url, batch)


@consume.command()
@_worker_options()
@click.option("--match", "pattern", default="*", show_default=True, help="Key or conversation glob.")
@click.option("--to", "target", required=True, help="The URL events are POSTed to.")
@click.option("--secret-file", type=click.Path(dir_okay=False, exists=True), required=True, help="HMAC-SHA256 key.")
@click.option(
    "--attempts", default=5, show_default=True, type=click.IntRange(min=1), help="Tries before dead-lettering."
)
@click.option(
    "--backoff",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0),
    help="First retry delay (s), doubled each time.",
)
@click.pass_context
def webhook(
    ctx: click.Context,
    url: str | None,
    namespaces: tuple[str, ...],
    name: str | None,
    batch: int | None,
    pattern: str,
    target: str,
    secret_file: str,
    attempts: int,
    backoff: float,
) -> None:
    """POST changes matching a glob to a URL, signed; failed ones go to a dead-letter subject."""
    from .webhook import Webhook

    with open(secret_file, "rb") as f:
        secret = f.read().strip()
    if not secret:
        raise click.UsageError(f"--secret-file {secret_file} is empty")
    worker = Webhook(
        _namespaces(ctx, namespaces), pattern, target, secret, name=name, attempts=attempts, backoff=backoff
    )
    _start(ctx, worker, url, batch)


@consume.command(name="status")
@_url_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@click.pass_context
def status_(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """Every consumer's lag: events pending, the ack floor, the last activity."""
    from .runtime import status

    parent = ctx.find_object(object)
    as_json = as_json or bool(getattr(parent, "json", False))
    found = asyncio.run(status(_url(ctx, url)))
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": s.name,
                        "stream": s.stream,
                        "pending": s.pending,
                        "ack_pending": s.ack_pending,
                        "ack_floor": s.ack_floor,
                        "stream_last": s.stream_last,
                        "last_active": s.last_active.isoformat() if s.last_active else None,
                    }
                    for s in found
                ]
            )
        )
        return
    rows = [("CONSUMER", "STREAM", "PENDING", "UNACKED", "ACK FLOOR", "LAST SEQ", "LAST ACTIVE")]
    now = datetime.now(UTC)
    for s in found:
        ago = f"{(now - s.last_active).total_seconds():.0f}s ago" if s.last_active else "never"
        rows.append((s.name, s.stream, str(s.pending), str(s.ack_pending), str(s.ack_floor), str(s.stream_last), ago))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
