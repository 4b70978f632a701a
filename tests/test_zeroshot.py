"""Zero-shot accuracy through lm-evaluation-harness: billm's local task configs against the harness's registered
tasks on the real items, an independent log-likelihood check, answer keys that must move the score, the device
move, errors, the CLI."""

import bz2
import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from billm.errors import DataError
from billm.eval.zeroshot import PAPER_TASKS, TASKS, load_tasks, registry, zeroshot

from conftest import byte_tokenizer, tiny_config

N = 5  # items a task: enough for several right and wrong answers, fast on a tiny model
# the agreement with the harness's own tasks: one task in the default run, every task with -m slow
AGREEMENT_TASKS = [t if t == "arc_easy" else pytest.param(t, marks=pytest.mark.slow) for t in PAPER_TASKS]


@pytest.fixture(scope="module")
def lm():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.vocab_size = 260
    cfg.max_position_embeddings = 4096  # BoolQ passages are long in bytes: no left truncation
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval(), byte_tokenizer()


# ----------------------------------------------------------------------------- the harness's registered tasks

def hub_rows(task, folder, n):
    """The first ``n`` local items in the Hugging Face dataset's own fields (what the registered task reads)."""
    if task == "hellaswag":  # raw lines: "activity: context", gold, 4 endings (the file keeps no ctx_a/ctx_b split)
        with bz2.open(folder / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[:6 * n]
        rows = []
        for i in range(0, 6 * n, 6):
            label, ctx = lines[i].split(": ", 1)
            rows.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": lines[i + 2:i + 6],
                         "label": lines[i + 1]})
        return rows
    local = TASKS[task].read(folder)[:n]
    if task == "piqa":
        return local
    if task == "boolq":
        out = []
        for r in local:
            passage, question = r["query"].removeprefix("Passage: ").split("\nQuestion: ")
            out.append({"passage": passage, "question": question.removesuffix("?"), "label": r["gold"]})
        return out
    if task == "winogrande":
        out = []
        for r in local:
            a, b = r["context_options"]
            k = 0
            while a[k] == b[k]:
                k += 1
            k = a.rfind(" ", 0, k) + 1  # the blank starts a word
            out.append({"sentence": a[:k] + "_ " + r["continuation"], "option1": a[k:], "option2": b[k:],
                        "answer": str(r["gold"] + 1)})
        return out
    labels = "ABCDE"
    out = []
    for r in local:
        choices = {"text": r["choices"], "label": list(labels[:len(r["choices"])])}
        if task == "openbookqa":
            out.append({"question_stem": r["query"], "choices": choices, "answerKey": labels[r["gold"]]})
        else:  # arc
            out.append({"question": r["query"].removeprefix("Question: "), "choices": choices,
                        "answerKey": labels[r["gold"]]})
    return out


@pytest.fixture(scope="module")
def registered():
    """The harness's own config of a task (its YAML, prompts and functions resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    index = registry(PAPER_TASKS).task_index
    return lambda name: load_yaml(index[name].yaml_path, resolve_func=True)


def registered_task(registered, task, rows):
    """The harness's registered task ``task`` over ``rows`` (hub fields) instead of the hub."""
    import datasets
    from lm_eval.tasks import TaskManager

    cfg = {**registered(task), "training_split": None, "validation_split": "validation", "test_split": None,
           "custom_dataset": lambda **_: datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})}
    return next(iter(TaskManager(include_defaults=False).load([cfg])["tasks"].values()))


def requests_and_golds(task_obj, n):
    task_obj.build_all_requests(limit=n)
    reqs = [tuple(inst.arguments) for inst in task_obj.instances]
    docs = list(task_obj.eval_docs)[:n]
    golds = [task_obj.doc_to_text(d) if task_obj.multiple_input else task_obj.doc_to_target(d) for d in docs]
    return reqs, golds


@pytest.mark.parametrize("task", AGREEMENT_TASKS)
def test_local_config_asks_the_registered_tasks_requests(shared_data, registered, task):
    """Same (context, continuation) pairs and answer keys as the harness's own task definition."""
    folder = TASKS[task].local_folder(shared_data)
    ours = requests_and_golds(load_tasks([task], shared_data)[task], N)
    theirs = requests_and_golds(registered_task(registered, task, hub_rows(task, folder, N)), N)
    assert len(ours[0]) >= 2 * N
    assert ours == theirs


@pytest.mark.parametrize("task", AGREEMENT_TASKS)
def test_billm_accuracy_equals_the_harness_on_the_same_items(lm, shared_data, registered, task):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = lm
    ours = zeroshot(model, tok, [task], limit=N, data_dir=shared_data, batch_size=4)[task]
    folder = TASKS[task].local_folder(shared_data)
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4),
                                     tasks=[registered_task(registered, task, hub_rows(task, folder, N))], limit=N,
                                     task_manager=TaskManager(include_defaults=False), log_samples=False)
    row = theirs["results"][task]
    assert ours.n == N and set(ours.metrics) == set(TASKS[task].metrics)
    for m in ours.metrics:
        assert ours.metrics[m] == pytest.approx(row[f"{m},none"])
        assert ours.stderr[m] == pytest.approx(row[f"{m}_stderr,none"])


EXPECTED = {"piqa": (1838, 2), "boolq": (3270, 2), "openbookqa": (500, 4), "winogrande": (1267, 2),
            "arc_easy": (2376, 4), "arc_challenge": (1172, 4), "hellaswag": (10042, 4)}


def test_every_local_item_loads(shared_data, monkeypatch):
    monkeypatch.setenv("BILLM_DATA_DIR", str(shared_data))  # found through the environment, in its zeroshot/ folder
    loaded = load_tasks(PAPER_TASKS)
    for task, (n, k) in EXPECTED.items():
        docs = loaded[task].eval_docs
        assert len(docs) == n, task
        assert all(len(loaded[task].doc_to_choice(d)) == k for d in list(docs)[:200]), task
    first = loaded["hellaswag"].doc_to_text(loaded["hellaswag"].eval_docs[0])
    assert first.startswith("Roof shingle removal: A man is sitting on a roof.")
    assert not any("[" in c for d in list(loaded["hellaswag"].eval_docs)[:500] for c in d["choices"])


# ----------------------------------------------------------------------------- an independent scorer

def direct_ll(model, tok, ctx, cont):
    """log p(cont | ctx) by one unbatched forward over ctx + cont."""
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    k = tok(ctx + cont, add_special_tokens=False)["input_ids"][len(c):]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([c + k])).logits[0].double(), dim=-1)
    return sum(float(lp[len(c) + j - 1, t]) for j, t in enumerate(k))


def picks(model, tok, rows):
    """Per ARC item: the choice of highest log-likelihood, and of highest log-likelihood per character."""
    out = []
    for r in rows:
        ll = [direct_ll(model, tok, r["query"] + "\nAnswer:", " " + c) for c in r["choices"]]
        norm = [x / len(c) for x, c in zip(ll, r["choices"])]
        out.append((max(range(len(ll)), key=ll.__getitem__), max(range(len(ll)), key=norm.__getitem__)))
    return out


def test_accuracy_matches_an_independent_computation_and_follows_the_answer_key(lm, shared_data, tmp_path):
    model, tok = lm
    rows = TASKS["arc_easy"].read(TASKS["arc_easy"].local_folder(shared_data))[:6]
    pick = picks(model, tok, rows)
    res = zeroshot(model, tok, ["arc_easy"], data_dir=shared_data, limit=6, batch_size=3)["arc_easy"]
    assert res.metrics["acc"] == pytest.approx(sum(p == r["gold"] for (p, _), r in zip(pick, rows)) / 6)
    assert res.metrics["acc_norm"] == pytest.approx(sum(p == r["gold"] for (_, p), r in zip(pick, rows)) / 6)
    acc = res.metrics["acc"]
    if 0 < acc < 1:  # the harness's standard error: sample std / sqrt(n)
        assert res.stderr["acc"] == pytest.approx(math.sqrt(acc * (1 - acc) * 6 / 5) / math.sqrt(6))

    def with_key(key):
        (tmp_path / "arc_easy.jsonl").write_text("".join(json.dumps({**r, "gold": key(p)}) + "\n"
                                                         for r, (p, _) in zip(rows, pick)))
        return zeroshot(model, tok, ["arc_easy"], data_dir=tmp_path, batch_size=3)["arc_easy"]

    assert with_key(lambda p: p).metrics["acc"] == 1.0
    assert with_key(lambda p: (p + 1) % 4).metrics["acc"] == 0.0


def test_winogrande_partial_scoring_is_independent_of_a_shared_context(lm, tmp_path):
    """Two contexts, one continuation: the continuation's likelihood after each decides."""
    model, tok = lm
    ctxs, cont = ["Anna helped Beth because Anna", "Anna helped Beth because Beth"], "needed help."
    best = max(range(2), key=lambda j: direct_ll(model, tok, ctxs[j], " " + cont))
    for gold, acc in ((best, 1.0), (1 - best, 0.0)):
        (tmp_path / "winogrande.jsonl").write_text(json.dumps({"context_options": ctxs, "continuation": cont,
                                                               "gold": gold}) + "\n")
        res = zeroshot(model, tok, ["winogrande"], data_dir=tmp_path)["winogrande"]
        assert res.n == 1 and res.metrics == {"acc": acc} and math.isnan(res.stderr["acc"])


# ----------------------------------------------------------------------------- device, errors, CLI

def test_the_model_is_moved_to_the_device(lm, shared_data, monkeypatch):
    model, tok = lm
    moves = []
    original = model.to
    monkeypatch.setattr(model, "to", lambda *a, **k: moves.append(a) or original(*a, **k), raising=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = zeroshot(model, tok, ["openbookqa"], limit=2, data_dir=shared_data, device=device)
    assert moves and torch.device(moves[0][0]).type == device
    assert next(model.parameters()).device.type == device and res["openbookqa"].n == 2
    model.to("cpu")


def test_unknown_task_and_missing_data_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown zero-shot task"):
        load_tasks(["mmlu_pro_max"], tmp_path)
    monkeypatch.delenv("BILLM_DATA_DIR", raising=False)
    import datasets
    import huggingface_hub

    # offline in tests (the hub is unreachable), also where datasets was imported before the environment said so
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no local copy"):
        load_tasks(["piqa"], tmp_path)  # offline in tests: the hub is unreachable


def test_cli_eval_reports_accuracy(lm, shared_data, tmp_path, capsys):
    from billm.cli import main

    model, tok = lm
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "r.json"
    assert main(["eval", str(folder), "--tasks", "arc_easy,winogrande", "--limit", "6", "--data-dir", str(shared_data),
                 "--json", str(out)]) == 0
    d = json.loads(out.read_text())["zeroshot"]
    assert set(d) == {"arc_easy", "winogrande"}
    assert d["arc_easy"]["n"] == 6 and set(d["arc_easy"]["metrics"]) == {"acc", "acc_norm"}
    assert set(d["winogrande"]["metrics"]) == {"acc"}
    assert "arc_easy" in capsys.readouterr().out


def test_harness_adapter_on_a_local_yaml_task(lm, tmp_path):
    from billm.eval.harness import harness_lm, run_harness

    model, tok = lm
    docs = [{"question": f"Item {i}: the answer is", "choices": ["red", "green", "a long blue one"], "gold": i % 3}
            for i in range(8)]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "toy.yaml").write_text(
        "task: billm_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'toy.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n")
    res = run_harness(harness_lm(model, tok, batch_size=4), ["billm_toy"], include_path=str(tmp_path))
    right = []
    for d in docs:
        ll = [direct_ll(model, tok, d["question"], " " + c) for c in d["choices"]]
        right.append(max(range(3), key=ll.__getitem__) == d["gold"])
    assert res["billm_toy"]["acc"] == pytest.approx(sum(right) / 8)


def test_cli_harness_flag_uses_the_harness(lm, tmp_path, capsys):
    from billm.cli import main

    model, tok = lm
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    docs = [{"q": f"Colour {i} is", "c": ["red", "green"], "g": i % 2} for i in range(4)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "t.yaml").write_text(
        f"task: billm_cli_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 't.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\n"
        "doc_to_target: '{{g}}'\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "h.json"
    assert main(["eval", str(folder), "--harness", "--tasks", "billm_cli_toy", "--include-path", str(tmp_path),
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())["harness"]["billm_cli_toy"]
    assert 0.0 <= res["acc"] <= 1.0 and "acc_stderr" in res


def test_cli_unknown_task_lists_both_kinds_before_loading(tmp_path, capsys):
    from billm.cli import main

    assert main(["eval", str(tmp_path / "never-loaded"), "--tasks", "mmlu_pro"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'mmlu_pro'" in err and "wikitext2" in err and "hellaswag" in err


def _scored(n, acc, stderr=0.02):
    return {"task": "t", "n": n, "metrics": {"acc": acc}, "stderr": {"acc": stderr}, "seconds": 1.0, "limit": n}


def test_zeroshot_table_rows_columns_and_mean():
    from billm.eval.zeroshot import zeroshot_markdown

    rows = [("fp", None, {"piqa": _scored(500, 0.70), "boolq": _scored(500, 0.60)}),
            ("billm", 1.409, {"piqa": _scored(500, 0.55, 0.0222), "boolq": _scored(500, 0.40)})]
    text = zeroshot_markdown(rows, ("piqa", "boolq"))
    lines = text.splitlines()
    assert lines[0] == "| method | storage bits | piqa | boolq | mean |"
    assert lines[2] == "| fp | 16 | 70.0 ± 2.0 | 60.0 ± 2.0 | 65.0 |"
    assert lines[3] == "| billm | 1.409 | 55.0 ± 2.2 | 40.0 ± 2.0 | 47.5 |"
    assert "piqa 500, boolq 500" in text


def test_zeroshot_table_refuses_missing_tasks_and_unequal_counts():
    from billm.eval.zeroshot import zeroshot_markdown

    with pytest.raises(DataError, match="billm: no acc for boolq"):
        zeroshot_markdown([("billm", 1.4, {"piqa": _scored(5, 0.5)})], ("piqa", "boolq"))
    with pytest.raises(DataError, match="piqa: b scored 4 items where an earlier row scored 5"):
        zeroshot_markdown([("a", None, {"piqa": _scored(5, 0.5)}), ("b", 1.0, {"piqa": _scored(4, 0.5)})], ("piqa",))


def test_zeroshot_table_script_prints_the_table_and_fails_clearly(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "zeroshot_table.py"
    res = {t: _scored(7, 0.5) for t in PAPER_TASKS}
    (tmp_path / "fp.json").write_text(json.dumps({"model": "m", "zeroshot": res}))
    (tmp_path / "q.json").write_text(json.dumps({"model": "ck", "storage_bits": 1.25, "zeroshot": res}))
    run = subprocess.run([sys.executable, str(script), f"fp={tmp_path / 'fp.json'}", f"billm:tiny={tmp_path / 'q.json'}"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "| fp | 16 | 50.0 ± 2.0 |" in run.stdout and "| billm:tiny | 1.250 |" in run.stdout
    (tmp_path / "short.json").write_text(json.dumps({"zeroshot": {"piqa": _scored(7, 0.5)}}))
    bad = subprocess.run([sys.executable, str(script), f"x={tmp_path / 'short.json'}", f"y={tmp_path / 'none.json'}"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "none.json" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, str(script), f"x={tmp_path / 'short.json'}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "x: no acc for boolq" in bad.stderr
