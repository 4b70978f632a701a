"""Zero-shot scoring: log-likelihoods, acc / acc_norm, WinoGrande partial scoring, the local task files."""

import json
import math

import pytest
import torch

from billm.errors import DataError
from billm.eval.zeroshot import (
    PAPER_TASKS, Item, encode_pair, evaluate_task, load_task, loglikelihoods, multiple_choice, partial, score_items,
)

from conftest import tiny_config
from test_data import byte_tokenizer


@pytest.fixture(scope="module")
def lm():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.vocab_size = 260
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval(), byte_tokenizer()


def direct_ll(model, tok, ctx, cont):
    """log p(cont | ctx) by one unbatched forward over ctx + cont, token by token."""
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    k = tok(ctx + cont, add_special_tokens=False)["input_ids"][len(c):]
    ids = torch.tensor([c + k])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(lp[len(c) + j - 1, t]) for j, t in enumerate(k))


REQUESTS = [("The cat sat on the", " mat"), ("Question: 2+2?\nAnswer:", " 4"), ("short", " and a much longer continuation"),
            ("The cat sat on the", " hat"), ("x", " y")]


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_batched_loglikelihoods_equal_direct_computation(lm, batch_size):
    model, tok = lm
    got = loglikelihoods(model, tok, REQUESTS, batch_size=batch_size, progress=False)
    for (ctx, cont), (ll, greedy) in zip(REQUESTS, got):
        assert ll == pytest.approx(direct_ll(model, tok, ctx, cont), abs=1e-4)
        assert isinstance(greedy, bool)


def test_without_logits_to_keep_the_result_is_the_same(lm, monkeypatch):
    import billm.eval.zeroshot as zs

    model, tok = lm
    a = loglikelihoods(model, tok, REQUESTS, batch_size=4, progress=False)
    monkeypatch.setattr(zs, "_accepts_logits_to_keep", lambda m: False)
    b = loglikelihoods(model, tok, REQUESTS, batch_size=4, progress=False)
    for (x, _), (y, _) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5)


def test_trailing_context_space_moves_into_the_continuation():
    tok = byte_tokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"


def test_acc_and_acc_norm_on_known_scores():
    item = multiple_choice("Q", ["a", "bbbb"], gold=1)
    assert item.continuations == (" a", " bbbb")
    # raw: -2 > -4 picks "a" (wrong); per character: -2/1 < -4/4 picks "bbbb" (right)
    assert score_items([item], [-2.0, -4.0]) == [{"acc": 0.0, "acc_norm": 1.0}]
    assert score_items([item, item], [-5.0, -1.0, -1.0, -5.0]) == [{"acc": 1.0, "acc_norm": 1.0},
                                                                   {"acc": 0.0, "acc_norm": 0.0}]


def test_winogrande_partial_scoring(lm):
    model, tok = lm
    item = partial(["Anna helped Beth because Anna", "Anna helped Beth because Beth"], "needed help.", gold=1)
    assert item.continuations == (" needed help.", " needed help.")
    res = evaluate_task(model, tok, "winogrande", [item], progress=False)
    ll = [direct_ll(model, tok, c, " needed help.") for c in item.contexts]
    assert res.metrics["acc"] == float(max(range(2), key=lambda j: ll[j]) == 1)
    assert set(res.metrics) == {"acc"}  # the harness reports acc only for WinoGrande


def test_accuracy_matches_an_independent_computation(lm):
    model, tok = lm
    items = [multiple_choice(f"Item {i}: the answer is", ["red", "green", "a long blue one"], gold=i % 3) for i in range(6)]
    res = evaluate_task(model, tok, "arc_easy", items, batch_size=5, progress=False)
    right = []
    for it in items:
        ll = [direct_ll(model, tok, c, k) for c, k in zip(it.contexts, it.continuations)]
        right.append(float(max(range(3), key=lambda j: ll[j]) == it.gold))
    assert res.metrics["acc"] == pytest.approx(sum(right) / 6)
    p = sum(right) / 6
    if 0 < p < 1:  # the harness's standard error: sample std / sqrt(n)
        assert res.stderr["acc"] == pytest.approx(math.sqrt(p * (1 - p) * 6 / 5) / math.sqrt(6))


EXPECTED = {"piqa": (1838, 2), "boolq": (3270, 2), "openbookqa": (500, 4), "winogrande": (1267, 2),
            "arc_easy": (2376, 4), "arc_challenge": (1172, 4), "hellaswag": (10042, 4)}


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_local_task_files_load_in_harness_format(shared_data, task):
    items = load_task(task, shared_data)
    n, k = EXPECTED[task]
    assert len(items) == n
    assert all(len(it.choices) == k and 0 <= it.gold < k for it in items)
    first = items[0]
    if task in ("piqa", "arc_easy", "arc_challenge"):
        assert first.contexts[0].startswith("Question: ") and first.contexts[0].endswith("\nAnswer:")
    if task == "boolq":
        assert not first.contexts[0].startswith("Passage:") and first.contexts[0].endswith("?\nAnswer:")
        assert first.continuations == (" no", " yes")
    if task == "hellaswag":
        assert first.contexts[0].startswith("Roof shingle removal: A man is sitting on a roof.")
        assert not any("[" in c for it in items[:500] for c in it.choices)
    if task == "winogrande":
        assert first.contexts[0] != first.contexts[1] and first.continuations[0] == first.continuations[1]


def test_unknown_task_and_missing_data_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown zero-shot task"):
        load_task("mmlu_pro_max", tmp_path)
    monkeypatch.delenv("BILLM_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="no local copy"):
        load_task("piqa", tmp_path)  # offline in tests: the hub is unreachable


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
    assert "arc_easy" in capsys.readouterr().out


def test_harness_adapter_on_a_local_yaml_task(lm, tmp_path):
    pytest.importorskip("lm_eval")
    from billm.eval.harness import run_harness

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
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    res = run_harness(model, tok, ["billm_toy"], include_path=str(tmp_path), batch_size=4)
    ours = evaluate_task(model, tok, "billm_toy", [multiple_choice(d["question"], d["choices"], d["gold"]) for d in docs],
                         progress=False)
    assert res["billm_toy"]["acc"] == pytest.approx(ours.metrics["acc"])
    assert res["billm_toy"]["acc_norm"] == pytest.approx(ours.metrics["acc_norm"])


def test_cli_harness_flag_uses_the_harness(lm, tmp_path, capsys):
    pytest.importorskip("lm_eval")
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


def test_tight_logit_budget_gives_the_same_scores(lm):
    model, tok = lm
    a = loglikelihoods(model, tok, REQUESTS, batch_size=16, progress=False)
    b = loglikelihoods(model, tok, REQUESTS, batch_size=16, progress=False, max_logit_bytes=1)  # one request a batch
    for (x, gx), (y, gy) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5) and gx == gy
