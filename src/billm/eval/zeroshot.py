"""Zero-shot multiple-choice accuracy, scored by lm-evaluation-harness.

billm does not score zero-shot tasks itself: every task goes to ``lm_eval.simple_evaluate``
through :func:`billm.eval.harness.harness_lm`, so prompts, tokenization, log-likelihoods,
``acc`` / ``acc_norm`` and their standard errors are the harness's own. billm only decides where
a task's documents come from:

* a local copy (``data_dir``, else ``$BILLM_DATA_DIR``; the folder itself or its ``zeroshot/``
  subfolder) is read into a ``datasets.Dataset`` and scored by a *local task config*
  (:attr:`Task.config`): the harness's prompt for that task, written over the local file's fields;
* otherwise the harness's registered task of the same name, which loads the Hugging Face dataset.
"""

from __future__ import annotations

import bz2
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import nn

from ..errors import DataError
from .harness import harness_lm, require_lm_eval

log = logging.getLogger(__name__)


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_piqa(folder: Path) -> list[dict]:
    """PIQA's original files: ``{goal, sol1, sol2}`` a line and the labels one a line (the hub's fields)."""
    docs = _jsonl(folder / "piqa_valid.jsonl")
    labels = [int(x) for x in (folder / "piqa_valid-labels.lst").read_text().split()]
    if len(labels) != len(docs):
        raise DataError(f"{folder}: {len(docs)} PIQA items but {len(labels)} labels")
    return [{**d, "label": y} for d, y in zip(docs, labels)]


def _read_hellaswag(folder: Path) -> list[dict]:
    """HellaSwag validation as 6 lines an item (context, gold index, 4 endings), cleaned by the harness's own
    ``preprocess`` (WikiHow brackets) like its registered task."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    with bz2.open(folder / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [{"query": preprocess(lines[i]), "choices": [preprocess(e) for e in lines[i + 2:i + 6]],
             "gold": int(lines[i + 1])} for i in range(0, len(lines) - 5, 6)]


def _read_jsonl(file: str) -> Callable[[Path], list[dict]]:
    return lambda folder: _jsonl(folder / file)


# The local files' ``query`` fields already hold the harness's prompt up to its last line; the configs
# below add the rest exactly as the registered tasks (lm_eval/tasks/{piqa,super_glue/boolq,...}) write it.
_QUERY = {"doc_to_choice": "choices", "doc_to_target": "gold"}


@dataclass(frozen=True)
class Task:
    """A zero-shot task: its harness name, metrics, local files and the harness config over them.

    Attributes:
        name: the harness's registered task of the same name scores the Hugging Face dataset.
        metrics: what the harness reports for it (``acc``, and ``acc_norm`` where it does).
        files: the local copy, all in one folder.
        read: the local copy's documents (one dict a document) from that folder.
        config: ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` over those documents' fields.
        harness_dir: the registered task's folder in ``lm_eval/tasks`` (to index only that folder).
    """

    name: str
    metrics: tuple[str, ...]
    files: tuple[str, ...]
    read: Callable[[Path], list[dict]]
    config: dict[str, Any]
    harness_dir: str = ""

    def local_folder(self, data_dir: Optional[str | os.PathLike]) -> Optional[Path]:
        """The folder holding this task's local copy: ``data_dir`` (else ``$BILLM_DATA_DIR``) or its ``zeroshot/``."""
        root = data_dir or os.environ.get("BILLM_DATA_DIR")
        if root:
            for folder in (Path(root) / "zeroshot", Path(root)):
                if all((folder / f).is_file() for f in self.files):
                    return folder
        return None

    def local_config(self, folder: Path) -> dict[str, Any]:
        """An inline harness task config scoring the local copy in ``folder``."""
        return {"task": self.name, "custom_dataset": partial(_dataset, self.read, folder),
                "test_split": "test", "output_type": "multiple_choice", **self.config,
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in self.metrics],
                "metadata": {"version": 1.0, "source": str(folder)}}


def _dataset(read: Callable[[Path], list[dict]], folder: Path, **_: Any):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read(folder))})


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("piqa", ("acc", "acc_norm"), ("piqa_valid.jsonl", "piqa_valid-labels.lst"), _read_piqa,
         {"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_choice": "{{[sol1, sol2]}}", "doc_to_target": "label"}, "piqa"),
    Task("boolq", ("acc",), ("boolq.jsonl",), _read_jsonl("boolq.jsonl"),  # query: "Passage: {passage}\nQuestion: {question}?"
         {"doc_to_text": "{{query[9:] if query.startswith('Passage: ') else query}}\nAnswer:", **_QUERY}, "super_glue/boolq"),
    Task("openbookqa", ("acc", "acc_norm"), ("openbook_qa.jsonl",), _read_jsonl("openbook_qa.jsonl"),
         {"doc_to_text": "query", **_QUERY}, "openbookqa"),  # query: the question stem
    Task("winogrande", ("acc",), ("winogrande.jsonl",), _read_jsonl("winogrande.jsonl"),
         # partial scoring: an int doc_to_text makes the choices the contexts and the target the continuation
         {"doc_to_text": "gold", "doc_to_choice": "context_options", "doc_to_target": "continuation"}, "winogrande"),
    Task("arc_easy", ("acc", "acc_norm"), ("arc_easy.jsonl",), _read_jsonl("arc_easy.jsonl"),
         {"doc_to_text": "{{query}}\nAnswer:", **_QUERY}, "arc"),  # query: "Question: {question}"
    Task("arc_challenge", ("acc", "acc_norm"), ("arc_challenge.jsonl",), _read_jsonl("arc_challenge.jsonl"),
         {"doc_to_text": "{{query}}\nAnswer:", **_QUERY}, "arc"),
    Task("hellaswag", ("acc", "acc_norm"), ("hellaswag_val_full.txt.bz2",), _read_hellaswag,
         {"doc_to_text": "query", **_QUERY}, "hellaswag"),
]}

#: The seven tasks BiLLM's paper reports, in its order.
PAPER_TASKS = tuple(TASKS)


def task_specs(tasks: Sequence[str], data_dir: Optional[str | os.PathLike] = None) -> dict[str, str | dict[str, Any]]:
    """What the harness is given for each task: an inline config over the local copy, else the task's name."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DataError(f"unknown zero-shot task {unknown[0]!r}; known: {', '.join(TASKS)}")
    specs: dict[str, str | dict[str, Any]] = {}
    for t in tasks:
        folder = TASKS[t].local_folder(data_dir)
        specs[t] = TASKS[t].local_config(folder) if folder else t
    return specs


class _NoCustomDatasetHint(logging.Filter):
    """Drops the harness's per-task hint about ``--metadata`` for tasks with a ``custom_dataset`` (ours, all local)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def registry(names: Sequence[str] = ()):
    """A harness ``TaskManager`` that knows the registered tasks ``names`` (of :data:`TASKS`).

    Indexing all of the harness's tasks takes seconds; this indexes only the named tasks' folders
    (all of them only if the installed harness keeps a task elsewhere).
    """
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    folders = sorted({root / TASKS[n].harness_dir for n in names})
    if not names:
        return TaskManager(include_defaults=False)
    if all(f.is_dir() for f in folders):
        manager = TaskManager(include_defaults=False, include_path=[str(f) for f in folders])
        if all(n in manager.all_tasks for n in names):
            return manager
    return TaskManager()


def load_tasks(tasks: Sequence[str], data_dir: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """The harness's task objects (documents loaded) for ``tasks``, local copies first.

    Raises:
        DataError: unknown task, or no local copy and the Hugging Face dataset could not be loaded.
    """
    specs = task_specs(tasks, data_dir)
    require_lm_eval("zero-shot tasks")
    manager = registry([s for s in specs.values() if isinstance(s, str)])
    task_log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _NoCustomDatasetHint) for f in task_log.filters):
        task_log.addFilter(_NoCustomDatasetHint())
    out = {}
    for t, spec in specs.items():
        try:
            out[t] = next(iter(manager.load([spec])["tasks"].values()))
        except Exception as e:  # offline, missing dataset, unreadable file, ...
            root = data_dir or os.environ.get("BILLM_DATA_DIR")
            where = f"in {root} or {Path(root) / 'zeroshot'}" if root else "(no --data-dir / $BILLM_DATA_DIR given)"
            what = ("could not be read" if isinstance(spec, dict) else
                    f"has no local copy ({', '.join(TASKS[t].files)}) {where}, and the harness could not load its "
                    "Hugging Face dataset")
            raise DataError(f"zero-shot task {t} {what}: {type(e).__name__}: {e}") from e
    return out


@dataclass
class TaskResult:
    """Accuracy of one task: ``metrics[name] = value``, ``stderr[name]``; ``n`` items scored."""

    task: str
    n: int
    metrics: dict[str, float]
    stderr: dict[str, float]
    seconds: float
    limit: Optional[int] = None

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


def _number(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan  # the harness writes "N/A" for one item


def zeroshot(model: nn.Module, tokenizer, tasks: Sequence[str] = PAPER_TASKS, limit: Optional[int] = None,
             data_dir: Optional[str | os.PathLike] = None, batch_size: int = 16, device: Any = None) -> dict[str, TaskResult]:
    """Zero-shot accuracy of ``model`` on ``tasks`` (names in :data:`TASKS`), the first ``limit`` items of each.

    All tasks' documents are loaded before any scoring (a missing task fails first). ``model`` is
    moved to ``device`` when given. Standard errors are the harness's (sample std / sqrt(n)).
    """
    loaded = load_tasks(tasks, data_dir)
    import lm_eval

    lm = harness_lm(model, tokenizer, batch_size, device)
    manager = registry()
    out = {}
    for t in tasks:
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=[loaded[t]], limit=limit, task_manager=manager, log_samples=False,
                                      bootstrap_iters=100)  # means get the closed-form stderr, not a bootstrap
        row = res["results"][t]
        metrics = TASKS[t].metrics
        out[t] = TaskResult(t, int(res["n-samples"][t]["effective"]), {m: _number(row[f"{m},none"]) for m in metrics},
                            {m: _number(row[f"{m}_stderr,none"]) for m in metrics}, time.perf_counter() - t0, limit)
        r = out[t]
        log.info("%s: %s over %d items (%.0fs)", t, ", ".join(f"{m} {v:.4f}±{r.stderr[m]:.4f}" for m, v in r.metrics.items()),
                 r.n, r.seconds)
    return out


def zeroshot_markdown(results: Sequence[tuple[str, Optional[float], dict[str, dict]]],
                      tasks: Sequence[str] = PAPER_TASKS, metric: str = "acc") -> str:
    """A table of zero-shot accuracy: a row per ``(label, storage bits or None, {task: TaskResult.to_dict()})``,
    a column per task (``metric`` ± its standard error, in percent), then the mean over the tasks.

    Raises:
        DataError: a row lacks one of ``tasks`` or its ``metric``, or two rows scored a task on different counts
            of items (the table would compare unlike things).
    """
    counts: dict[str, int] = {}
    for label, _, res in results:
        for t in tasks:
            if t not in res or metric not in res[t].get("metrics", {}):
                raise DataError(f"{label}: no {metric} for {t} (tasks scored: {', '.join(res) or 'none'})")
            if counts.setdefault(t, res[t]["n"]) != res[t]["n"]:
                raise DataError(f"{t}: {label} scored {res[t]['n']} items where an earlier row scored {counts[t]}")
    lines = ["| method | storage bits | " + " | ".join(tasks) + " | mean |",
             "|---|---:|" + "---:|" * (len(tasks) + 1)]
    for label, bits, res in results:
        accs = [100 * res[t]["metrics"][metric] for t in tasks]
        cells = [f"{a:.1f} ± {100 * res[t]['stderr'][metric]:.1f}" for a, t in zip(accs, tasks)]
        lines.append(f"| {label} | {'16' if bits is None else f'{bits:.3f}'} | " + " | ".join(cells)
                     + f" | {sum(accs) / len(accs):.1f} |")
    lines.append("")
    lines.append("Items scored per task: " + ", ".join(f"{t} {n}" for t, n in counts.items()) + ".")
    return "\n".join(lines) + "\n"
