"""Do billm's zero-shot scores equal lm-evaluation-harness's on the same items? (needs billm[harness])

    python benchmarks/check_harness.py [MODEL_OR_CHECKPOINT] [--limit 100]

Writes harness YAML tasks over the local copies in ``--data-dir``/zeroshot (ARC-Easy, BoolQ,
OpenBookQA, with the harness's own prompts), scores the first ``--limit`` items of each with
``lm_eval.simple_evaluate`` and with :func:`billm.eval.zeroshot.zeroshot`, and prints both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from billm.eval.harness import run_harness
from billm.eval.zeroshot import zeroshot
from billm.model.loading import load_model

# harness task name -> (billm task, local file, doc_to_text), both using the harness's prompt
TASKS = {
    "local_arc_easy": ("arc_easy", "arc_easy.jsonl", "{{query}}\\nAnswer:"),
    "local_boolq": ("boolq", "boolq.jsonl", "{{query[9:]}}\\nAnswer:"),  # drop the file's "Passage: " prefix
    "local_openbookqa": ("openbookqa", "openbook_qa.jsonl", "{{query}}"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    print(f"$ python {' '.join(sys.argv)}")
    model, tok = load_model(args.model)
    folder = Path(args.data_dir) / "zeroshot"
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, file, text) in TASKS.items():
            (Path(tmp) / f"{name}.yaml").write_text(
                f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / file}\n"
                f"test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{text}\"\n"
                "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
        t0 = time.perf_counter()
        harness = run_harness(model, tok, list(TASKS), limit=args.limit, include_path=tmp, batch_size=args.batch_size)
        t_h = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = zeroshot(model, tok, [b for b, _, _ in TASKS.values()], limit=args.limit, data_dir=args.data_dir,
                    batch_size=args.batch_size)
    t_o = time.perf_counter() - t0
    print(f"\n{'task':12s} {'metric':9s} {'harness':>9s} {'billm':>9s}")
    worst = 0.0
    for name, (task, _, _) in TASKS.items():
        for m in ("acc", "acc_norm"):
            h, o = harness[name][m], ours[task].metrics.get(m, ours[task].metrics["acc"] if m == "acc" else None)
            if task == "boolq" and m == "acc_norm":
                o = sum(p["acc_norm"] for p in ours[task].per_item) / ours[task].n
            worst = max(worst, abs(h - o))
            print(f"{task:12s} {m:9s} {h:9.4f} {o:9.4f}")
    print(f"\nlargest difference {worst:.4f} over {args.limit} items a task; harness {t_h:.0f}s, billm {t_o:.0f}s")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
