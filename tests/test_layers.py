"""The package's layers: which subpackage may import which, checked on the source, and no import cycle.

Bottom to top: ``errors``/``config`` < ``kernels`` < ``packing`` < ``methods`` < ``model`` <
``quantize``/``resume`` < ``eval`` < ``compare`` < ``cli``. The core never imports ``eval``; ``kernels``
imports nothing of billm but ``errors``; no method or format name is dispatched on outside the
methods and formats themselves.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "billm"

# subpackage -> the billm modules it may import (besides itself)
ALLOWED = {
    "kernels": {"errors"},
    "packing": {"errors", "config", "io", "kernels"},
    "methods": {"errors", "config", "kernels", "packing", "memory"},
    "model": {"errors", "config", "io", "packing"},
}
CORE = ["kernels", "packing", "methods", "model", "driver.py", "reconstruct.py", "resume.py", "config.py"]


def _billm_imports(path: Path) -> set[str]:
    """Top-level billm modules imported by a source file (relative imports resolved)."""
    pkg = path.relative_to(SRC.parent).with_suffix("").parts[:-1]  # ('billm', 'packing')
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[:len(pkg) - node.level + 1]) + (node.module.split(".") if node.module else [])
                names = [base + [a.name] for a in node.names] if len(base) == 1 else [base]
            else:
                names = [(node.module or "").split(".")]
            out.update(n[1] for n in names if len(n) > 1 and n[0] == "billm")
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("billm."))
    return {m.removesuffix(".py") for m in out}


def _files(part: str) -> list[Path]:
    p = SRC / part
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


@pytest.mark.parametrize("sub", sorted(ALLOWED))
def test_subpackage_imports_only_the_layers_below(sub):
    for f in _files(sub):
        bad = _billm_imports(f) - ALLOWED[sub] - {sub}
        assert not bad, f"{f.relative_to(SRC)} imports {sorted(bad)}"


@pytest.mark.parametrize("part", CORE)
def test_the_core_does_not_import_evaluation(part):
    for f in _files(part):
        assert "eval" not in _billm_imports(f) and "cli" not in _billm_imports(f), f.relative_to(SRC)


@pytest.mark.parametrize("order", [("billm.kernels", "billm.packing.linear"), ("billm.packing.linear", "billm.kernels")],
                         ids=["kernels-first", "linear-first"])
def test_no_import_cycle_in_either_order(order):
    code = "; ".join(f"import {m}" for m in order) + "; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _registered_names() -> str:
    """Every registered method and format name, as a regex alternation (derived, never listed by hand)."""
    from billm.methods import available_methods
    from billm.packing.formats import registered_formats

    return "|".join(sorted(set(available_methods()) | set(registered_formats())))


NAMES = _registered_names()
DISPATCH = re.compile(rf"""(method|format|fmt)\w*\s*(==|!=|\bin\b)\s*[(\[{{]?\s*["']({NAMES})["']""")


def test_the_dispatch_check_knows_every_built_in_method_and_format():
    for name in ("billm", "arb", "rtn", "gptq", "slim", "sign", "pbllm", "grid", "mixed"):
        assert DISPATCH.search(f'if fmt == "{name}":'), name


def _module_of(parts: list[str]) -> Optional[Path]:
    """The source file of the billm module ``parts`` (a package's ``__init__.py``), or None if not a module."""
    p = SRC.parent.joinpath(*parts)
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return p / "__init__.py" if (p / "__init__.py").is_file() else None


def _import_graph() -> dict[Path, set[Path]]:
    """Every billm source file -> the billm source files it imports, anywhere in the file (inside functions too)."""
    graph: dict[Path, set[Path]] = {}
    for f in sorted(SRC.rglob("*.py")):
        pkg = list(f.relative_to(SRC.parent).with_suffix("").parts)
        pkg = pkg[:-1] if f.name == "__init__.py" else pkg[:-1]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = (pkg[:len(pkg) - node.level + 1] if node.level else []) + (node.module.split(".") if node.module else [])
                targets = [base + [a.name] for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".") for a in node.names]
            for t in targets:
                if t and t[0] == "billm":
                    m = _module_of(t)
                    if m is not None and m != f:
                        edges.add(m)
                        break
        graph[f] = edges
    return graph


def test_no_import_cycle_between_modules_of_the_package():
    """No module imports (at the top or inside a function) a module that imports it back, directly or not.
    A package's ``__init__`` re-exporting its modules is left out (it only sits on top of them)."""
    graph = {f: {m for m in e if m.name != "__init__.py"} for f, e in _import_graph().items() if f.name != "__init__.py"}
    state: dict[Path, int] = {}

    def visit(f: Path, path: list[Path]) -> None:
        state[f] = 1
        for m in sorted(graph.get(f, ())):
            if state.get(m) == 1:
                cycle = path[path.index(m):] + [m] if m in path else [f, m]
                raise AssertionError("import cycle: " + " -> ".join(str(c.relative_to(SRC)) for c in cycle))
            if m not in state:
                visit(m, path + [m])
        state[f] = 2

    for f in sorted(graph):
        if f not in state:
            visit(f, [f])


def test_no_method_or_format_name_dispatch_outside_the_methods_and_formats():
    allowed = {SRC / "packing" / "formats.py"} | set((SRC / "methods").glob("*.py"))
    for f in sorted(SRC.rglob("*.py")):
        if f not in allowed:
            hits = [line.strip() for line in f.read_text().splitlines() if DISPATCH.search(line)]
            assert not hits, f"{f.relative_to(SRC)}: {hits}"
