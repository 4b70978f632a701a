"""Zero-shot multiple-choice accuracy, scored as lm-evaluation-harness scores it.

Each item is a few (context, continuation) requests, one per choice. The score of a choice is the
summed log-likelihood of its continuation's tokens given the context; ``acc`` takes the argmax,
``acc_norm`` the argmax after dividing by the choice's length in characters (the harness's
``acc_norm``; equal to bytes on these ASCII datasets). WinoGrande uses *partial scoring*: the
choices are two contexts (the sentence up to the blank, filled with each option) and the score
is the log-likelihood of the shared rest of the sentence after each. Standard errors are the
sample standard deviation over items divided by sqrt(n), as the harness reports them.

Prompts follow the harness's task definitions (``lm_eval/tasks/*``): PIQA
``"Question: {goal}\\nAnswer:"`` + ``" " + solution``; ARC ``"Question: {question}\\nAnswer:"``;
BoolQ ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` + ``" no"/" yes"``; OpenBookQA the
question stem; HellaSwag ``"{activity}: {ctx_a} {Ctx_b}"`` cleaned of WikiHow brackets. Token
splitting follows the harness too: context and context+continuation are encoded without special
tokens, trailing context spaces move into the continuation, and the continuation's tokens are
the tail of the joint encoding.
"""

from __future__ import annotations

import bz2
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    Attributes:
        contexts: the context of each choice (one shared context repeated, or one per choice for
            partial scoring).
        continuations: the scored text of each choice (with its leading space).
        choices: the choice strings whose lengths ``acc_norm`` divides by.
        gold: index of the right choice.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int


def multiple_choice(context: str, choices: Sequence[str], gold: int) -> Item:
    """A shared context and ``" " + choice`` continuations (the harness's default delimiter)."""
    return Item(tuple([context] * len(choices)), tuple(" " + c for c in choices), tuple(choices), int(gold))


def partial(contexts: Sequence[str], continuation: str, gold: int) -> Item:
    """Partial scoring (WinoGrande): one context per choice, the same continuation after each."""
    return Item(tuple(contexts), tuple([" " + continuation] * len(contexts)), tuple(contexts), int(gold))


# ----------------------------------------------------------------------------- tasks and data

def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _local_query(path: Path, fix: Callable[[str], str]) -> list[Item]:
    return [multiple_choice(fix(r["query"]), r["choices"], r["gold"]) for r in _jsonl(path)]


def _local_piqa(folder: Path) -> list[Item]:
    docs = _jsonl(folder / "piqa_valid.jsonl")
    labels = [int(x) for x in (folder / "piqa_valid-labels.lst").read_text().split()]
    if len(labels) != len(docs):
        raise DataError(f"{folder}: {len(docs)} PIQA items but {len(labels)} labels")
    return [multiple_choice(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], y) for d, y in zip(docs, labels)]


def _local_boolq(folder: Path) -> list[Item]:
    def fix(q: str) -> str:
        return (q[len("Passage: "):] if q.startswith("Passage: ") else q) + "\nAnswer:"

    return _local_query(folder / "boolq.jsonl", fix)


def _local_winogrande(folder: Path) -> list[Item]:
    return [partial(r["context_options"], r["continuation"], r["gold"]) for r in _jsonl(folder / "winogrande.jsonl")]


def _local_hellaswag(folder: Path) -> list[Item]:
    with bz2.open(folder / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    items = []
    for i in range(0, len(lines) - 5, 6):
        ctx, gold, endings = lines[i], lines[i + 1], lines[i + 2:i + 6]
        items.append(multiple_choice(_hellaswag_clean(ctx), [_hellaswag_clean(e) for e in endings], int(gold)))
    return items


def _hf_arc(r: dict) -> Item:
    return multiple_choice(f"Question: {r['question']}\nAnswer:", r["choices"]["text"],
                           r["choices"]["label"].index(r["answerKey"]))


def _hf_hellaswag(r: dict) -> Item:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return multiple_choice(_hellaswag_clean(r["activity_label"] + ": " + ctx), [_hellaswag_clean(e) for e in r["endings"]],
                           int(r["label"]))


def _hf_winogrande(r: dict) -> Item:
    idx = r["sentence"].index("_")
    return partial([r["sentence"][:idx] + o for o in (r["option1"], r["option2"])], r["sentence"][idx + 1:].strip(),
                   {"1": 0, "2": 1}[r["answer"]])


@dataclass(frozen=True)
class Task:
    """A zero-shot task: its metrics, where its local copy is, and its Hugging Face source."""

    name: str
    metrics: tuple[str, ...]
    local_files: tuple[str, ...]
    from_local: Callable[[Path], list[Item]]
    hf: tuple[str, Optional[str], str]  # (dataset path, config name, split)
    from_hf: Callable[[dict], Item]


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("piqa", ("acc", "acc_norm"), ("piqa_valid.jsonl", "piqa_valid-labels.lst"), _local_piqa,
         ("baber/piqa", None, "validation"),
         lambda r: multiple_choice(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"])),
    Task("boolq", ("acc",), ("boolq.jsonl",), _local_boolq, ("aps/super_glue", "boolq", "validation"),
         lambda r: multiple_choice(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], r["label"])),
    Task("openbookqa", ("acc", "acc_norm"), ("openbook_qa.jsonl",),
         lambda d: _local_query(d / "openbook_qa.jsonl", lambda q: q), ("allenai/openbookqa", "main", "test"),
         lambda r: multiple_choice(r["question_stem"], r["choices"]["text"],
                                   r["choices"]["label"].index(r["answerKey"].lstrip()))),
    Task("winogrande", ("acc",), ("winogrande.jsonl",), _local_winogrande,
         ("allenai/winogrande", "winogrande_xl", "validation"), _hf_winogrande),
    Task("arc_easy", ("acc", "acc_norm"), ("arc_easy.jsonl",),
         lambda d: _local_query(d / "arc_easy.jsonl", lambda q: q + "\nAnswer:"), ("allenai/ai2_arc", "ARC-Easy", "test"),
         _hf_arc),
    Task("arc_challenge", ("acc", "acc_norm"), ("arc_challenge.jsonl",),
         lambda d: _local_query(d / "arc_challenge.jsonl", lambda q: q + "\nAnswer:"),
         ("allenai/ai2_arc", "ARC-Challenge", "test"), _hf_arc),
    Task("hellaswag", ("acc", "acc_norm"), ("hellaswag_val_full.txt.bz2",), _local_hellaswag,
         ("Rowan/hellaswag", None, "validation"), _hf_hellaswag),
]}

#: The seven tasks BiLLM's paper reports, in its order.
PAPER_TASKS = ("piqa", "boolq", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag")


def load_task(name: str, data_dir: Optional[str | os.PathLike] = None) -> list[Item]:
    """The items of task ``name``: local copies first (``data_dir`` or ``$BILLM_DATA_DIR``, directly
    or in its ``zeroshot/`` folder), else the Hugging Face dataset.

    Raises:
        DataError: unknown task, or no local copy and the hub is unreachable.
    """
    if name not in TASKS:
        raise DataError(f"unknown zero-shot task {name!r}; known: {', '.join(TASKS)}")
    task = TASKS[name]
    root = data_dir or os.environ.get("BILLM_DATA_DIR")
    if root:
        for folder in (Path(root) / "zeroshot", Path(root)):
            if all((folder / f).is_file() for f in task.local_files):
                return task.from_local(folder)
    try:
        import datasets

        path, config, split = task.hf
        ds = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # offline, missing dataset, ...
        where = f" in {root} or {Path(root) / 'zeroshot'}" if root else " (no --data-dir / $BILLM_DATA_DIR given)"
        raise DataError(f"zero-shot task {name}: no local copy ({', '.join(task.local_files)}){where}, and the "
                        f"Hugging Face dataset {task.hf[0]} could not be loaded: {type(e).__name__}: {e}") from e
    return [task.from_hf(r) for r in ds]


# ----------------------------------------------------------------------------- scoring

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) the harness way: encode both jointly, split at the context's length."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _batches(order: list[int], enc: list[tuple[list[int], list[int]]], batch_size: int, vocab: int,
             max_logit_bytes: int) -> list[list[int]]:
    """Group length-sorted requests into batches of at most ``batch_size`` whose kept logits fit the budget."""
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_pos: set[int] = set()
    for i in order:
        inp, cont = enc[i]
        pos = set(range(len(inp) - len(cont), len(inp)))
        union = cur_pos | pos
        if cur and (len(cur) == batch_size or (len(cur) + 1) * len(union) * vocab * 4 > max_logit_bytes):
            batches.append(cur)
            cur, union = [], pos
        cur.append(i)
        cur_pos = union
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def loglikelihoods(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                   device: Any = None, max_length: Optional[int] = None, progress: bool = True,
                   max_logit_bytes: int = 512 * 2**20) -> list[tuple[float, bool]]:
    """Summed log-likelihood of each continuation given its context, and whether it is the greedy output.

    Requests are deduplicated, sorted longest first and batched with right padding (no attention
    mask is needed: a causal model never looks right). When the model accepts ``logits_to_keep``
    only the positions that score some continuation of the batch go through the output head, and
    batches are cut so those logits stay within ``max_logit_bytes``.

    Returns:
        One ``(loglikelihood, is_greedy)`` per request, in order.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if max_length is None:
        from .perplexity import max_positions

        max_length = max_positions(getattr(model, "config", None)) or 2048
    uniq = list(dict.fromkeys(requests))
    enc = []
    for ctx, cont in uniq:
        if not ctx:
            raise DataError("an empty context cannot be scored (the harness prefixes an end-of-text token; not supported)")
        c_ids, k_ids = encode_pair(tokenizer, ctx, cont)
        if not k_ids:
            raise DataError(f"continuation {cont!r} encodes to no tokens")
        full = (c_ids + k_ids)[-(max_length + 1):]
        enc.append((full[:-1], k_ids))
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))
    keep_ok = _accepts_logits_to_keep(model)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 50_000)
    out: dict[int, tuple[float, bool]] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = _batches(order, enc, batch_size, vocab, max_logit_bytes if keep_ok else 2**62)
    for batch in tqdm(batches, desc="log-likelihoods", unit="batch", disable=not progress):
        width = len(enc[batch[0]][0])
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, :len(enc[i][0])] = torch.tensor(enc[i][0])
        if keep_ok:  # only the positions some continuation is scored at
            keep = sorted({p for i in batch for p in range(len(enc[i][0]) - len(enc[i][1]), len(enc[i][0]))})
            column = {p: k for k, p in enumerate(keep)}
            logits = model(ids.to(device), logits_to_keep=torch.tensor(keep, device=device)).logits  # (B, kept, V)
        else:
            column = {p: p for p in range(width)}
            logits = model(ids.to(device)).logits  # (B, width, V)
        for r, i in enumerate(batch):
            inp, cont = enc[i]
            cols = torch.tensor([column[p] for p in range(len(inp) - len(cont), len(inp))], device=logits.device)
            lp = torch.log_softmax(logits[r, cols].float(), dim=-1)  # (len(cont), vocab)
            target = torch.tensor(cont, device=lp.device)
            ll = float(lp.gather(1, target[:, None]).sum())
            greedy = bool((lp.argmax(dim=-1) == target).all())
            out[i] = (ll, greedy)
    index = {req: i for i, req in enumerate(uniq)}
    return [out[index[req]] for req in requests]


def _stderr(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


@dataclass
class TaskResult:
    """Accuracy of one task: ``metrics[name] = value``, ``stderr[name]``; ``n`` items scored."""

    task: str
    n: int
    metrics: dict[str, float]
    stderr: dict[str, float]
    seconds: float
    limit: Optional[int] = None
    per_item: list[dict[str, float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """JSON-able form (without the per-item scores)."""
        d = asdict(self)
        d.pop("per_item")
        return d


def score_items(items: Sequence[Item], lls: Sequence[float]) -> list[dict[str, float]]:
    """Per-item ``acc`` and ``acc_norm`` from the choices' log-likelihoods (flattened in item order)."""
    out, k = [], 0
    for it in items:
        ll = list(lls[k:k + len(it.choices)])
        k += len(it.choices)
        pred = max(range(len(ll)), key=lambda j: ll[j])
        norm = [ll[j] / max(1, len(it.choices[j])) for j in range(len(ll))]
        pred_norm = max(range(len(ll)), key=lambda j: norm[j])
        out.append({"acc": float(pred == it.gold), "acc_norm": float(pred_norm == it.gold)})
    return out


def evaluate_task(model: nn.Module, tokenizer, task: str, items: Sequence[Item], batch_size: int = 16,
                  device: Any = None, limit: Optional[int] = None, progress: bool = True) -> TaskResult:
    """Score ``items`` (the first ``limit`` of them) of ``task`` and aggregate its metrics."""
    t0 = time.perf_counter()
    items = list(items)[:limit] if limit else list(items)
    if not items:
        raise DataError(f"zero-shot task {task}: no items to score")
    requests = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
    was_training = model.training
    model.eval()
    try:
        lls = [ll for ll, _ in loglikelihoods(model, tokenizer, requests, batch_size, device, progress=progress)]
    finally:
        model.train(was_training)
    per = score_items(items, lls)
    metrics = TASKS[task].metrics if task in TASKS else ("acc", "acc_norm")
    vals = {m: sum(p[m] for p in per) / len(per) for m in metrics}
    errs = {m: _stderr([p[m] for p in per]) for m in metrics}
    return TaskResult(task, len(items), vals, errs, time.perf_counter() - t0, limit, per)


def zeroshot(model: nn.Module, tokenizer, tasks: Sequence[str] = PAPER_TASKS, limit: Optional[int] = None,
             data_dir: Optional[str | os.PathLike] = None, batch_size: int = 16, device: Any = None,
             progress: bool = True) -> dict[str, TaskResult]:
    """Zero-shot accuracy of ``model`` on ``tasks`` (names in :data:`TASKS`), the first ``limit`` items of each."""
    items = {t: load_task(t, data_dir) for t in tasks}  # all data first: a missing task fails before any scoring
    out = {}
    for t in tasks:
        out[t] = evaluate_task(model, tokenizer, t, items[t], batch_size, device, limit, progress)
        r = out[t]
        log.info("%s: %s over %d items (%.0fs)", t, ", ".join(f"{m} {v:.4f}±{r.stderr[m]:.4f}" for m, v in r.metrics.items()),
                 r.n, r.seconds)
    return out
