"""The sync faces mirror the async cores: same methods, same parameters, same defaults.

A sync method that drifts from its core (a missing keyword, another default) is a silent API
difference between ``Memory`` and ``AsyncMemory``; this compares them all by introspection.
"""

from __future__ import annotations

import inspect

import pytest

from botwire_stream import AsyncChatHistory, AsyncMemory, AsyncTokenStream, ChatHistory, Memory, TokenStream, errors

# async core method -> the sync face's name for it, where they differ
_RENAMED = {"contains": "__contains__", "count": "__len__"}
# methods of the cores that the sync faces deliberately do not have
_ASYNC_ONLY = {"open"}


def _public(cls: type) -> dict[str, object]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}


def _params(fn: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name not in ("self", "cls")]


@pytest.mark.parametrize(
    ("core", "face"), [(AsyncMemory, Memory), (AsyncChatHistory, ChatHistory), (AsyncTokenStream, TokenStream)]
)
def test_every_core_method_has_a_sync_twin_with_the_same_parameters(core: type, face: type) -> None:
    for name, method in _public(core).items():
        if name in _ASYNC_ONLY:
            continue
        twin = getattr(face, _RENAMED.get(name, name), None)
        assert twin is not None, f"{face.__name__} lacks {name}"
        assert _params(twin) == _params(method), f"{face.__name__}.{name} differs from {core.__name__}.{name}"
    assert _params(face.__init__) == _params(core.__init__)


def test_error_codes_are_stable_and_unique() -> None:
    classes = [getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    codes = {c.__name__: c.code for c in classes}
    assert len(set(codes.values())) == len(codes)
    # Published in the HTTP API: a renamed class must keep its code.
    assert codes["InvalidTTL"] == "invalid_ttl"
    assert codes["ServerUnavailable"] == "server_unavailable"
    assert codes["Conflict"] == "conflict"
    assert errors.InvalidKey("x").code == "invalid_key"


def _connecting() -> dict[str, object]:
    from botwire_stream import settings

    return {
        "AsyncMemory": AsyncMemory.__init__,
        "Memory": Memory.__init__,
        "AsyncChatHistory": AsyncChatHistory.__init__,
        "ChatHistory": ChatHistory.__init__,
        "AsyncChatHistory.sessions": AsyncChatHistory.sessions,
        "ChatHistory.sessions": ChatHistory.sessions,
        "settings.resolve": settings.resolve,
    }


def test_every_class_that_connects_takes_the_same_connection_arguments() -> None:
    # One definition (settings.ConnectArgs); a new argument (an HTTP api_key=) added to some
    # signatures but not to all, or with another default, fails here.
    from botwire_stream.settings import ConnectArgs

    names = list(ConnectArgs.__annotations__)
    assert names == ["url", "token", "user", "password", "creds"]
    for where, fn in _connecting().items():
        params = inspect.signature(fn).parameters  # type: ignore[arg-type]
        for name in names:
            p = params.get(name)
            assert p is not None, f"{where} lacks {name}="
            assert p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD), f"{where}: {name}= is not a keyword"
            assert p.default is None and p.annotation == "str | None", f"{where}: {name}: {p.annotation} = {p.default!r}"
    # timeout= and replicas=, where taken, have one default everywhere.
    for option in ("timeout", "replicas"):
        defaults = {
            where: inspect.signature(fn).parameters[option].default  # type: ignore[arg-type]
            for where, fn in _connecting().items()
            if option in inspect.signature(fn).parameters  # type: ignore[arg-type]
        }
        assert len(defaults) >= 4 and len(set(defaults.values())) == 1, defaults


def test_adapters_pass_the_connection_arguments_through() -> None:
    from botwire_stream.integrations.langchain import BotWireByteStore, BotWireCache, BotWireChatHistory

    for cls in (BotWireChatHistory, BotWireByteStore, BotWireCache):
        params = inspect.signature(cls.__init__).parameters
        assert params["url"].default is None
        assert any(p.kind is p.VAR_KEYWORD for p in params.values()), f"{cls.__name__} drops token=, creds=..."
