"""The layout holds: one package talks to pika, and the rest loads without it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AMQP_PACKAGE = ROOT / "rbit" / "amqp"
#: Modules of the amqp package that the rest of rbit imports without loading pika.
PIKA_FREE_IN_AMQP = {AMQP_PACKAGE / "__init__.py", AMQP_PACKAGE / "records.py"}


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an ``import`` or ``from ... import`` names, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _pika_imports(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for line, name in _imported_modules(path)
            if name == "pika" or name.startswith("pika.")]


def _sources() -> list[Path]:
    return sorted(p for top in ("rbit", "rbitext") for p in (ROOT / top).rglob("*.py"))


def test_the_import_scan_finds_pika_at_any_depth(tmp_path):
    module = tmp_path / "sample.py"
    module.write_text("def f():\n    if True:\n        from pika import spec\n"
                      "class C:\n    def g(self):\n        import pika.exceptions as e\n")
    assert [name for _line, name in _imported_modules(module)] == ["pika", "pika.exceptions"]


def test_only_the_amqp_package_imports_pika():
    sources = _sources()
    assert AMQP_PACKAGE / "broker.py" in sources  # the scan sees the package itself
    offenders = [hit for path in sources
                 if AMQP_PACKAGE not in path.parents or path in PIKA_FREE_IN_AMQP
                 for hit in _pika_imports(path)]
    assert offenders == []


@pytest.mark.parametrize("modules", [
    "rbit.fate, rbit.dispatch",
    "rbit.amqp, rbit.amqp.records",
    "rbit.status, rbit.runners.python, rbit.runners.shell",  # the worker's job side
    "rbit.cli, rbit.credit.cli, rbit.credit.server, rbit.credit.client",
    "rbitext.creditpiggy, rbitext.examples, rbitext.usagebilling",
])
def test_importing_the_pika_free_parts_does_not_load_pika(modules):
    check = (f"import sys; import {modules}; "
             "sys.exit(1 if 'pika' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr or f"importing {modules} loaded pika"


def test_the_broker_module_does_load_pika():
    # The check above can fail: the same probe sees pika behind rbit.amqp.broker.
    check = "import sys; import rbit.amqp.broker; sys.exit(0 if 'pika' in sys.modules else 1)"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
