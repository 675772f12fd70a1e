"""Sweeps: checks before any cell runs, resume after a kill, shards, Slurm arrays, reports from files.

The grid is experiments/sweeps/smoke.gin (4 cells, 2 training runs) shrunk further with extra
bindings and run by the in-process debug executor, so each test takes seconds.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dyncompute.cli import main
from dyncompute.sweeps.cell import RESULT, cell_dir, prepare
from dyncompute.sweeps.executors import CellExecutor, ExecutorConfig
from dyncompute.sweeps.grid import Scheduler, run_sweep, shard_cells
from dyncompute.sweeps.report import pareto_front, write_report
from dyncompute.sweeps.spec import is_sampling_binding, load_sweep

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "sweeps" / "smoke.gin"
TINY = ["train.steps = 2", "train.checkpoint_every = 1", "CellSettings.num_samples = 2",
        "CellSettings.count_images = 1", "CellSettings.heldout_images = 2", "CellSettings.heldout_timesteps = 2",
        "CellSettings.views_samples = 1", "CellSettings.views_steps = 2"]
# columns that measure this machine at this moment, not the cell's result
TIMING = ["sampling_wall_ms_per_image", "sampling_cpu_ms_per_image", "process_peak_rss_MiB", "train_wall_s",
          "cell_wall_s", "cell_cpu_s"]


def _run(out, shard=None, report=False, retry_failed=False):
    sweep = load_sweep(SMOKE, TINY)
    return run_sweep(SMOKE, out, ExecutorConfig("debug"), shard=shard, retry_failed=retry_failed, progress=False,
                     sweep=sweep, threads=1, report=report)


def _rows(out) -> pd.DataFrame:
    df = pd.read_csv(Path(out) / "results.csv").drop(columns=TIMING)
    return df.sort_values("cell_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    summary = _run(out, report=True)
    return out, summary


# --------------------------------------------------------------------------- the file format


def test_smoke_expands_to_four_cells_and_two_training_runs():
    sweep = load_sweep(SMOKE)
    assert [c.label for c in sweep.cells] == ["DiT/2 · DDIM-5 · seed 0", "DiT/2 · DDIM-10 · seed 0",
                                              "DC-DiT N=4 · DDIM-5 · seed 0", "DC-DiT N=4 · DDIM-10 · seed 0"]
    assert len({c.cell_id for c in sweep.cells}) == 4
    assert len(sweep.train_ids) == 2  # the sampler axis only changes sampling: one training run per model
    first = sweep.cells[0]
    assert first.sampling and all(is_sampling_binding(b) for b in first.sampling)
    assert "generate.num_steps" not in first.training_config and "generate.num_steps" in first.config
    # sweep.bindings come last: the tiny width holds over the 64 of the file the DC-DiT value includes
    assert "DiffusionTransformer.hidden_size = 32" in sweep.cells[2].training_config


def test_sampling_bindings_are_recognised():
    assert is_sampling_binding("generate.num_steps = 10")
    assert is_sampling_binding("CellSettings.num_samples = 4")
    assert is_sampling_binding("DiffusionTransformer.reducers = ['token_merging']")
    assert is_sampling_binding("reducers.token_merging.ratio = 0.5")
    assert not is_sampling_binding("train.steps = 3")
    assert not is_sampling_binding("tokenizers.dynamic_chunking.tail_drop = 0.2")  # also trains with it
    assert not is_sampling_binding("include 'experiments/quickstart/dcdit.gin'")


DIT = "sweep.base = ['experiments/quickstart/dit.gin']\n"
BAD = {  # case: (sweep file text, what the message must say, and more it must say)
    "unknown binding": (DIT + "sweep.axes = {'model': {'a': ['train.stepz = 3']}}", "axis 'model' value 'a'",
                        "stepz"),
    "unknown configurable": (DIT + "sweep.axes = {'model': {'a': ['nothere.x = 3']}}", "axis 'model' value 'a'",
                             "nothere"),
    "empty axis": (DIT + "sweep.axes = {'model': {'a': []}, 'sampler': {}}", "axis 'sampler' has no values", ""),
    "duplicate labels": (DIT + "sweep.axes = {'model': {\n  'a': ['train.steps = 2'],\n  'a': ['train.steps = 3'],\n}}",
                         "duplicate label 'a'", "sweep.axes"),
    "missing base file": ("sweep.base = ['experiments/nope.gin']\nsweep.axes = {'model': {'a': []}}",
                          "base file 'experiments/nope.gin' not found", ""),
    "unknown plugin": (DIT + "sweep.axes = {'model': {'a': [\"generate.sampler = 'dpm'\"]}}",
                       "unknown sampler 'dpm'", "ddim"),
    "binding outside sweep": ("train.steps = 3\nsweep.axes = {'model': {'a': []}}",
                              "train.steps is not a `sweep.*` binding", "line 1"),
    "axis changes nothing": (DIT + "sweep.axes = {'model': {'a': [], 'b': ['train.steps = 300']}}",
                             "resolve to the same config", ""),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sweep_files_fail_before_any_cell(case, tmp_path, capsys):
    text, expected, also = BAD[case]
    path = tmp_path / "bad.gin"
    path.write_text(text)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--executor", "debug"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and also in err, err
    assert not out.exists()  # nothing ran, nothing was written


def test_a_sweep_needing_a_missing_plugin_says_which(tmp_path, capsys):
    """``sweep.requires`` is checked before anything runs; a missing plugin is named."""
    path = tmp_path / "needs.gin"
    path.write_text(SMOKE.read_text() + "\nsweep.requires = ['reducers.token_merging', 'reducers.no_such_cache']\n")
    rc = main(["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs plugins that are not installed" in err and "reducers.no_such_cache" in err
    assert err.split("not installed: ", 1)[1].startswith("reducers.no_such_cache (")  # only the missing one
    assert not (tmp_path / "o").exists()


def test_reducer_sweep_calibrates_teacache_for_its_cells_only():
    """reducers.gin: TeaCache cells carry their calibration (part of their identity); the others do not."""
    sweep = load_sweep(ROOT / "experiments" / "sweeps" / "reducers.gin")
    tea = [c for c in sweep.cells if c.labels["reducer"].startswith("TeaCache")]
    assert tea and all([r for r, _ in c.calibrate] == ["teacache"] for c in tea)
    assert all(not c.calibrate for c in sweep.cells if c not in tea)


def test_calibrated_reducer_cells_fit_it_once_per_trained_run(tmp_path, monkeypatch):
    """sweep.calibrate: a TeaCache cell calibrates on its trained run (cached there) and samples with it;
    the uncached cell's samples are the reference samples; cells report the evaluation's sample quality."""
    cached = ROOT / "tests" / "reference" / "shapes_classifier-3110ed51bfdeaddb.pt"  # the default classifier
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / cached.name).write_bytes(cached.read_bytes())
    monkeypatch.setenv("DYNCOMPUTE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tea.gin"
    path.write_text(f"""
sweep.base = ['{ROOT / "experiments" / "quickstart" / "dit.gin"}']
sweep.calibrate = {{'teacache': {{'sampler': 'ddim', 'num_steps': 8, 'num_samples': 2}}}}
sweep.axes = {{'reducer': {{'none': [], 'TeaCache': ["DiffusionTransformer.reducers = ['teacache']",
                                                    'reducers.teacache.threshold = 0.5']}}}}
sweep.bindings = ['generate.sampler = "ddim"', 'generate.num_steps = 8']
sweep.reference = ['generate.num_steps = 8']
""")
    quality = ["CellSettings.num_samples = 65", "CellSettings.quality_features = ['shapes_classifier']"]
    sweep = load_sweep(path, TINY + quality)  # 65: more samples than the classifier's 64 features (FID)
    run_sweep(path, tmp_path / "out", ExecutorConfig("debug"), progress=False, sweep=sweep, threads=1, report=False)
    rows = pd.read_csv(tmp_path / "out" / "results.csv").set_index("reducer")
    for metric in ("fid_shapes", "is_shapes", "cas", "fid_shapes_real", "cas_real"):
        assert rows[metric].notna().all(), metric
    assert rows["cas_real"].min() > 0.9 and rows["fid_shapes"].min() > rows["fid_shapes_real"].max()
    assert (rows["NFE"] == 8).all() and rows.loc["TeaCache", "backbone_evaluations"] < 8
    # the uncached cell samples as the reference does: its own samples are the reference
    assert [c.labels["reducer"] for c in sweep.cells if c.reference_is_self] == ["none"]
    assert rows.loc["none", "psnr_vs_reference_dB"] == float("inf") and rows.loc["none", "mse_vs_reference"] == 0
    assert len(list((tmp_path / "out" / "runs").glob("*/reference/*.pt"))) == 1
    fitted = list((tmp_path / "out" / "runs").glob("*/calibration/teacache-*.gin"))
    assert len(fitted) == 1
    tea = next(c for c in sweep.cells if c.calibrate)
    used = (cell_dir(tmp_path / "out", tea.cell_id) / "operative_config.gin").read_text()
    assert "teacache.coefficients" in used and "teacache.fingerprint" in used


def test_sweep_calibrate_names_a_registered_reducer(tmp_path, capsys):
    path = tmp_path / "bad.gin"
    path.write_text(f"sweep.base = ['{ROOT / 'experiments' / 'quickstart' / 'dit.gin'}']\n"
                    "sweep.calibrate = {'teacach': {}}\nsweep.axes = {'a': {'x': []}}\n")
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "sweep.calibrate names reducer 'teacach'" in capsys.readouterr().err


# --------------------------------------------------------------------------- running


def test_smoke_sweep_runs_every_cell_and_reuses_training(smoke_run):
    out, summary = smoke_run
    assert summary["done"] == 4 and summary["failed"] == 0
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 4 and df["per_image_TFLOPs"].gt(0).all() and df["NFE"].tolist() == [5, 10, 5, 10]
    # one cell of each training run trained, the other reused its checkpoint
    assert sorted(df.groupby("train_id")["reused_checkpoint"].apply(sorted).sum()) == [False, False, True, True]
    for cid in df["cell_id"]:
        folder = out / "cells" / cid
        assert {"config.gin", "operative_config.gin", "cell.log", "result.json"} <= {p.name for p in folder.iterdir()}


def test_rerun_skips_finished_cells(smoke_run):
    out, _ = smoke_run
    before = {p: p.read_bytes() for p in (out / "cells").glob(f"*/{RESULT}")}
    summary = _run(out)
    assert summary["to_run"] == 0
    assert {p: p.read_bytes() for p in (out / "cells").glob(f"*/{RESULT}")} == before


def test_killed_sweep_reruns_only_the_remaining_cells(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dyncompute.cli", "sweep", str(SMOKE), "--out", str(out), "--executor", "debug",
           "--threads", "1", "--no-progress"] + [a for b in TINY for a in ("-b", b)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob(f"cells/*/{RESULT}")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p: p.read_bytes() for p in out.glob(f"cells/*/{RESULT}")}
    assert 1 <= len(finished) < 4, "the kill must land mid-sweep"
    summary = _run(out)
    assert summary["to_run"] == 4 - len(finished) and summary["done"] == summary["to_run"]
    assert len(list(out.glob(f"cells/*/{RESULT}"))) == 4
    assert all(p.read_bytes() == b for p, b in finished.items())  # finished cells were not run again


def test_two_shards_give_the_rows_of_one_unsharded_run(smoke_run, tmp_path):
    out, _ = smoke_run
    sharded = tmp_path / "sharded"
    first = _run(sharded, shard=(1, 2))
    second = _run(sharded, shard=(2, 2))
    assert first["to_run"] == second["to_run"] == 2  # one training run each
    pd.testing.assert_frame_equal(_rows(sharded), _rows(out))


def test_shards_split_by_training_run():
    cells = load_sweep(SMOKE).cells
    a, b = shard_cells(cells, (1, 2)), shard_cells(cells, (2, 2))
    assert len(a) + len(b) == 4 and not {c.train_id for c in a} & {c.train_id for c in b}
    with pytest.raises(ValueError, match="1 <= i <= n"):
        shard_cells(cells, (3, 2))


# --------------------------------------------------------------------------- Slurm


def test_slurm_job_array_submission(tmp_path, monkeypatch):
    """The sbatch script submitit would send: one array over the cells that can start (one per training
    run; the other cells wait for their checkpoint), with the sweep's Slurm parameters."""
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch_script.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {record}\necho 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep = load_sweep(SMOKE)
    root = tmp_path / "sweep"
    for c in sweep.cells:
        prepare(root, sweep.name, c)
    config = ExecutorConfig("slurm", jobs=2, slurm={"partition": "gpu", "gpus_per_node": 1, "time": 90,
                                                    "cpus_per_task": 8})
    scheduler = Scheduler(root, sweep.cells, CellExecutor(config, root / "submitit"))
    scheduler._submit_ready()
    jobs = list(scheduler.running)
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1"]
    assert {c.train_id for c in scheduler.running.values()} == set(sweep.train_ids)
    assert len(scheduler.queue) == 2  # waiting for the checkpoints of their training runs
    script = record.read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=90", "#SBATCH --cpus-per-task=8", "#SBATCH --job-name=dyncompute-sweep"):
        assert line in script, script
    assert "-m submitit.core._submit" in script
    pickled = sorted((root / "submitit").glob("4242_*_submitted.pkl"))
    assert len(pickled) == 2
    scheduler.running.clear()  # nothing to cancel on a cluster that does not exist


# --------------------------------------------------------------------------- reports


def test_report_rebuilds_from_result_files_and_shows_new_metrics(smoke_run, tmp_path):
    out, _ = smoke_run
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    for name in ("results.csv", "report.md", "report.html"):
        (copy / name).unlink()
    shutil.rmtree(copy / "figures")
    # a metric the evaluation module will add: it needs no change to the report
    for p in copy.glob(f"cells/*/{RESULT}"):
        r = json.loads(p.read_text())
        r["metrics"]["fid_shapes"] = 10.0 + r["compute"]["NFE"]
        r["metric_goals"]["fid_shapes"] = "min"
        p.write_text(json.dumps(r))
    assert main(["report", str(copy)]) == 0
    df = pd.read_csv(copy / "results.csv")
    assert "fid_shapes" in df and len(df) == 4
    md = (copy / "report.md").read_text()
    assert "fid_shapes" in md and "4 of 4 cells finished" in md
    for fig in ("quality_vs_compute", "training_curves", "tokens_vs_timestep"):
        assert (copy / "figures" / f"{fig}.png").stat().st_size > 1000
    assert list((copy / "figures").glob("boundary_*.png"))  # DC-DiT cells
    assert "<table" in (copy / "report.html").read_text()


def test_report_lists_failed_cells(tmp_path):
    sweep = load_sweep(SMOKE, TINY)
    bad = sweep.cells[0]
    folder = cell_dir(tmp_path, bad.cell_id)
    folder.mkdir(parents=True)
    (folder / "error.json").write_text(json.dumps({"label": bad.label, "cell_id": bad.cell_id, "stage": "train",
                                                   "error": "RuntimeError: boom"}))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "0 of 1 cells finished, 1 failed" in md and "RuntimeError: boom" in md


def test_pareto_front():
    x, y = [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 3.0, 4.0]
    assert pareto_front(x, y, "min").tolist() == [0, 2]
    assert pareto_front(x, y, "max").tolist() == [0, 1]


# --------------------------------------------------------------------------- the experiments


@pytest.mark.parametrize("name,cells,runs", [("quickstart", 9, 3), ("ablations", 30, 15), ("paper_4x_16x", 6, 6),
                                               ("reducers", 22, 2)])
def test_experiment_sweeps_expand(name, cells, runs):
    sweep = load_sweep(ROOT / "experiments" / "sweeps" / f"{name}.gin")
    assert len(sweep.cells) == cells and len(sweep.train_ids) == runs


def test_quickstart_writes_outside_tracked_files():
    """Running the quickstart in a clone never touches committed files: its default folder is ignored."""
    from dyncompute.quickstart import DEFAULT_OUT

    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], check=False, capture_output=True, text=True)

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert git("check-ignore", "-q", f"{DEFAULT_OUT}/cells/x/result.json").returncode == 0
    assert git("ls-files", DEFAULT_OUT).stdout == ""


def _copy_without_results(src, dst, cells):
    import shutil

    shutil.copytree(src, dst)
    for c in cells:
        (cell_dir(dst, c.cell_id) / RESULT).unlink()


def test_failed_cell_is_recorded_the_sweep_goes_on_and_retry_reruns_it(smoke_run, tmp_path, monkeypatch):
    out, _ = smoke_run
    cells = load_sweep(SMOKE, TINY).cells
    broken, fine = cells[0], cells[2]  # trained runs exist: only evaluation reruns
    copy = tmp_path / "copy"
    _copy_without_results(out, copy, [broken, fine])
    import dyncompute.sweeps.cell as cell_module

    real, breaking = cell_module.evaluate_cell, [True]

    def flaky(model, *args, **kwargs):  # DiT/2's evaluation breaks (patchify has no token map)
        if breaking[0] and not model.tokenizer.dynamic_tokens:
            raise RuntimeError("boom")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(cell_module, "evaluate_cell", flaky)
    first = _run(copy)
    assert first["to_run"] == 2 and first["failed"] == 1 and first["done"] == 1
    error = json.loads((cell_dir(copy, broken.cell_id) / "error.json").read_text())
    assert error["stage"] == "evaluate" and "RuntimeError: boom" in error["error"] and "Traceback" in error["traceback"]
    breaking[0] = False
    assert _run(copy)["to_run"] == 0  # a failed cell waits for --retry-failed
    again = _run(copy, retry_failed=True)
    assert again["to_run"] == 1 and again["done"] == 1
    assert (cell_dir(copy, broken.cell_id) / RESULT).is_file()
    assert not (cell_dir(copy, broken.cell_id) / "error.json").exists()


def test_failed_training_fails_its_other_cells_without_running_them(smoke_run, tmp_path, monkeypatch):
    import shutil

    import dyncompute.sweeps.cell as cell_module

    out, _ = smoke_run
    cells = load_sweep(SMOKE, TINY).cells
    copy = tmp_path / "copy"
    _copy_without_results(out, copy, cells[:2])  # both cells of DiT/2's training run
    shutil.rmtree(copy / "runs" / cells[0].train_id)
    calls = []

    def broken_training(run, *a, **k):
        calls.append(run)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cell_module, "ensure_trained", broken_training)
    summary = _run(copy)
    assert summary["failed"] == 2 and len(calls) == 1  # trained once, failed once; its sibling never ran
    sibling = json.loads((cell_dir(copy, cells[1].cell_id) / "error.json").read_text())
    assert "its training failed" in sibling["error"] and "out of memory" in sibling["error"]


# --------------------------------------------------------------------------- a cell's metrics


def test_cell_quality_metrics_rank_real_images_above_noise(tmp_path, monkeypatch):
    """evaluate_cell measures fid_shapes / is_shapes / cas through dyncompute.evaluation: held-out real images
    of the dataset score better than noise, and too few samples for FID are noted, not faked."""
    import shutil

    import torch
    from conftest import REFERENCE

    from dyncompute.data.procedural import ProceduralShapes
    from dyncompute.model import ModelConfig
    from dyncompute.sampling import SampleResult
    from dyncompute.sweeps.evaluate import CellSettings, evaluate_cell

    cached = next(REFERENCE.glob("shapes_classifier-*.pt"))
    shutil.copy(cached, tmp_path / cached.name)
    monkeypatch.setenv("DYNCOMPUTE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    model = ModelConfig(input_size=32, in_channels=3, num_classes=10, hidden_size=32, depth=1, num_heads=2,
                        tokenizer_kwargs={"patch_size": 4}).build().eval()
    settings = CellSettings(heldout_images=8, heldout_timesteps=2, quality_features=("shapes_classifier",))
    data = ProceduralShapes(size=32, channels=3, num_classes=10, length=80, seed=4242)
    items = [data[i] for i in range(80)]
    real = SampleResult(torch.stack([it["x"] for it in items]), torch.as_tensor([int(it["y"]) for it in items]), 0, [])
    noise = SampleResult(torch.rand(80, 3, 32, 32) * 2 - 1, real.labels, 0, [])
    good, bad = (evaluate_cell(model, s, settings, {}) for s in (real, noise))
    assert good.goals["fid_shapes"] == "min" and good.goals["cas"] == "max" and good.goals["is_shapes"] == "max"
    assert good.metrics["fid_shapes"] < bad.metrics["fid_shapes"] and good.metrics["cas"] > 0.9 > bad.metrics["cas"]
    assert good.metrics["heldout_denoise_mse"] == bad.metrics["heldout_denoise_mse"] > 0  # a model metric
    few = evaluate_cell(model, SampleResult(real.images[:16], real.labels[:16], 0, []), settings, {})
    assert "fid_shapes" not in few.metrics and any("fid_shapes: not measured" in n for n in few.notes)
