"""The structure docs/ARCHITECTURE.md describes: every module it names exists, and imports run
downwards, from the commands to what they use, never into a command."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from shared.backend import IMPLEMENTATIONS

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"train", "evaluate", "crosscheck", "experiments", "benchmark", "speedrun", "export"}
PACKAGES = ("threefold", "shared", *(f"impl_{name}" for name in IMPLEMENTATIONS))
# The one module of shared/ that may import an implementation: the backend factory.
FACTORY = ROOT / "shared" / "backend.py"


def imports(path: Path) -> set[tuple[str, str]]:
    """(module, name) for every `from module import name` in a file, anywhere in it; a plain
    `import module` gives (module, "")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {(alias.name, "") for alias in node.names}
    return found


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def python_files() -> list[Path]:
    """Every Python file of the project: packages, scripts and tests."""
    return sorted(
        p for folder in (*PACKAGES, "scripts", "tests") for p in (ROOT / folder).rglob("*.py")
    )


def test_every_module_the_architecture_note_names_exists():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    module_path = r"`((?:threefold|shared|impl_\w+|scripts|tests)(?:/\w+)*/\w+\.(?:py|sh))`"
    named = set(re.findall(module_path, text))
    assert len(named) > 20
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert missing == []


@pytest.mark.parametrize("path", modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_module_imports_a_command_front_end(path):
    own = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for module, name in imports(path):
        assert name != "main", f"{own} imports main from {module}"
        # The public API sits above the commands: it may use their building blocks.
        above = own.startswith("threefold.") or path.stem in COMMANDS | {"cli"}
        if own.startswith("impl_") or not above:
            # Below the commands: neither a command nor the flags they share.
            commands = {f"shared.{c}" for c in COMMANDS | {"cli"}}
            assert module not in commands, f"{own} imports {module}"


def test_cli_holds_no_command():
    assert not {m for m, _ in imports(ROOT / "shared" / "cli.py")} & {
        f"shared.{c}" for c in COMMANDS
    }
    assert len((ROOT / "shared" / "cli.py").read_text().splitlines()) < 200


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_script_is_its_command_modules_main(command):
    script = ROOT / "scripts" / f"{command}.py"
    assert (f"shared.{command}", "main") in imports(script)
    assert len(script.read_text().splitlines()) <= 10


SHARED_BUT_THE_FACTORY = [p for p in sorted((ROOT / "shared").rglob("*.py")) if p != FACTORY]


@pytest.mark.parametrize("path", SHARED_BUT_THE_FACTORY, ids=lambda p: p.name)
def test_only_the_backend_factory_reaches_an_implementation(path):
    """Foundation modules, commands and the cross-check reach the implementations through a
    Backend from `make_backend`, never by importing one (statically or by name)."""
    tree = ast.parse(path.read_text())
    for module, _ in imports(path):
        assert not module.startswith("impl_"), f"{path.name} imports {module}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            assert "import_module" not in called and called != "__import__", path.name


def implementation_literals(path: Path) -> list[str]:
    """Places in a file that write out the implementations by hand: a list, tuple, set or
    dict's keys naming two or more of them, or holding only names of pairs of them."""
    names = set(IMPLEMENTATIONS)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            elements = node.elts
        elif isinstance(node, ast.Dict):
            elements = [k for k in node.keys if k is not None]
        else:
            continue
        strings = [e.value for e in elements if isinstance(e, ast.Constant)]
        strings = [s for s in strings if isinstance(s, str)]
        named = {s for s in strings if s in names}
        pairs = [s for s in strings if set(s.split("-")) <= names and s.count("-") == 1]
        if len(named) >= 2 or (len(pairs) >= 2 and len(pairs) == len(elements)):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_implementations_are_named_in_one_list():
    """Tests and plots take the implementations (and their pairs) from IMPLEMENTATIONS, so a
    fourth implementation is compared and drawn without a KeyError."""
    found = [place for path in python_files() for place in implementation_literals(path)]
    assert found == [f"shared/config.py:{_line_of_implementations()}"]


def _line_of_implementations() -> int:
    lines = (ROOT / "shared" / "config.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith("IMPLEMENTATIONS ="))
