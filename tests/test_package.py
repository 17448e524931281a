"""The package's public surface: what `import botwire_stream` gives and what it costs."""

from __future__ import annotations

import ast
import importlib
import pathlib
import pkgutil
import subprocess
import sys

import pytest

import botwire_stream
from botwire_stream import errors


def test_every_public_name_resolves() -> None:
    for name in botwire_stream.__all__:
        assert getattr(botwire_stream, name).__name__ == name
    assert set(botwire_stream.__all__) <= set(dir(botwire_stream))


@pytest.mark.parametrize("module", ["botwire_stream", "botwire_stream.errors", "botwire_stream.cli"])
def test_import_is_light_until_a_class_is_used(module: str) -> None:
    # `botwire --help` and `from botwire_stream import errors` must not pay for nats-py, nor for the
    # optional or heavy dependencies (the certificate's cryptography, nkeys for creds, langchain).
    heavy = ["nats", "cryptography", "langchain_core", "nkeys", "langgraph"]
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# Modules that get their __all__ when the transport split (issue 15 items 1-3) lands.
_PENDING_ALL: set[str] = set()  # modules still without __all__ (none)


def test_every_module_lists_its_names() -> None:
    # The public boundary: each module says what it exports, and every listed name exists.
    for info in pkgutil.walk_packages(botwire_stream.__path__, "botwire_stream."):
        if info.name in _PENDING_ALL:
            continue
        module = importlib.import_module(info.name)
        assert isinstance(getattr(module, "__all__", None), list), f"{info.name} has no __all__"
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.__all__ names a missing {name!r}"


def test_every_error_is_a_botwire_error_with_an_http_status() -> None:
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.BotWireError)
            assert 400 <= obj.http_status < 600


# -- layering: imports point down ----------------------------------------------------------------
_PACKAGE = pathlib.Path(botwire_stream.__file__).parent
# The async cores: they validate, encode and keep the semantics, and reach storage only through
# the protocols of botwire_stream._backend, so that another transport (HTTP) serves them unchanged.
_CORES = ("memory", "chat", "live", "client", "tokens", "audit")
# What sits above the NATS transport and so may never be imported by it.
_ABOVE_NATS = (*_CORES, "sync", "portal", "cli", "integrations", "server", "__main__")


def _imports(path: pathlib.Path) -> set[str]:
    """The absolute names of the modules ``path`` imports, anywhere in it (functions included)."""
    package = ".".join(("botwire_stream", *path.relative_to(_PACKAGE).with_suffix("").parts[:-1]))
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x`
    return found


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("core", _CORES)
def test_the_cores_import_no_nats_code(core: str) -> None:
    # Neither nats-py nor botwire_stream.nats: only _backend and the pure modules.
    imported = _imports(_PACKAGE / f"{core}.py")
    bad = sorted(n for n in imported if _is_under(n, "nats") or _is_under(n, "botwire_stream.nats"))
    assert bad == [], f"botwire_stream.{core} imports {bad}"


def test_the_nats_transport_never_imports_what_is_above_it() -> None:
    for path in sorted((_PACKAGE / "nats").glob("*.py")):
        imported = _imports(path)
        bad = sorted(n for n in imported for above in _ABOVE_NATS if _is_under(n, f"botwire_stream.{above}"))
        assert bad == [], f"botwire_stream/nats/{path.name} imports {bad}"


def test_langchain_history_from_the_top_level_without_importing_langchain_early() -> None:
    # The hosted product's users write `from botwire_stream import BotWireChatHistory`; everyone
    # else must not pay for langchain-core when they use the core classes.
    code = (
        "import sys, botwire_stream\n"
        "botwire_stream.Memory, botwire_stream.AsyncChatHistory, botwire_stream.ChatHistory\n"
        "early = 'langchain_core' in sys.modules\n"
        "from botwire_stream import BotWireChatHistory\n"
        "from botwire_stream.integrations.langchain import BotWireChatHistory as Direct\n"
        "from langchain_core.chat_history import BaseChatMessageHistory\n"
        "print(early, BotWireChatHistory is Direct, issubclass(BotWireChatHistory, BaseChatMessageHistory))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]


def test_langchain_history_without_langchain_core_names_the_extra() -> None:
    # langchain-core absent (blocked in sys.modules): a documented ImportError that says what to install.
    code = (
        "import sys; sys.modules['langchain_core'] = None\n"
        "import botwire_stream\n"
        "from botwire_stream.errors import MissingDependency\n"
        "try:\n"
        "    from botwire_stream import BotWireChatHistory\n"
        "except MissingDependency as exc:\n"
        "    print(isinstance(exc, ImportError), exc.code)\n"
        "    print(exc)\n"
        "print(botwire_stream.Memory.__name__)\n"  # the core still works
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "True missing_dependency"
    assert "pip install 'botwire-stream[langchain]'" in lines[1]
    assert lines[2] == "Memory"


def test_langgraph_adapters_without_langgraph_name_the_extra() -> None:
    # langgraph absent (blocked in sys.modules): MissingDependency naming the extra; the core works.
    code = (
        "import sys; sys.modules['langgraph'] = None\n"
        "import botwire_stream\n"
        "from botwire_stream.errors import MissingDependency\n"
        "try:\n"
        "    from botwire_stream.integrations.langgraph import BotWireSaver\n"
        "except MissingDependency as exc:\n"
        "    print(isinstance(exc, ImportError))\n"
        "    print(exc)\n"
        "print(botwire_stream.Memory.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "True"
    assert "pip install 'botwire-stream[langgraph]'" in lines[1]
    assert lines[2] == "Memory"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [("crewai", "crewai", "crewai"), ("autogen", "autogen_core", "autogen")],
)
def test_framework_adapters_without_their_framework_name_the_extra(module: str, blocked: str, extra: str) -> None:
    # The framework absent (blocked in sys.modules): MissingDependency naming the extra to install.
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "from botwire_stream.errors import MissingDependency\n"
        "try:\n"
        f"    import botwire_stream.integrations.{module}\n"
        "except MissingDependency as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"pip install 'botwire-stream[{extra}]'" in out.stdout


def test_the_mcp_server_imports_no_nats_code_and_names_its_extra() -> None:
    # integrations/mcp.py works through the cores (AsyncMemory, AsyncChatHistory) only
    imported = _imports(_PACKAGE / "integrations" / "mcp.py")
    assert sorted(n for n in imported if _is_under(n, "nats") or _is_under(n, "botwire_stream.nats")) == []
    code = (
        "import sys; sys.modules['mcp'] = None\n"
        "from botwire_stream.errors import MissingDependency\n"
        "try:\n"
        "    import botwire_stream.integrations.mcp\n"
        "except MissingDependency as exc:\n"
        "    print(isinstance(exc, ImportError), 'botwire-stream[mcp]' in str(exc))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_botwire_stream_never_imports_the_consumers_package() -> None:
    # consumers/ sits on top of botwire_stream; only the CLI hands `botwire consume` to it, from
    # inside a function (so that `import botwire_stream.cli` and `botwire --help` do not load it).
    for path in sorted(_PACKAGE.rglob("*.py")):
        imported = _imports(path)
        bad = sorted(n for n in imported if _is_under(n, "consumers"))
        if path.name == "cli.py" and path.parent == _PACKAGE:
            top = ast.parse(path.read_text())
            assert not any(
                isinstance(node, (ast.Import, ast.ImportFrom)) and "consumers" in ast.dump(node) for node in top.body
            ), "botwire_stream/cli.py imports consumers at module level"
            continue
        assert bad == [], f"{path.relative_to(_PACKAGE)} imports {bad}"
    code = "import sys, botwire_stream, botwire_stream.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'consumers'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_consumers_import_only_downward() -> None:
    # consumers/ may use botwire_stream's cores and nats/, never its HTTP server or integrations.
    root = _PACKAGE.parent / "consumers"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert any(_is_under(n, "botwire_stream") for n in imported) or path.name in ("__init__.py", "cli.py")
        bad = sorted(
            n
            for n in imported
            for above in ("server", "http", "integrations", "portal")
            if _is_under(n, f"botwire_stream.{above}")
        )
        assert bad == [], f"consumers/{path.name} imports {bad}"


def _private_names(root: pathlib.Path) -> set[str]:
    """The ``_``-prefixed (not dunder) functions, methods and attributes defined under ``root``."""
    found: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = node.name
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                name = node.attr
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                name = node.id
            if name and name.startswith("_") and not name.startswith("__"):
                found.add(name)
    return found


def test_consumers_use_only_public_names_of_botwire_stream() -> None:
    # consumers/ is a client of the library: it imports no private module or name of
    # botwire_stream (its _backend protocols excepted) and calls no private helper of it
    # (compaction once read summaries through AsyncChatHistory._replayer, the runtime added the
    # events subject through NatsReplay._ensure_events).
    root = _PACKAGE.parent / "consumers"
    theirs = _private_names(_PACKAGE) - _private_names(root)
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and _is_under(node.module or "", "botwire_stream"):
                parts = (node.module or "").split(".") + [a.name for a in node.names]
                bad = [p for p in parts if p.startswith("_") and p != "_backend"]
                assert bad == [], f"consumers/{path.name} imports {node.module}: {bad}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_under(alias.name, "botwire_stream"):
                        bad = [p for p in alias.name.split(".") if p.startswith("_") and p != "_backend"]
                        assert bad == [], f"consumers/{path.name} imports {alias.name}"
            elif isinstance(node, ast.Attribute) and node.attr in theirs:
                raise AssertionError(f"consumers/{path.name}:{node.lineno} uses botwire_stream's private {node.attr}")
