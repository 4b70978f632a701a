"""Keep the rows of a finished ``billm compare``/``pareto`` table as job rows, so the same command reuses them.

Tables measured before job rows were kept in git have only their ``compare.json``. This writes, for each of
its rows, the ``jobs/<job>/row.json`` the same command would have left: the row as measured (its revision
stays the commit that measured it) under the fingerprint the command computes now (model, calibration and
evaluation digests, config, versions). The command run again then measures only specs not in the table.

Use it only where the code since the rows' revisions leaves their bytes unchanged (``scripts/checkpoint_digests.py``
is the check): a kept row stands for what the current code would measure. A ``row.json`` already there is left
as it is.

    python scripts/keep_table_rows.py docs/results/pareto --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from billm.compare import Row, job_fingerprint
from billm.io import write_json_atomic
from billm.sweep import Job, Sweep, job_folder, job_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", type=Path, help="the folder holding compare.json (its jobs/ are written there)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--batch-size", type=int, default=8, help="the command's --batch-size (its default: 8)")
    args = ap.parse_args()
    table = json.loads((args.table / "compare.json").read_text())
    cal = table["calibration"]
    if len(cal["seeds"]) != 1:
        raise SystemExit("a table over several calibration seeds: keep its rows by hand")
    through_files = table["command"].split()[1] == "pareto"
    sweep = Sweep(model=table["model"], out=str(args.table.resolve()), tasks=tuple(table["tasks"]), calib=cal["source"],
                  nsamples=cal["nsamples"], seqlen=cal["seqlen"], eval_seqlen=table["eval_seqlen"],
                  max_windows=table["max_windows"], batch_size=args.batch_size, data_dir=args.data_dir,
                  through_files=through_files)
    model, _, calib, eval_ids = job_inputs(sweep, cal["seeds"][0])  # what the command's jobs load
    for saved in table["rows"]:
        row = Row(**saved)
        folder = job_folder(sweep, Job(row.spec, row.seed))
        if (folder / "row.json").exists():
            print(f"{row.spec}: {folder / 'row.json'} already there, left as it is")
            continue
        from_file = through_files and row.spec != "fp"
        if row.from_file != from_file:
            raise SystemExit(f"{row.spec}: measured with from_file={row.from_file}, the command now gives {from_file}")
        fingerprint = job_fingerprint(row.spec, model, sweep.model, calib, eval_ids, sweep.eval_seqlen,
                                      sweep.max_windows, sweep.batch_size, None, from_file)
        write_json_atomic(folder / "row.json", {"fingerprint": fingerprint, "row": saved, "resumed_blocks": None,
                                                "kept_from": "compare.json"})
        print(f"{row.spec}: kept ({row.revision})")


if __name__ == "__main__":
    main()
