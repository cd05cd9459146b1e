"""The structure docs/ARCHITECTURE.md describes: every module it names exists, and imports run
downwards, from the commands to what they use, never into a command."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"train", "evaluate", "crosscheck", "experiments", "benchmark", "speedrun"}
PACKAGES = ("shared", "impl_numpy", "impl_jax", "impl_torch")


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
    return sorted(p for package in PACKAGES for p in (ROOT / package).glob("*.py"))


def test_every_module_the_architecture_note_names_exists():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:shared|impl_\w+|scripts|tests)/\w+\.(?:py|sh))`", text))
    assert len(named) > 20
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert missing == []


@pytest.mark.parametrize("path", modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_module_imports_a_command_front_end(path):
    own = f"{path.parent.name}.{path.stem}"
    for module, name in imports(path):
        assert name != "main", f"{own} imports main from {module}"
        if own.startswith("impl_") or path.stem not in COMMANDS | {"cli"}:
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
