"""Print a Markdown table of zero-shot accuracy from ``billm eval --json`` files.

    python scripts/zeroshot_table.py fp=fp.json billm=billm.json "billm:plus=plus.json"

Each argument is ``LABEL=FILE``; rows keep the arguments' order. A checkpoint's storage bits come
from its JSON (``billm eval`` records them); a model without them (full precision) shows 16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from billm.errors import BillmError
from billm.eval.zeroshot import PAPER_TASKS, zeroshot_markdown


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", metavar="LABEL=FILE")
    ap.add_argument("--metric", default="acc", help="the harness metric shown (acc or acc_norm)")
    args = ap.parse_args(argv)
    rows = []
    for arg in args.rows:
        label, sep, file = arg.rpartition("=")
        if not sep or not label:
            ap.error(f"{arg!r}: expected LABEL=FILE")
        try:
            res = json.loads(Path(file).read_text())
        except (OSError, ValueError) as e:
            print(f"error: {file}: {e}", file=sys.stderr)
            return 2
        rows.append((label, res.get("storage_bits"), res.get("zeroshot", {})))
    try:
        table = zeroshot_markdown(rows, PAPER_TASKS, args.metric)
    except BillmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
