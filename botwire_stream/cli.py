"""The ``botwire`` command line: read, write and watch a namespace, and manage the embedded server.

Every data command takes ``--namespace/-n``, ``--url``, ``--token-file``, ``--creds`` and ``--json``,
before or after the command name. Exit codes: 0 success, 1 "not found" (missing key, no server
running), 2 errors (``error: ...`` on stderr, and click's usage errors), 130 interrupted by Ctrl-C.
The heavy modules (nats, msgspec) are imported inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from .errors import BotWireError

if TYPE_CHECKING:
    from .models import Change, Revision
    from .sync import Memory

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "BotWireGroup",
    "Failure",
    "Options",
    "cli",
    "main",
    "parse_duration",
    "parse_value",
]

EXIT_NOT_FOUND = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass
class Options:
    """Connection and output options, collected from the group and the command (the command wins)."""

    namespace: str | None = None
    url: str | None = None
    token: str | None = None
    token_file: str | None = None
    creds: str | None = None
    json: bool = False

    def resolved_namespace(self) -> str:
        return self.namespace or os.environ.get("BOTWIRE_NAMESPACE") or "default"

    def resolved_token(self) -> str | None:
        """``--token-file``'s content (stripped), else ``--token``; None: ``BOTWIRE_TOKEN`` applies."""
        if self.token_file is not None:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise Failure(f"--token-file {self.token_file}: cannot read it ({exc})") from exc
            if not token:
                raise Failure(f"--token-file {self.token_file} is empty")
            return token
        return self.token


class Failure(click.ClickException):
    """An error reported as one ``error: ...`` line on stderr, exit code 2."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class BotWireGroup(click.Group):
    """The root group: turns library errors into ``error: ...`` lines instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BotWireError as exc:
            raise Failure(str(exc)) from exc
        except BrokenPipeError:
            _silence_stdout()  # e.g. `botwire watch | head -n 3`: the reader left, stop quietly
            raise click.exceptions.Exit(141) from None
        except OSError as exc:
            raise Failure(str(exc)) from exc
        except KeyboardInterrupt:
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "consume":  # the consumers package, imported only when it is used
            from consumers.cli import consume

            return consume
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "consume"})

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        # `botwire keys create|list|revoke ...` manages API keys; `botwire keys [PATTERN]` lists
        # memory keys as before (a pattern spelled like a subcommand: `botwire keys '[l]ist'`).
        name, cmd, rest = super().resolve_command(ctx, args)
        if name == "keys" and rest and rest[0] in api_keys.commands:
            return name, api_keys, rest
        return name, cmd, rest


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (e.g. a test runner's buffer)


def _options(ctx: click.Context) -> Options:
    obj = ctx.find_object(Options)
    if obj is None:
        obj = ctx.find_root().ensure_object(Options)
    return obj


def _store(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    # Options given at any level land in one Options; a later (command-level) value overrides.
    if value is None or value is False:
        return
    assert param.name is not None
    setattr(_options(ctx), param.name, value)


def _store_token(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is not None:
        click.echo(
            "warning: --token is visible to every local user in the process list; "
            "use BOTWIRE_TOKEN or --token-file instead",
            err=True,
        )
    _store(ctx, param, value)


_json_option = click.option(
    "--json",
    "json",
    is_flag=True,
    default=False,
    expose_value=False,
    callback=_store,
    help="Machine-readable output: one JSON document (watch: one JSON object per line).",
)


def _connection_options(f: F) -> F:
    options = [
        click.option(
            "--namespace",
            "-n",
            "namespace",
            metavar="NAME",
            expose_value=False,
            callback=_store,
            help="Namespace (1-64 of A-Z a-z 0-9 _ -). Default: $BOTWIRE_NAMESPACE, else 'default'.",
        ),
        click.option(
            "--url",
            "url",
            metavar="URL",
            expose_value=False,
            callback=_store,
            help="nats:// or tls:// server (comma-separated for a cluster). "
            "Default: $BOTWIRE_URL, else the embedded local server.",
        ),
        click.option(
            "--token-file",
            "token_file",
            metavar="FILE",
            expose_value=False,
            callback=_store,
            help="File holding the auth token. Default: $BOTWIRE_TOKEN.",
        ),
        click.option(
            "--token",
            "token",
            metavar="TOKEN",
            expose_value=False,
            callback=_store_token,
            help="Deprecated: every local user sees it in the process list; use $BOTWIRE_TOKEN or --token-file.",
        ),
        click.option(
            "--creds",
            "creds",
            metavar="FILE",
            expose_value=False,
            callback=_store,
            help="NATS credentials file. Default: $BOTWIRE_CREDS.",
        ),
        _json_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _call(opts: Options, body: Callable[[], T]) -> T:
    """``_run`` without a ``Memory``: opening one creates the namespace's bucket, and replay,
    restore and retention must create nothing in a namespace they only read (or refuse)."""
    return _run(opts, lambda _: body(), open_memory=False)


def _run(opts: Options, body: Callable[[Memory], T], *, open_memory: bool = True) -> T:
    """Run ``body(memory)`` on a worker thread with the ``Memory`` the options name.

    The main thread only waits, so Ctrl-C interrupts that wait and never lands inside a call to
    the event loop thread (which could leave a half-cancelled call behind). On Ctrl-C the memory
    is closed, which also ends a pending ``watch``, and the command exits with code 130.
    """
    from .sync import Memory

    box: dict[str, Any] = {}
    stopping = threading.Event()

    def work() -> None:
        try:
            if not open_memory:
                box["result"] = body(None)  # type: ignore[arg-type]  # only through _call
                return
            mem = Memory(opts.resolved_namespace(), url=opts.url, token=opts.resolved_token(), creds=opts.creds)
            box["memory"] = mem
            try:
                box["result"] = body(mem)
            finally:
                mem.close()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            if not stopping.is_set():
                box["error"] = exc

    worker = threading.Thread(target=work, name="botwire-cli", daemon=True)
    worker.start()
    try:
        worker.join()
    except KeyboardInterrupt:
        stopping.set()
        memory = box.get("memory")
        if memory is not None:
            memory.close()
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


# -- output -------------------------------------------------------------------------------------
def _json(value: Any) -> str:
    """Compact JSON on one line (values, revisions and changes alike)."""
    import msgspec

    return msgspec.json.encode(value).decode()


def _pretty(value: Any) -> str:
    """A value for people: strings as they are, anything else as indented JSON."""
    if isinstance(value, str):
        return value
    import msgspec

    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def _not_found(message: str) -> NoReturn:
    click.echo(message, err=True)
    raise click.exceptions.Exit(EXIT_NOT_FOUND)


def _change_line(change: Change) -> str:
    line = f"{change.time.isoformat(timespec='milliseconds')} {change.op:<6} {change.key}"
    return line + (f" = {_json(change.value)}" if change.op == "set" else "")


def _revision_line(rev: Revision) -> str:
    line = f"{rev.revision:>8}  {rev.time.isoformat(timespec='milliseconds')}  {rev.op:<6}"
    return line + (f"  {_json(rev.value)}" if rev.op == "set" else "")


# -- value parsing ------------------------------------------------------------------------------
def parse_duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """``--ttl``: seconds as a number (``90``, ``1.5``) or with a unit: ``30s``, ``5m``, ``2h``, ``1d``."""
    if value is None:
        return None
    text = value.strip().lower()
    scale = 1.0
    if text and text[-1] in _UNITS:
        scale, text = _UNITS[text[-1]], text[:-1]
    try:
        return float(text) * scale
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration: use seconds (90, 1.5) or 30s, 5m, 2h, 1d") from None


def parse_value(text: str, *, force_string: bool) -> Any:
    """VALUE as JSON when it is valid JSON, else (or with ``--string``) the string itself."""
    if force_string:
        return text
    import msgspec

    try:
        return msgspec.json.decode(text)
    except RecursionError:  # valid JSON, but deeper than Python can hold (and than set stores)
        raise Failure("VALUE is JSON nested too deeply to store; flatten it, or store it as text (--string)") from None
    except msgspec.DecodeError:
        if text.lstrip()[:1] in ("{", "[", '"'):
            click.echo("note: VALUE is not valid JSON, so it is stored as a string (--string silences this)", err=True)
        return text


def _utf8(raw: bytes, where: str) -> str:
    """``raw`` as text; ``Failure`` (exit 2) when it is not UTF-8, as values are JSON or UTF-8 text."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Failure(
            f"{where} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
            "values are JSON or UTF-8 strings: encode binary data first (e.g. base64)"
        ) from None


# -- commands -----------------------------------------------------------------------------------
def _version() -> str:
    from . import __version__

    return __version__


@click.group(cls=BotWireGroup, context_settings={"help_option_names": ["-h", "--help"]})
@_connection_options
@click.version_option(_version(), "--version", "-V", prog_name="botwire")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Read, write and watch botwire-stream memory from the shell.

    \b
      botwire set user:42:name '"Ada"'          # VALUE is JSON when it parses...
      botwire set greeting hello --ttl 1h       # ...else a string; --ttl: 90, 30s, 5m, 2h, 1d
      botwire get user:42:name
      botwire keys 'user:*' --json
      botwire watch 'user:*'                    # one line per change, until Ctrl-C
      botwire nats status --json                # the embedded local nats-server

    Exit codes: 0 ok, 1 not found, 2 error, 130 interrupted.
    """
    ctx.ensure_object(Options)


@cli.command()
@click.argument("key")
@_connection_options
@click.pass_obj
def get(opts: Options, key: str) -> None:
    """Print the value of KEY (exit 1 when missing or expired)."""
    missing = object()
    value = _run(opts, lambda memory: memory.get(key, missing))
    if value is missing:
        _not_found(f"key {key!r} not found in namespace {opts.resolved_namespace()!r}")
    click.echo(_json(value) if opts.json else _pretty(value))


@cli.command(name="set")
@click.argument("key")
@click.argument("value")
@click.option(
    "--ttl",
    metavar="SECONDS",
    callback=parse_duration,
    default=None,
    help="Expire after this long: 90, 1.5, 30s, 5m, 2h, 1d.",
)
@click.option("--string", "force_string", is_flag=True, help="Store VALUE as a string even if it is valid JSON.")
@_connection_options
@click.pass_obj
def set_(opts: Options, key: str, value: str, ttl: float | None, force_string: bool) -> None:
    """Store VALUE (JSON, else a string) under KEY.

    VALUE is parsed as JSON when it is valid JSON (42, true, null, {"a": 1}, '"quoted"'), else
    stored as the string itself. VALUE '-' reads it from stdin (one trailing newline dropped).
    """
    if value == "-":
        value = _utf8(sys.stdin.buffer.read(), "stdin")
        value = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
    else:  # a non-UTF-8 argument arrives with its bad bytes as lone surrogates (surrogateescape)
        _utf8(value.encode("utf-8", "surrogateescape"), "VALUE")
    data = parse_value(value, force_string=force_string)

    def write(memory: Memory) -> int:
        try:
            return memory.set(key, data, ttl=ttl)
        except TypeError as exc:
            raise Failure(str(exc)) from exc

    revision = _run(opts, write)
    if opts.json:
        click.echo(_json({"namespace": opts.resolved_namespace(), "key": key, "revision": revision, "ttl": ttl}))
    else:
        expiry = f", expires in {ttl:g} s" if ttl is not None else ""
        click.echo(f"stored {key!r} (revision {revision}{expiry})")


@cli.command(name="del")
@click.argument("key")
@_connection_options
@click.pass_obj
def delete(opts: Options, key: str) -> None:
    """Delete KEY (exit 1 when it did not exist)."""
    existed = _run(opts, lambda memory: memory.delete(key))
    if opts.json:
        click.echo(_json({"namespace": opts.resolved_namespace(), "key": key, "deleted": existed}))
        if not existed:
            raise click.exceptions.Exit(EXIT_NOT_FOUND)
    elif existed:
        click.echo(f"deleted {key!r}")
    else:
        _not_found(f"key {key!r} not found in namespace {opts.resolved_namespace()!r}")


@cli.command()
@click.argument("pattern", default="*")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="List at most N keys (a page).")
@click.option("--after", metavar="KEY", default=None, help="List only the keys sorted after KEY (the last of the previous page).")
@_connection_options
@click.pass_obj
def keys(opts: Options, pattern: str, limit: int | None, after: str | None) -> None:
    """List the keys matching PATTERN, sorted (API keys: `botwire keys create|list|revoke`).

    PATTERN is a glob (default '*'): '*' matches any run of characters, ':' included; '?' one
    character; [...] a set. Page a long listing with --limit N, then --after LAST-KEY.
    """
    found = _run(opts, lambda memory: memory.list_keys(pattern, limit=limit, after=after))
    if opts.json:
        click.echo(_json(found))
    else:
        for key in found:
            click.echo(key)


@cli.command()
@click.argument("key")
@_connection_options
@click.pass_obj
def revisions(opts: Options, key: str) -> None:
    """Print the audit trail of KEY, oldest first.

    One line per revision: revision, time, op (set, delete, expire) and value. Exit 1 when the
    key has none.
    """
    trail = _run(opts, lambda memory: memory.revisions(key))
    if opts.json:
        click.echo(_json(trail))
    else:
        for rev in trail:
            click.echo(_revision_line(rev))
    if not trail:
        _not_found(f"key {key!r} has no revisions in namespace {opts.resolved_namespace()!r}")


@cli.command()
@click.argument("pattern", default="*")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after N changes.")
@_connection_options
@click.pass_obj
def watch(opts: Options, pattern: str, count: int | None) -> None:
    """Print live changes of the keys matching PATTERN, until Ctrl-C.

    Changes by any process are printed one per line. A line reads `TIME OP KEY = VALUE` (OP: set,
    delete, expire); with --json each line is an object with key, op, value, revision and time.
    """

    def follow(memory: Memory) -> None:
        seen = 0
        with memory.watch(pattern) as changes:
            click.echo(f"watching {pattern!r} in namespace {memory.namespace!r} (Ctrl-C to stop)", err=True)
            for change in changes:
                click.echo(_json(change) if opts.json else _change_line(change))
                seen += 1
                if count is not None and seen >= count:
                    return
        raise Failure("the watch ended because the connection closed")

    _run(opts, follow)


# -- replay, history, restore, retention (issue 10) ----------------------------------------------
def _bound(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """``--from``/``--to``: a sequence (digits), ISO-8601, ``now``, or relative (``-15m``)."""
    if value is None:
        return None
    if value.strip().isdigit():
        return int(value)
    from .audit import parse_when

    try:
        return parse_when(value)
    except BotWireError as exc:
        raise click.BadParameter(str(exc)) from None


def _when(ctx: click.Context, param: click.Parameter, value: str) -> Any:
    """``--at``: a time only (ISO-8601, ``now``, ``-15m``)."""
    if value.strip().isdigit():
        raise click.BadParameter(f"{value!r} is a sequence; --at takes a time: ISO-8601, 'now', or -15m / -2h / -1d")
    return _bound(ctx, param, value)


def _event_line(e: Any) -> str:
    line = f"{e.time.isoformat(timespec='milliseconds')} {e.source:<6} {e.seq:>6} {e.kind:<7} {e.key}"
    if e.value is not None:
        line += f" = {_json(e.value)}"
    return line + f"  ({e.origin or 'server'})"


def _in(opts: Options, namespace: str) -> Options:
    """``opts`` for the namespace named as an argument."""
    from dataclasses import replace

    return replace(opts, namespace=namespace)


@cli.command(name="replay")
@click.argument("namespace_arg", metavar="NS")
@click.option("--from", "start", metavar="WHEN", callback=_bound, help="First event: SEQ, ISO-8601 time, or -15m / -2h / -1d.")
@click.option("--to", "end", metavar="WHEN", callback=_bound, help="Last event (inclusive): as --from.")
@click.option("--key", "key_glob", metavar="GLOB", default=None, help="Only the keys matching GLOB (and no conversation unless --conversation).")
@click.option("--conversation", "conversation_glob", metavar="GLOB", default=None, help="Only the conversations matching GLOB.")
@_connection_options
@click.pass_obj
def replay_cmd(
    opts: Options, namespace_arg: str, start: Any, end: Any, key_glob: str | None, conversation_glob: str | None
) -> None:
    """Print every kept event of namespace NS in order: time, log, sequence, kind, key, value, origin.

    Kinds: set, delete, purge, expire (keys); append, clear, expire, summary (conversations).
    A sequence bound (--from 120) needs --key or --conversation (each log has its own sequences).
    With --json, one object per line.
    """
    from .sync import replay

    opts = _in(opts, namespace_arg)
    keys_glob = key_glob if key_glob is not None or conversation_glob is None else None
    chats_glob = conversation_glob if conversation_glob is not None or key_glob is None else None
    if key_glob is None and conversation_glob is None:
        keys_glob, chats_glob = "*", "*"

    def body() -> None:
        with replay(
            namespace_arg, start=start, end=end, keys=keys_glob, conversations=chats_glob,
            url=opts.url, token=opts.resolved_token(), creds=opts.creds,
        ) as events:
            for e in events:
                click.echo(_json(e) if opts.json else _event_line(e))

    _call(opts, body)


@cli.command(name="history")
@click.argument("namespace_arg", metavar="NS")
@click.argument("key")
@_connection_options
@click.pass_obj
def history_cmd(opts: Options, namespace_arg: str, key: str) -> None:
    """Print the kept revisions of KEY in namespace NS: revision, time, kind, origin, value.

    Exit 1 when the key has none.
    """
    from .keys import glob_escape

    opts = _in(opts, namespace_arg)

    from .sync import replay

    def body() -> list[Any]:
        with replay(
            namespace_arg, keys=glob_escape(key), conversations=None, url=opts.url,
            token=opts.resolved_token(), creds=opts.creds,
        ) as events:
            return list(events)

    found = _call(opts, body)
    for e in found:
        if opts.json:
            click.echo(_json(e))
        else:
            value = f"  {_json(e.value)}" if e.value is not None else ""
            click.echo(f"{e.seq:>8}  {e.time.isoformat(timespec='milliseconds')}  {e.kind:<7} {e.origin or 'server'}{value}")
    if not found:
        _not_found(f"key {key!r} has no kept revisions in namespace {namespace_arg!r}")


@cli.command(name="restore")
@click.argument("namespace_arg", metavar="NS")
@click.option("--at", "at", metavar="WHEN", required=True, callback=_when, help="The moment: ISO-8601, 'now', or -15m / -2h / -1d.")
@click.option("--into", "into", metavar="NS2", required=True, help="The new namespace to write NS as of --at into.")
@click.option("--overwrite", is_flag=True, help="Write into NS2 even when it holds events already.")
@_connection_options
@click.pass_obj
def restore_cmd(opts: Options, namespace_arg: str, at: Any, into: str, overwrite: bool) -> None:
    """Write namespace NS as it was at --at into the new namespace NS2 (point-in-time recovery)."""
    from .sync import restore

    opts = _in(opts, namespace_arg)

    def body() -> Any:
        return restore(
            namespace_arg, at=at, into=into, overwrite=overwrite, url=opts.url, token=opts.resolved_token(),
            creds=opts.creds,
        )

    report = _call(opts, body)
    if opts.json:
        click.echo(_json(report))
    else:
        click.echo(
            f"restored {namespace_arg!r} as of {at.isoformat(timespec='milliseconds')} into {into!r}: "
            f"{report.keys} keys, {report.conversations} conversations, {report.messages} messages"
        )


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@cli.command(name="retention")
@click.argument("namespace_arg", metavar="NS")
@click.option("--key-history", type=int, default=None, help="Revisions kept per key (1-64).")
@click.option("--log-messages", type=int, default=None, help="Messages kept per conversation (0: all).")
@click.option("--log-age", metavar="DURATION", callback=parse_duration, default=None, help="How long messages are kept: 30d, 12h... (0: for ever).")
@_connection_options
@click.pass_obj
def retention_cmd(
    opts: Options, namespace_arg: str, key_history: int | None, log_messages: int | None, log_age: float | None
) -> None:
    """Show (and with options, set) what namespace NS keeps, hence what replay can reach."""
    from .sync import retention

    opts = _in(opts, namespace_arg)

    def body() -> Any:
        return retention(
            namespace_arg, key_history=key_history, log_messages=log_messages, log_age=log_age, url=opts.url,
            token=opts.resolved_token(), creds=opts.creds,
        )

    state = _call(opts, body)
    if opts.json:
        click.echo(_json(state))
        return
    click.echo(f"{'key history:':<18}{state.key_history} revisions per key")
    click.echo(f"{'log messages:':<18}{state.log_messages or 'all'} per conversation")
    click.echo(f"{'log age:':<18}{'for ever' if state.log_age is None else _age(state.log_age)}")
    for name, t in (("oldest key event", state.oldest_key_event), ("oldest log event", state.oldest_log_event)):
        click.echo(f"{name + ':':<18}{'-' if t is None else t.isoformat(timespec='milliseconds')}")



# -- the embedded server ----------------------------------------------------------------------------
# `botwire nats ...` manages the embedded nats-server; `botwire server ...` is its old spelling, kept
# working (the same commands), so that `botwire serve` (the HTTP server) is not confused with it.
@cli.group(name="nats")
def nats_group() -> None:
    """Manage the embedded local nats-server (start, stop, status).

    Its data, token and log live under $BOTWIRE_HOME (default: the user data folder).
    """


def _state_dict(state: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {"running": True, **asdict(state)}


@nats_group.command()
@_json_option
@click.pass_obj
def start(opts: Options) -> None:
    """Start the embedded server unless it runs; print its url and pid."""
    from .nats import embedded

    home = embedded.home_dir()
    state, _ = embedded.ensure(home, verify=True)  # also restarts a server whose token file was lost
    # Started by this process, not merely absent when it began (concurrent starts: one says so).
    was_running = state.pid not in embedded.spawned_pids()
    if opts.json:
        click.echo(_json({**_state_dict(state), "started": not was_running}))
    else:
        verb = "is already running" if was_running else "started"
        click.echo(f"botwire nats: the embedded nats-server {verb}: {state.url} (pid {state.pid})")


@nats_group.command()
@_json_option
@click.pass_obj
def stop(opts: Options) -> None:
    """Stop the embedded server; say whether one was running."""
    from .nats import embedded

    home = embedded.home_dir()
    state = embedded.stop(home)
    if opts.json:
        click.echo(_json({"stopped": state is not None, "pid": state.pid if state else None, "home": str(home)}))
    elif state is None:
        click.echo(f"botwire nats: no embedded nats-server was running (home {home})")
    else:
        click.echo(f"botwire nats: stopped the embedded nats-server (pid {state.pid})")


@nats_group.command()
@_json_option
@click.pass_obj
def status(opts: Options) -> None:
    """Show the embedded server's url, pid and folders (exit 1: not running)."""
    from .nats import embedded

    home = embedded.home_dir()
    state = embedded.status(home)
    if state is None:
        if opts.json:
            click.echo(_json({"running": False, "url": None, "pid": None, "home": str(home)}))
            raise click.exceptions.Exit(EXIT_NOT_FOUND)
        _not_found(f"no embedded nats-server is running (home {home}); start one with `botwire nats start`")
    if opts.json:
        click.echo(_json(_state_dict(state)))
        return
    click.echo(
        f"running: {state.url} (pid {state.pid})\n"
        f"home:    {state.home}\nstore:   {state.store_dir}\nlog:     {state.log_file}"
    )
    if os.environ.get("BOTWIRE_URL"):
        click.echo("note: BOTWIRE_URL is set, so clients connect there rather than to this server", err=True)


cli.add_command(
    click.Group(
        "server",
        commands=nats_group.commands,
        help="Old spelling of `botwire nats`: the same start, stop and status commands.",
        short_help="Old spelling of `botwire nats`.",
    )
)


# -- the HTTP server (issue 7) ----------------------------------------------------------------------
@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option(
    "--url",
    "nats_url",
    metavar="URL",
    default=None,
    help="NATS server for the state. Default: $BOTWIRE_URL, else the embedded local server.",
)
@click.option(
    "--long-poll-timeout",
    default=20.0,
    show_default=True,
    type=click.FloatRange(0.05, 300),
    help="Seconds a long-poll waits for data before an empty 204 (also the SSE keep-alive, at most 15).",
)
@click.option("--auth", is_flag=True, help="Require an API key (`botwire keys create`) except in --public namespaces.")
@click.option(
    "--public",
    "public",
    metavar="GLOB[=LIMITS]",
    multiple=True,
    help="Serve namespaces matching GLOB without a key (implies --auth), with their own limits "
    "(default 'hosted': 1000 writes/day and 50 MB per namespace, reads unlimited). Repeatable.",
)
@click.option(
    "--quota",
    "quota",
    metavar="GLOB=LIMITS",
    multiple=True,
    help="Limits for namespaces matching GLOB, whoever calls: 'writes=N/day', 'rps=N', 'bytes=N[KB|MB|GB]' "
    "(comma-separated), or 'hosted'. Repeatable; the first matching GLOB applies.",
)
@click.option("--access-log", is_flag=True, help="One JSON line per request on stderr (logger botwire.access).")
@click.pass_obj
def serve(
    opts: Options,
    host: str,
    port: int,
    nats_url: str | None,
    long_poll_timeout: float,
    auth: bool,
    public: tuple[str, ...],
    quota: tuple[str, ...],
    access_log: bool,
) -> None:
    """Serve Durable Streams over HTTP at /v1/stream/<path> (extra: botwire-stream[server]).

    Token streams and conversation logs (/v1/stream/chat/<namespace>/<session>, read-only) live
    in NATS, so any number of serve processes share them. SIGTERM ends open long-polls and SSE.
    Without --auth (or --public) anyone who reaches the port reads and writes everything, so the
    server then listens on loopback only.
    """
    try:
        from .server.auth import Policy
        from .server.quota import HOSTED, parse_rule
        from .server.run import serve as run_server
    except ImportError as exc:
        raise click.ClickException(f"botwire serve needs the server extra: pip install 'botwire-stream[server]' ({exc})")
    policy = Policy(
        auth=auth or bool(public),
        public=[parse_rule(p, HOSTED) for p in public],
        quotas=[parse_rule(q) for q in quota],
        connect={"token": opts.resolved_token(), "creds": opts.creds},
    )
    if not policy.auth:
        if not _loopback(host):
            raise Failure(
                f"--host {host} without auth would let anyone on the network read and write every namespace; "
                "add --auth (and create keys with `botwire keys create`) or --public GLOB, or listen on 127.0.0.1"
            )
        click.echo("botwire serve: no auth (no --auth or --public): listening on loopback only", err=True)
    click.echo(f"botwire serve: http://{host}:{port}/v1/stream/", err=True)
    run_server(
        host=host,
        port=port,
        url=nats_url or opts.url,
        long_poll_timeout=long_poll_timeout,
        policy=policy,
        access_log=access_log,
    )


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- MCP server (issue 11) ----------------------------------------------------------------------
@cli.command(name="mcp")
@click.option(
    "--namespace",
    "-n",
    "globs",
    metavar="GLOB",
    multiple=True,
    help="A namespace (or glob of namespaces) the tools may reach; repeatable. "
    "Default: the group's --namespace, $BOTWIRE_NAMESPACE, else 'default'.",
)
@click.option("--url", "nats_url", metavar="URL", default=None, help="NATS server; default: $BOTWIRE_URL, else the embedded one.")
@click.option("--token-file", "token_file", metavar="FILE", expose_value=False, callback=_store, help="File holding the auth token. Default: $BOTWIRE_TOKEN.")
@click.option("--creds", "creds", metavar="FILE", expose_value=False, callback=_store, help="NATS credentials file. Default: $BOTWIRE_CREDS.")
@click.option("--http", is_flag=True, help="Serve streamable HTTP at http://HOST:PORT/mcp instead of stdio.")
@click.option("--host", default="127.0.0.1", show_default=True, help="With --http: the address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="With --http: the port (0: any free one).")
@click.pass_obj
def mcp_command(opts: Options, globs: tuple[str, ...], nats_url: str | None, http: bool, host: str, port: int) -> None:
    """Run a Model Context Protocol server (extra: botwire-stream[mcp]) whose tools read and write
    keys and conversations in the namespaces given (stdio by default, for desktop assistants)."""
    try:
        from .integrations.mcp import check_globs, run
    except ImportError as exc:
        raise click.ClickException(f"botwire mcp needs the mcp extra: pip install 'botwire-stream[mcp]' ({exc})")
    namespaces = list(globs) or [opts.resolved_namespace()]
    try:
        check_globs(namespaces)
    except BotWireError as exc:
        raise Failure(f"--namespace: {exc}") from exc
    if http and not _loopback(host):
        raise Failure(f"--host {host}: the MCP server has no auth, so it listens on loopback only")
    host = host.strip("[]")  # '[::1]' passes the check above but does not bind (uvicorn: name not known)

    def ready(url: str) -> None:
        click.echo(f"botwire mcp: {url}", err=True)

    connect = {"url": nats_url or opts.url, "token": opts.resolved_token(), "creds": opts.creds}
    run(namespaces, connect, http=http, host=host, port=port, ready=ready)


# -- API keys for `botwire serve` (issue 9) -------------------------------------------------------
@click.group(name="keys")
def api_keys() -> None:
    """Manage the API keys of `botwire serve --auth` (kept hashed in NATS; shared by every serve process)."""


def _key_store_call(opts: Options, body: Callable[[Any], Any]) -> Any:
    import asyncio

    async def run() -> Any:
        from .nats.pool import open_connection
        from .server.keystore import KeyStore
        from .settings import resolve

        conn = await open_connection(resolve(opts.url, token=opts.resolved_token(), creds=opts.creds))
        try:
            return await body(await KeyStore.open(conn))
        finally:
            await conn.close()

    return asyncio.run(run())


def _nats_options(f: F) -> F:
    for option in reversed(
        [
            click.option("--url", "url", metavar="URL", expose_value=False, callback=_store, help="NATS server. Default: $BOTWIRE_URL, else the embedded local server."),
            click.option("--token-file", "token_file", metavar="FILE", expose_value=False, callback=_store, help="File holding the NATS auth token."),
            click.option("--creds", "creds", metavar="FILE", expose_value=False, callback=_store, help="NATS credentials file."),
            _json_option,
        ]
    ):
        f = option(f)
    return f


def _key_dict(key: Any) -> dict[str, Any]:
    import msgspec

    out: dict[str, Any] = msgspec.structs.asdict(key)
    out.pop("digest")
    return out


@api_keys.command(name="create")
@click.option("--namespace", "-n", "namespaces", metavar="GLOB", multiple=True, required=True, help="Namespaces the key reaches (glob; repeatable).")
@click.option("--scope", type=click.Choice(["read", "write", "admin"]), default="read", show_default=True, help="read < write < admin.")
@click.option("--writes-per-day", type=click.IntRange(min=0), default=None, help="This key's writes per UTC day.")
@click.option("--rps", type=click.IntRange(min=1), default=None, help="This key's requests per second.")
@_nats_options
@click.pass_obj
def keys_create(opts: Options, namespaces: tuple[str, ...], scope: str, writes_per_day: int | None, rps: int | None) -> None:
    """Create a key and print it once (only its hash is kept)."""
    plain, key = _key_store_call(
        opts, lambda store: store.create(list(namespaces), scope, writes_per_day=writes_per_day, requests_per_second=rps)
    )
    if opts.json:
        click.echo(_json({"key": plain, **_key_dict(key)}))
    else:
        click.echo(plain)
        click.echo(f"created key {key.id} ({scope} on {', '.join(namespaces)}); it is shown only now", err=True)


@api_keys.command(name="list")
@_nats_options
@click.pass_obj
def keys_list(opts: Options) -> None:
    """List the keys: id, scope, namespaces, created, last used, revoked (never the secret)."""
    found = _key_store_call(opts, lambda store: store.list())
    if opts.json:
        click.echo(_json([_key_dict(k) for k in found]))
        return
    from datetime import datetime, timezone

    def when(t: float | None) -> str:
        return "-" if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")

    for k in found:
        state = f"revoked {when(k.revoked)}" if k.revoked else "live"
        click.echo(f"{k.id}  {k.scope:<5}  {','.join(k.namespaces)}  created {when(k.created)}  last used {when(k.last_used)}  {state}")


@api_keys.command(name="revoke")
@click.argument("key_id")
@_nats_options
@click.pass_obj
def keys_revoke(opts: Options, key_id: str) -> None:
    """Revoke the key KEY_ID (its id, or the whole key); exit 1 when no such live key."""
    key_id = key_id.split("_")[1] if key_id.startswith("bwk_") and key_id.count("_") >= 2 else key_id
    if not _key_store_call(opts, lambda store: store.revoke(key_id)):
        _not_found(f"no live API key {key_id!r}")
    click.echo(f"revoked {key_id}")


# -- the streaming chat demo (issue 8) --------------------------------------------------------------
@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port (0: any free one).")
@click.option("--url", "nats_url", metavar="URL", default=None, help="NATS server. Default: $BOTWIRE_URL, else the embedded local server.")
@click.pass_obj
def demo(opts: Options, host: str, port: int, nats_url: str | None) -> None:
    """Chat in the browser: `botwire serve` with its chat page, on the embedded server.

    Prints the page's URL once it answers and opens nothing. Answers stream token by token and
    survive reloads, restarts of this command and a second tab. The model is a local fake one
    unless BOTWIRE_CHAT_MODEL says otherwise (openai, or module:attribute of a LangChain model).
    """
    try:
        from .server.run import serve as run_server
    except ImportError as exc:
        raise click.ClickException(f"botwire demo needs the server extra: pip install 'botwire-stream[server]' ({exc})")

    def ready(base: str) -> None:
        click.echo(f"botwire demo: open {base} in your browser (Ctrl-C stops)", err=False)

    run_server(host=host, port=port, url=nats_url or opts.url, ready=ready)


def main(args: Sequence[str] | None = None, prog_name: str | None = None) -> None:
    """Entry point of the ``botwire`` script."""
    cli.main(args=args, prog_name=prog_name)
