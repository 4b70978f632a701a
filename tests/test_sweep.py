"""Sweeps as jobs: the same rows and checkpoint bytes locally, on a Ray cluster, and as printed commands;
a job whose worker is killed is retried by Ray and resumes from its own progress."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from billm.cli import main
from billm.compare import job_name

SPECS = "fp,rtn:w2,billm"
RESUME_SPEC = "gptq:w2g32"


def _argv(model, out, kept, *extra, specs=SPECS):
    return ["pareto", str(model), "--methods", specs, "--tasks", "pydoc", "--calib", "pydoc", "--nsamples", "2",
            "--seqlen", "32", "--eval-seqlen", "64", "--max-windows", "2", "--out", str(out),
            "--keep-checkpoints", str(kept), *extra]


def _rows(out):
    return [{k: r[k] for k in ("spec", "seed", "weight_bits", "storage_bits", "ppl", "from_file")}
            for r in json.loads((out / "compare.json").read_text())["rows"]]


def _checkpoint_bytes(kept):
    return {f"{job.name}/{f.name}": f.read_bytes() for job in sorted(kept.iterdir()) for f in sorted(job.iterdir())
            if f.is_file()}


@pytest.fixture(scope="module")
def local_run(tiny_folder, tmp_path_factory):
    """The sweep measured in this process, one job after another: what every other way must equal."""
    base = tmp_path_factory.mktemp("local")
    with pytest.MonkeyPatch.context() as mp:  # offline, as every test and the Ray workers
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert main(_argv(tiny_folder, base / "out", base / "ckpt")) == 0
    return base / "out", base / "ckpt"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray instance with 2 CPUs. Its workers see $BILLM_FAULT_FILE: a test that writes "stage:block"
    there has the first job to reach that point killed (SIGKILL), once."""
    ray = pytest.importorskip("ray", reason="the ray extra: pip install 'billm[ray]'")
    fault = tmp_path_factory.mktemp("fault") / "fault"
    env = {"BILLM_FAULT_FILE": str(fault), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield fault
    ray.shutdown()


@pytest.mark.slow
def test_ray_sweep_gives_the_local_rows_and_checkpoint_bytes(ray_cluster, local_run, tiny_folder, tmp_path):
    out, kept = local_run
    assert main(_argv(tiny_folder, tmp_path / "out", tmp_path / "ckpt", "--cluster", "ray")) == 0
    assert _rows(tmp_path / "out") == _rows(out)
    ray_bytes, local_bytes = _checkpoint_bytes(tmp_path / "ckpt"), _checkpoint_bytes(kept)
    assert sorted(ray_bytes) == sorted(local_bytes) and len(ray_bytes) >= 2 * 3
    assert ray_bytes == local_bytes
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_ray_retries_a_killed_worker_and_the_job_resumes_to_identical_bytes(ray_cluster, tiny_folder, tmp_path):
    ray_cluster.write_text("after-hidden:0")  # the job dies once block 0 and its outputs are recorded
    assert main(_argv(tiny_folder, tmp_path / "ray", tmp_path / "ray-ckpt", "--cluster", "ray",
                      specs=RESUME_SPEC)) == 0
    assert not ray_cluster.exists() and ray_cluster.with_name("fault.fired").exists()  # the kill happened
    job = json.loads((tmp_path / "ray" / "jobs" / "gptq-w2g32-seed0" / "row.json").read_text())
    assert job["resumed_blocks"] == 1  # the retry continued after block 0 instead of starting again
    assert main(_argv(tiny_folder, tmp_path / "local", tmp_path / "local-ckpt", specs=RESUME_SPEC)) == 0
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    assert _checkpoint_bytes(tmp_path / "ray-ckpt") == _checkpoint_bytes(tmp_path / "local-ckpt")


@pytest.mark.slow
def test_printed_commands_run_anywhere_and_gather_the_local_table(local_run, tiny_folder, tmp_path, capsys):
    out, kept = local_run
    argv = _argv(tiny_folder, tmp_path / "out", tmp_path / "ckpt")
    assert main(argv + ["--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 + 1 and all(line.startswith("billm pareto ") for line in lines)
    assert all("--jobs-only" in line for line in lines[:3]) and "--jobs-only" not in lines[3]
    for line in reversed(lines[:3]):  # any order
        assert main(shlex.split(line)[1:]) == 0
    assert not (tmp_path / "out" / "compare.json").exists()  # the jobs write rows, not the table
    assert main(shlex.split(lines[3])[1:]) == 0
    assert _rows(tmp_path / "out") == _rows(out)
    assert _checkpoint_bytes(tmp_path / "ckpt") == _checkpoint_bytes(kept)


def test_several_seeds_are_one_job_each_and_labelled_in_the_table(tiny_folder, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(tiny_folder, out, tmp_path / "ckpt", "--seeds", "0,1", specs="gptq:w2g32")) == 0
    rows = _rows(out)
    assert [(r["spec"], r["seed"]) for r in rows] == [("gptq:w2g32", 0), ("gptq:w2g32", 1)]
    assert rows[0]["ppl"] != rows[1]["ppl"]  # another calibration sample, another quantization
    assert "| gptq:w2g32 (seed 1) |" in (out / "compare.md").read_text()
    assert sorted(p.name for p in (out / "jobs").iterdir()) == ["gptq-w2g32-seed0", "gptq-w2g32-seed1"]


def test_cluster_ray_without_the_extra_names_it(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    assert main(_argv(tiny_folder, tmp_path / "out", tmp_path / "ckpt", "--cluster", "ray")) != 0
    assert "pip install 'billm[ray]'" in capsys.readouterr().err


def test_bad_cluster_and_seeds_are_refused_before_any_work(tiny_folder, tmp_path, capsys):
    assert main(_argv(tiny_folder, tmp_path / "a", tmp_path / "b", "--cluster", "slurm")) != 0
    assert "--cluster 'slurm'" in capsys.readouterr().err
    assert main(_argv(tiny_folder, tmp_path / "a", tmp_path / "b", "--seeds", "0,x")) != 0
    assert "--seeds '0,x'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_a_failing_ray_job_is_named_and_the_others_still_finish(ray_cluster, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    rc = main(_argv(missing, tmp_path / "out", tmp_path / "ckpt", "--cluster", "ray", specs="fp,rtn:w2"))
    err = capsys.readouterr().err
    assert rc != 0 and "2 of 2 job(s) failed" in err and "fp-seed0:" in err and "rtn-w2-seed0:" in err


def test_ray_tasks_ask_for_a_gpu_and_a_fresh_worker_only_for_cuda_sweeps():
    from billm.sweep import Sweep, ray_task_options

    base = dict(model="m", out="/o", tasks=("wikitext2",), calib="c4", nsamples=2, seqlen=32, eval_seqlen=64)
    cuda = ray_task_options(Sweep(**base, device="cuda"), cpus_per_job=4, max_retries=3)
    cpu = ray_task_options(Sweep(**base), cpus_per_job=2, max_retries=3)
    assert cuda == {"num_cpus": 4, "num_gpus": 1, "max_retries": 3, "max_calls": 1}
    assert cpu == {"num_cpus": 2, "num_gpus": 0, "max_retries": 3, "max_calls": 0}


def test_printed_commands_spell_out_absolute_paths_and_refuse_restart(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["compare", str(tiny_folder), "--methods", "fp,rtn:w2", "--tasks", "pydoc", "--calib", "pydoc",
            "--nsamples", "2", "--seqlen", "32", "--out", "rel-out", "--print-commands"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(f"--out {tmp_path / 'rel-out'} " in line for line in lines)
    assert "--methods fp,rtn:w2 --seeds 0" in lines[-1]
    assert main(argv + ["--restart"]) != 0
    assert "--restart with --print-commands" in capsys.readouterr().err


def test_a_spec_given_twice_is_refused(tiny_folder, tmp_path, capsys):
    assert main(_argv(tiny_folder, tmp_path / "out", tmp_path / "ckpt", specs="billm,rtn:w2,billm")) != 0
    assert "a spec is given twice" in capsys.readouterr().err


def test_another_dtype_is_another_row(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = _argv(tiny_folder, out, tmp_path / "ckpt", specs="rtn:w2")
    assert main(argv + ["--dtype", "float32"]) == 0
    first = json.loads((out / "jobs" / "rtn-w2-seed0" / "row.json").read_text())["fingerprint"]
    assert main(argv + ["--dtype", "bfloat16"]) == 0
    second = json.loads((out / "jobs" / "rtn-w2-seed0" / "row.json").read_text())["fingerprint"]
    assert (first["dtype"], second["dtype"]) == ("torch.float32", "torch.bfloat16")
    assert first["config"]["bits"] == 2  # the spec resolved: a redefined preset is another row


def test_a_tables_rows_kept_as_job_rows_are_reused_by_the_same_command(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    argv = ["pareto", str(tiny_folder), "--methods", "fp,rtn:w2", "--tasks", "pydoc", "--calib", "pydoc", "--nsamples",
            "2", "--seqlen", "32", "--eval-seqlen", "64", "--max-windows", "2", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    jobs = {j.name: json.loads((j / "row.json").read_text()) for j in (out / "jobs").iterdir()}
    shutil.rmtree(out / "jobs")  # a table from before job rows were kept: only compare.json
    script = Path(__file__).resolve().parents[1] / "scripts" / "keep_table_rows.py"
    run = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=os.environ)
    assert run.returncode == 0, run.stderr
    kept = {j.name: json.loads((j / "row.json").read_text()) for j in (out / "jobs").iterdir()}
    assert {n: k["fingerprint"] for n, k in kept.items()} == {n: j["fingerprint"] for n, j in jobs.items()}
    assert all(k["kept_from"] == "compare.json" for k in kept.values())
    for k in kept.values():  # a marker only a kept row can carry: read back, never measured again
        k["row"]["seconds"] = 12345.0
        (out / "jobs" / job_name(k["row"]["spec"]) / "row.json").write_text(json.dumps(k))
    assert main(argv) == 0
    again = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["seconds"] for r in again] == [12345.0, 12345.0]
    assert [{**r, "seconds": 0} for r in again] == [{**r, "seconds": 0} for r in rows]
    second = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=os.environ)
    assert second.returncode == 0 and second.stdout.count("already there, left as it is") == 2
