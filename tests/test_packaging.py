"""The foundation: one distribution, three import names, no shadowing of the stdlib `operator`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cwd", [ROOT, ROOT / "operator", ROOT / "tests", Path("/")])
def test_import_operator_is_stdlib_from_any_directory(cwd: Path) -> None:
    code = "import operator, sys; print(operator.__file__); assert hasattr(operator, 'itemgetter')"
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    assert str(ROOT / "operator") not in out.stdout
    assert out.stdout.strip().endswith("operator.py")


def test_operator_folder_has_no_init() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_three_components_import_from_their_folders() -> None:
    code = ("import dsv4.runtime, dsv4.kernels, dsv4.operator; "
            "print(dsv4.runtime.__file__, dsv4.kernels.__file__, list(dsv4.operator.__path__))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert str(ROOT / "runtime" / "__init__.py") in out
    assert str(ROOT / "kernels" / "__init__.py") in out
    assert str(ROOT / "operator") in out


def _dsv4(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4.cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_help_lists_every_subcommand_and_each_has_help() -> None:
    from dsv4.cli import SUBCOMMANDS

    top = _dsv4("--help")
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert name in top.stdout
        sub = _dsv4(name, "--help")
        assert sub.returncode == 0, f"dsv4 {name} --help failed: {sub.stderr}"
        assert "usage: dsv4 " + name in sub.stdout


def test_cli_unknown_command_fails_clearly() -> None:
    res = _dsv4("no-such-command")
    assert res.returncode != 0
    assert "invalid choice" in res.stderr


def test_constraints_pin_every_runtime_dependency() -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {
        line.split("==")[0].strip().lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    for dep in deps:
        name = dep.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower()
        assert name.replace("_", "-") in pinned, f"{name} is not locked in constraints.txt"
