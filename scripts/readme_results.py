"""Rewrite the README's results table from ``docs/results/pareto`` (the text between the
``<!-- pareto-table:begin -->`` and ``<!-- pareto-table:end -->`` lines), so the front door shows
exactly what ``scripts/results.sh pareto`` measured, with its commit and date.

    python scripts/readme_results.py [--readme README.md] [--results docs/results/pareto]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from billm.compare import Row, pareto_front

BEGIN, END = "<!-- pareto-table:begin -->", "<!-- pareto-table:end -->"
TASK_NAMES = {"wikitext2": "WikiText-2 ppl", "pydoc": "pydoc ppl (held out)"}


def pareto_block(results: dict, stamp: str) -> str:
    """The README's block: where the figures come from, then a row per method by storage bits.

    ``results`` is ``compare.json``; ``stamp`` the ``Commit: ...`` line of ``compare.md``.
    """
    m = re.match(r"Commit: `([^`]+)`, (\d{4}-\d{2}-\d{2}), (.+), torch ", stamp)  # threads: as the stamp words them
    if not m:
        raise ValueError(f"not a results stamp: {stamp!r}")
    commit, date, threads = m.groups()
    tasks = results["tasks"]
    rows = sorted((Row(**r) for r in results["rows"]), key=lambda r: r.storage_bits)
    front = {id(r) for r in pareto_front(rows, tasks[0])}  # the front as the table in docs/results marks it
    lines = [f"Made by `scripts/results.sh pareto` at commit `{commit}` on {date}; {threads};",
             "the chart, the JSON, the timings and the commit that measured each row are in",
             "[docs/results/pareto/](docs/results/pareto/README.md)."
             + (" The pydoc text is held out: no setting was tuned on it." if "pydoc" in tasks else ""), "",
             "| method | storage bits | " + " | ".join(TASK_NAMES.get(t, f"{t} ppl") for t in tasks) + " | front |",
             "|---|---:|" + "---:|" * len(tasks) + ":---:|"]
    for r in rows:
        name = "full precision" if r.spec == "fp" else f"`{r.label(rows)}`"
        ppl = " | ".join(f"{r.ppl[t]:.2f}" for t in tasks)
        lines.append(f"| {name} | {r.storage_bits:.3f} | {ppl} | {'yes' if id(r) in front else ''} |")
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with the lines between the markers replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the README needs one {BEGIN} line and, after it, one {END} line")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--results", default="docs/results/pareto")
    args = ap.parse_args(argv)
    res = Path(args.results)
    try:
        results = json.loads((res / "compare.json").read_text())
        stamp = next(line for line in (res / "compare.md").read_text().splitlines() if line.startswith("Commit: "))
        readme = Path(args.readme)
        new = replace_block(readme.read_text(), pareto_block(results, stamp))
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:  # TypeError: rows of another billm
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(new)
    tmp.replace(readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
