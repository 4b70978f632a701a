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

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "billm"

# subpackage -> the billm modules it may import (besides itself)
ALLOWED = {
    "kernels": {"errors"},
    "packing": {"errors", "config", "io", "kernels"},
    "methods": {"errors", "config", "kernels", "packing"},
    "model": {"errors", "config", "io", "packing"},
}
CORE = ["kernels", "packing", "methods", "model", "quantize.py", "reconstruct.py", "resume.py", "config.py"]


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


NAMES = "billm|rtn|gptq|slim|sign|pbllm|grid|mixed"
DISPATCH = re.compile(rf"""(method|format|fmt)\w*\s*(==|!=|\bin\b)\s*[(\[{{]?\s*["']({NAMES})["']""")


def test_no_method_or_format_name_dispatch_outside_the_methods_and_formats():
    allowed = {SRC / "packing" / "formats.py"} | set((SRC / "methods").glob("*.py"))
    for f in sorted(SRC.rglob("*.py")):
        if f not in allowed:
            hits = [line.strip() for line in f.read_text().splitlines() if DISPATCH.search(line)]
            assert not hits, f"{f.relative_to(SRC)}: {hits}"
