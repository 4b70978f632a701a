"""The billm command line on a tiny model saved as a normal Hugging Face folder."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import billm
from billm.cli import main
from billm.resume import source_revision


def test_quantize_eval_inspect(tiny_folder, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_folder), "--calib", "pydoc", "--nsamples", "4", "--seqlen", "32", "--out", str(out),
               "--eval", "pydoc", "--eval-seqlen", "64", "--max-windows", "2", "--quiet"])
    assert rc == 0
    assert (out / "config.json").exists() and (out / "billm_report.json").exists()
    report = json.loads((out / "billm_report.json").read_text())
    q = report["quantization"]
    assert q["config"]["method"] == "billm" and len(q["layers"]) == 14
    assert 1 < q["weight_bits"] < 2
    ppl_at_quantize = report["eval"]["pydoc"]["ppl"]
    # The packed checkpoint evaluates to the same perplexity as the in-memory quantized model.
    assert (out / "billm_quant.json").exists() and (out / "model.safetensors").exists()
    j = tmp_path / "ppl.json"
    assert main(["eval", str(out), "--tasks", "pydoc", "--seqlen", "64", "--max-windows", "2", "--json", str(j)]) == 0
    evaluated = json.loads(j.read_text())
    again = evaluated["perplexity"]["pydoc"]["ppl"]
    assert again == pytest.approx(ppl_at_quantize, rel=1e-5)
    # a checkpoint's evaluation records its bits, measured from the file as inspect measures them
    assert evaluated["storage_bits"] == pytest.approx(q["storage_bits"]) and 1 < evaluated["weight_bits"] < 2
    capsys.readouterr()
    ij = tmp_path / "inspect.json"
    assert main(["inspect", str(out), "--json", str(ij)]) == 0
    text = capsys.readouterr().out
    assert "self_attn.q_proj" in text and "storage bits measured from the file" in text and "fp16" in text
    info = json.loads(ij.read_text())
    assert info["file_bytes"] == (out / "model.safetensors").stat().st_size
    assert info["file_bytes"] < info["fp16_bytes"]
    # file-measured storage bits are exactly the ones the quantize report gave (one definition: bytes)
    assert [l["storage_bits"] for l in info["layers"]] == [l["storage_bits"] for l in q["layers"]]
    assert info["storage_bits"] == pytest.approx(q["storage_bits"])
    assert main(["generate", str(out), "def f(", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def f(")
    # every multiplication from the packed bits (lookup tables) gives the same perplexity to float rounding
    j2 = tmp_path / "ppl-lut.json"
    assert main(["eval", str(out), "--tasks", "pydoc", "--seqlen", "64", "--max-windows", "2", "--json", str(j2),
                 "--kernel", "lut"]) == 0
    assert json.loads(j2.read_text())["perplexity"]["pydoc"]["ppl"] == pytest.approx(again, rel=1e-4)


def test_slim_from_the_command_line(tiny_folder, tmp_path):
    out = tmp_path / "s"
    assert main(["quantize", str(tiny_folder), "--method", "slim", "--bits", "3", "--groupsize", "16", "--calib", "pydoc",
                 "--nsamples", "2", "--seqlen", "32", "--out", str(out), "--quiet"]) == 0
    q = json.loads((out / "billm_report.json").read_text())["quantization"]
    assert q["config"]["method"] == "slim" and q["weight_bits"] == pytest.approx(3.0)
    assert all(set(l["info"]["group_bits"]) <= {2, 3, 4} for l in q["layers"])
    assert main(["quantize", str(tiny_folder), "--method", "slim", "--bits", "1", "--calib", "pydoc", "--nsamples", "2",
                 "--seqlen", "32", "--out", str(tmp_path / "s1"), "--quiet"]) == 2  # 1-bit average: groups would need 0 bits


def test_presets_and_options_reach_the_config(tiny_folder, tmp_path):
    out = tmp_path / "p"
    assert main(["quantize", str(tiny_folder), "--calib", "pydoc", "--nsamples", "2", "--seqlen", "32", "--out", str(out),
                 "--preset", "paper", "--exclude", "*.down_proj", "--blocksize", "32", "--quiet"]) == 0
    cfg = json.loads((out / "billm_report.json").read_text())["quantization"]["config"]
    assert cfg["search_domain"] == "weight" and cfg["blocksize"] == 32 and cfg["exclude"] == ["*.down_proj"]


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    rc = main(["eval", str(tmp_path / "no-such-model"), "--tasks", "pydoc"])
    assert rc == 2
    assert "could not load model" in capsys.readouterr().err


def test_too_little_calibration_text_is_a_clear_error(tiny_folder, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("only a few words here")
    rc = main(["quantize", str(tiny_folder), "--calib", str(small), "--nsamples", "4", "--seqlen", "64",
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "billm: error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_refuses_to_overwrite_a_folder_that_is_not_a_billm_output(tiny_folder, tmp_path, capsys):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    rc = main(["quantize", str(tiny_folder), "--calib", "pydoc", "--nsamples", "2", "--seqlen", "32",
               "--out", str(precious)])
    assert rc == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("argv,msg", [
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--nsamples", "0"], "argument --nsamples: must be >= 1, got 0"),
    (["--seqlen", "1"], "argument --seqlen: must be >= 2, got 1"),
    (["--nsamples", "many"], "argument --nsamples: an integer, got 'many'"),
], ids=["batch-size", "nsamples", "seqlen", "not-a-number"])
def test_bad_numbers_fail_while_parsing(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "o")] + argv)
    assert exit_.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_bad_device_fails_before_loading(tmp_path, capsys):
    dev = "cuda" if not torch.cuda.is_available() else "nonsense"
    rc = main(["quantize", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "o"), "--device", dev])
    assert rc == 2 and "--device" in capsys.readouterr().err


def test_several_devices_only_where_the_work_spreads(tmp_path, capsys):
    rc = main(["eval", str(tmp_path / "never-loaded"), "--device", "cpu,cpu"])
    assert rc == 2 and "one device here" in capsys.readouterr().err


def test_baseline_methods_from_the_command_line(tiny_folder, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["quantize", str(tiny_folder), "--method", "gptq", "--bits", "3", "--groupsize", "32", "--act-order",
                 "--calib", "pydoc", "--nsamples", "2", "--seqlen", "32", "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "billm_report.json").read_text())["quantization"]["config"]
    assert (cfg["method"], cfg["bits"], cfg["groupsize"], cfg["act_order"]) == ("gptq", 3, 32, True)
    rc = main(["quantize", str(tiny_folder), "--method", "rtn", "--search-domain", "weight", "--out", str(tmp_path / "r")])
    assert rc == 2 and "--search-domain do not apply to --method rtn" in capsys.readouterr().err


def test_compare_writes_table_json_and_plot(tiny_folder, tmp_path):
    out = tmp_path / "cmp"
    rc = main(["compare", str(tiny_folder), "--methods", "fp,rtn:w2,gptq:w3g32,sign,pbllm,billm", "--tasks", "pydoc",
               "--calib", "pydoc", "--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "64", "--max-windows", "2",
               "--out", str(out)])
    assert rc == 0
    d = json.loads((out / "compare.json").read_text())
    assert d["command"].startswith("billm compare ") and "--methods fp,rtn:w2" in d["command"]
    specs = [r["spec"] for r in d["rows"]]
    assert specs == ["fp", "rtn:w2", "gptq:w3g32", "sign", "pbllm", "billm"]
    by = {r["spec"]: r for r in d["rows"]}
    assert by["fp"]["storage_bits"] == 16
    assert by["billm"]["storage_bits"] > by["billm"]["weight_bits"]
    # a random tiny model has no quality to lose; check each method really changed the weights
    assert len({round(r["ppl"]["pydoc"], 6) for r in d["rows"]}) == len(specs)
    md = (out / "compare.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 6 and "| billm |" in md
    rev = source_revision()  # the commit of this checkout; "" where billm is not a git checkout
    assert {r["revision"] for r in d["rows"]} == {rev}
    assert md.endswith(f"Measured by billm at `{rev}` (6 of 6 rows).\n" if rev else "|\n")
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000



def test_pareto_measures_storage_from_the_files_and_marks_the_front(tiny_folder, tmp_path):
    out, kept = tmp_path / "pareto", tmp_path / "ckpts"
    rc = main(["pareto", str(tiny_folder), "--methods", "fp,rtn:w2,gptq:w3g32,billm", "--tasks", "pydoc",
               "--calib", "pydoc", "--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "64", "--max-windows", "2",
               "--out", str(out), "--keep-checkpoints", str(kept)])
    assert rc == 0
    rows = {r["spec"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert not rows["fp"]["from_file"] and all(rows[s]["from_file"] for s in ("rtn:w2", "gptq:w3g32", "billm"))
    for spec, folder in (("rtn:w2", "rtn-w2-seed0"), ("billm", "billm-seed0")):
        assert rows[spec]["storage_bits"] == pytest.approx(billm.inspect_checkpoint(kept / folder).storage_bits, abs=0)
        # the row names the bytes it evaluated
        assert rows[spec]["weights_sha256"] == hashlib.sha256((kept / folder / "model.safetensors").read_bytes()).hexdigest()
    assert rows["fp"]["weights_sha256"] == "" and rows["rtn:w2"]["weights_sha256"] != rows["billm"]["weights_sha256"]
    assert {r["threads"] for r in rows.values()} == {torch.get_num_threads()}
    table = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("|")][2:]
    bits = [float(line.split("|")[3]) for line in table]
    assert bits == sorted(bits) and sum("| yes |" in line for line in table) >= 1
    front = [line.split("|")[1].strip() for line in table if "| yes |" in line]
    by_bits = sorted(rows.values(), key=lambda r: r["storage_bits"])
    best = [r["spec"] for i, r in enumerate(by_bits) if all(r["ppl"]["pydoc"] < o["ppl"]["pydoc"] for o in by_bits[:i])]
    assert front == best  # the rows beating every row of fewer bits
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_reads_finished_rows_back_and_measures_again_when_the_protocol_changes(tiny_folder, tmp_path,
                                                                                    monkeypatch):
    import sys

    out = tmp_path / "cmp"
    argv = ["compare", str(tiny_folder), "--methods", "fp,rtn:w2,billm", "--tasks", "pydoc", "--calib", "pydoc",
            "--nsamples", "2", "--seqlen", "32", "--eval-seqlen", "64", "--max-windows", "2", "--out", str(out)]
    assert main(argv) == 0
    first = json.loads((out / "compare.json").read_text())["rows"]
    assert sorted(p.name for p in (out / "jobs").iterdir()) == ["billm-seed0", "fp-seed0", "rtn-w2-seed0"]
    assert not any((out / "jobs" / j / "progress").exists() for j in ("billm-seed0", "rtn-w2-seed0"))  # cleared once finished

    def no_quantizing(*a, **k):
        raise AssertionError("a finished row was measured again")

    monkeypatch.setattr(sys.modules["billm.driver"], "quantize", no_quantizing)
    assert main(argv) == 0
    assert json.loads((out / "compare.json").read_text())["rows"] == first
    with pytest.raises(AssertionError, match="measured again"):  # another protocol: measured again
        main(argv[:-4] + ["--max-windows", "1", "--out", str(out)])
    monkeypatch.undo()
    assert main(argv + ["--restart"]) == 0
    again = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["spec"], r["storage_bits"], r["ppl"]) for r in again] == [(r["spec"], r["storage_bits"], r["ppl"])
                                                                           for r in first]


def test_pareto_front_keeps_exactly_the_undominated_rows():
    from billm.compare import Row, pareto_front

    rows = [Row(s, 1, b, 0, {"t": p}) for s, b, p in [("a", 1.0, 90), ("b", 2.0, 50), ("c", 2.5, 60), ("d", 3.0, 50),
                                                       ("e", 1.5, 90)]]
    assert [r.spec for r in pareto_front(rows, "t")] == ["a", "b"]


def test_pareto_table_shows_every_task_and_marks_the_front_on_the_first():
    from billm.compare import Row, pareto_markdown

    rows = [Row("a", 1, 1.0, 0, {"t": 90, "u": 9}), Row("b", 1, 2.0, 0, {"t": 95, "u": 8})]
    lines = pareto_markdown(rows, ["t", "u"]).splitlines()
    assert lines[0] == "| method | weight bits | storage bits | t ppl | u ppl | front | seconds |"
    assert lines[2] == "| a | 1.000 | 1.000 | 90.00 | 9.00 | yes | 0 |"
    assert lines[3] == "| b | 1.000 | 2.000 | 95.00 | 8.00 |  | 0 |"  # beaten on t, whatever u says
    assert pareto_markdown(rows, "t").splitlines()[0] == "| method | weight bits | storage bits | t ppl | front | seconds |"

def test_pareto_default_set_parses():
    from billm.cli import PARETO_SPECS
    from billm.compare import parse_method

    specs = PARETO_SPECS.split(",")
    assert len(set(specs)) == len(specs) and "fp" in specs
    for s in specs:
        parse_method(s)  # a bad spec raises


def test_revisions_line_names_the_commit_of_every_row():
    from billm.compare import Row, revisions_line

    rows = [Row(s, 1, 1.0, 0, {"t": 1}, revision=rev) for s, rev in [("a", "abc"), ("b", "abc"), ("c", "def"), ("d", "")]]
    assert revisions_line(rows) == "Measured by billm at `abc` (2 of 4 rows); `def`: c; an unrecorded revision: d.\n"
    assert revisions_line(rows[:2]) == "Measured by billm at `abc` (2 of 2 rows).\n"
    assert revisions_line([Row("a", 1, 1.0, 0, {"t": 1})]) == ""  # nothing recorded: nothing said


def test_source_revision_is_this_checkouts_commit():
    import subprocess

    head = subprocess.run(["git", "-C", str(Path(billm.__file__).parent), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode != 0 or not source_revision():
        pytest.skip("billm is not a file of a git checkout here (e.g. installed from a wheel)")
    assert source_revision().removesuffix("-dirty") == head.stdout.strip()


def test_compare_rejects_a_bad_spec_before_loading(tmp_path, capsys):
    rc = main(["compare", str(tmp_path / "not-loaded"), "--methods", "fp,gptq:w9x"])
    assert rc == 2 and "unknown gptq option 'w9x'" in capsys.readouterr().err


def test_readme_results_rewrites_only_the_marked_table(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "readme_results.py"
    res = tmp_path / "pareto"
    res.mkdir()
    rows = [{"spec": s, "weight_bits": b, "storage_bits": b, "seconds": 1.0, "ppl": p} for s, b, p in [
        ("fp", 16.0, {"wikitext2": 20.8, "pydoc": 9.1}), ("billm", 2.5, {"wikitext2": 900.0, "pydoc": 40.0}),
        ("billm:tiny", 1.4, {"wikitext2": 800.0, "pydoc": 50.0})]]
    (res / "compare.json").write_text(json.dumps({"tasks": ["wikitext2", "pydoc"], "rows": rows}))
    (res / "compare.md").write_text("<!-- x -->\nCommit: `abc1234`, 2026-12-05, 2 CPU threads, torch 2.13.0+cpu.\n")
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\nbefore\n<!-- pareto-table:begin -->\nold table\n<!-- pareto-table:end -->\nafter\n")
    run = subprocess.run([sys.executable, str(script), "--readme", str(readme), "--results", str(res)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = readme.read_text()
    assert text.startswith("# t\n\nbefore\n<!-- pareto-table:begin -->\nMade by `scripts/results.sh pareto` at commit "
                           "`abc1234` on 2026-12-05; 2 CPU threads;") and text.endswith("<!-- pareto-table:end -->\nafter\n")
    assert "old table" not in text and "The pydoc text is held out" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| method | storage bits | WikiText-2 ppl | pydoc ppl (held out) | front |"
    assert table[1:] == ["| `billm:tiny` | 1.400 | 800.00 | 50.00 | yes |", "| `billm` | 2.500 | 900.00 | 40.00 |  |",
                         "| full precision | 16.000 | 20.80 | 9.10 | yes |"]  # the front on the first task
    readme.write_text("no markers\n")
    bad = subprocess.run([sys.executable, str(script), "--readme", str(readme), "--results", str(res)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "pareto-table:begin" in bad.stderr and readme.read_text() == "no markers\n"
