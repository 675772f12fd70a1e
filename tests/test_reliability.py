"""Reliability: bad input is refused before anything is written, kills and divergence never poison a run,
and a killed run (one process or two) resumes bit-identically."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dyncompute.cli import main
from dyncompute.config import scoped
from dyncompute.engine import launch, train
from dyncompute.errors import DataError, Diverged
from dyncompute.runs import checkpoints, latest_checkpoint, run_lock

TINY = """
DiffusionTransformer.input_size = 8
DiffusionTransformer.in_channels = 3
DiffusionTransformer.num_classes = 10
DiffusionTransformer.hidden_size = 32
DiffusionTransformer.depth = 2
DiffusionTransformer.num_heads = 2
tokenizers.patchify.patch_size = 2
datasets.procedural.size = 8
datasets.procedural.length = 16
train.batch_size = 8
train.lr = 1e-3
train.steps = 2
train.checkpoint_every = 1
train.log_every = 1
train.progress = False
train.device = 'cpu'
"""
LATENT = [
    "train.dataset = 'latent_folder'", "DiffusionTransformer.in_channels = 4",
    "datasets.latent_folder.num_classes = 10",
]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One intra-op thread here and in every process started from here: fast on 2 shared cores, and
    the same arithmetic in every process, so runs compare bit for bit."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny gin file, a trained run directory (2 steps) and latent folders with one fault each."""
    root = tmp_path_factory.mktemp("world")
    gin_file = root / "tiny.gin"
    gin_file.write_text(TINY)
    with scoped([gin_file]):
        train(root / "trained")
    (root / "bad.gin").write_text("train.steps = = 3\n")
    (root / "a_file").write_text("not a directory")
    faults = {
        "complex": lambda i: np.zeros((4, 8, 8), np.complex64),
        "shape": lambda i: np.zeros((4, 8, 8) if i != 3 else (4, 4, 4), np.float32),
        "ints": lambda i: np.zeros((4, 8, 8), np.int64),
        "garbage": None,
    }
    for name in ["good", *faults, "label37", "label_range", "label_pair"]:
        folder = root / "latents" / name
        (folder / "features").mkdir(parents=True)
        (folder / "labels").mkdir()
        for i in range(6):
            make = faults.get(name) or (lambda i: np.zeros((4, 8, 8), np.float32))
            np.save(folder / "features" / f"{i}.npy", make(i))
            label = {"label37": np.array(3.7), "label_range": np.array(12), "label_pair": np.array([1, 2])}
            np.save(folder / "labels" / f"{i}.npy", label.get(name, np.array(i)) if i == 4 else np.array(i))
        if name == "garbage":
            (folder / "features" / "2.npy").write_bytes(b"\x00garbage")
    poisoned = root / "poisoned"
    _copy_run(root / "trained", poisoned, keep=1)
    _poison(latest_checkpoint(poisoned))
    garbage = root / "garbage_ckpt"
    _copy_run(root / "trained", garbage, keep=1)
    latest_checkpoint(garbage).write_bytes(os.urandom(2048))
    return root


def _copy_run(src: Path, dst: Path, keep: int) -> None:
    (dst / "checkpoints").mkdir(parents=True)
    (dst / "config.gin").write_bytes((src / "config.gin").read_bytes())
    for p in checkpoints(src)[:keep]:
        (dst / "checkpoints" / p.name).write_bytes(p.read_bytes())


def _poison(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    for key in ("model", "ema"):
        state[key] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                      for k, v in state[key].items()}
    torch.save(state, path)


def _snapshot(folder: Path) -> dict:
    """Every file under a folder with its bytes' hash and modification time."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


T = "train {gin}"
L = [f"-b={b}" for b in LATENT]


def _latent(name):
    return [*L, f"-b=datasets.latent_folder.root = '{{root}}/latents/{name}'"]


# (id, argv template, the run directory it must leave untouched, words the one line must hold)
BAD = [
    ("steps_negative", [T, "-b=train.steps = -5"], "new", "train.steps = -5"),
    ("steps_zero", [T, "-b=train.steps = 0"], "new", "train.steps = 0"),
    ("steps_float", [T, "-b=train.steps = 4.5"], "new", "train.steps = 4.5"),
    ("batch_zero", [T, "-b=train.batch_size = 0"], "new", "train.batch_size = 0"),
    ("lr_negative", [T, "-b=train.lr = -1.0"], "new", "train.lr = -1.0"),
    ("lr_zero", [T, "-b=train.lr = 0"], "new", "train.lr = 0"),
    ("weight_decay_negative", [T, "-b=train.weight_decay = -0.1"], "new", "train.weight_decay"),
    ("warmup_negative", [T, "-b=train.warmup_steps = -10"], "new", "train.warmup_steps = -10"),
    ("grad_clip_zero", [T, "-b=train.grad_clip = 0"], "new", "train.grad_clip = 0"),
    ("ema_decay_above_one", [T, "-b=train.ema_decay = 1.5"], "new", "train.ema_decay = 1.5"),
    ("checkpoint_every_zero", [T, "-b=train.checkpoint_every = 0"], "new", "train.checkpoint_every = 0"),
    ("log_every_zero", [T, "-b=train.log_every = 0"], "new", "train.log_every = 0"),
    ("keep_checkpoints_zero", [T, "-b=train.keep_checkpoints = 0"], "new", "train.keep_checkpoints = 0"),
    ("seed_negative", [T, "-b=train.seed = -1"], "new", "train.seed = -1"),
    ("num_workers_negative", [T, "-b=train.num_workers = -1"], "new", "train.num_workers = -1"),
    ("device_absent_gpu", [T, "-b=train.device = 'cuda:99'"], "new", "train.device = 'cuda:99'"),
    ("device_unknown", [T, "-b=train.device = 'banana'"], "new", "train.device = 'banana'"),
    ("objective_unknown", [T, "-b=train.objective = 'diffusionish'"], "new", "train.objective"),
    ("dataset_unknown", [T, "-b=train.dataset = 'nope'"], "new", "unknown dataset 'nope'"),
    ("progress_not_bool", [T, "-b=train.progress = 'yes'"], "new", "train.progress = 'yes'"),
    ("depth_zero", [T, "-b=DiffusionTransformer.depth = 0"], "new", "DiffusionTransformer.depth = 0"),
    ("heads_zero", [T, "-b=DiffusionTransformer.num_heads = 0"], "new", "DiffusionTransformer.num_heads = 0"),
    ("heads_not_dividing", [T, "-b=DiffusionTransformer.num_heads = 3"], "new", "not divisible"),
    ("hidden_negative", [T, "-b=DiffusionTransformer.hidden_size = -32"], "new", "hidden_size = -32"),
    ("mlp_ratio_zero", [T, "-b=DiffusionTransformer.mlp_ratio = 0"], "new", "mlp_ratio = 0"),
    ("dropout_above_one", [T, "-b=DiffusionTransformer.class_dropout_prob = 1.5"], "new", "class_dropout_prob"),
    ("fewer_model_classes", [T, "-b=DiffusionTransformer.num_classes = 5"], "new", "has 10 classes"),
    ("tokenizer_unknown", [T, "-b=DiffusionTransformer.tokenizer = 'nope'"], "new", "unknown tokenizer 'nope'"),
    ("patch_not_dividing", [T, "-b=tokenizers.patchify.patch_size = 3"], "new", "patch size"),
    ("image_size_mismatch", [T, "-b=DiffusionTransformer.input_size = 16"], "new", "gives 3x8x8 images"),
    ("data_size_bad", [T, "-b=datasets.procedural.size = 12"], "new", "datasets.procedural.size = 12"),
    ("data_channels_bad", [T, "-b=datasets.procedural.channels = 2"], "new", "datasets.procedural.channels"),
    ("data_classes_zero", [T, "-b=datasets.procedural.num_classes = 0"], "new", "datasets.procedural.num_classes"),
    ("data_length_zero", [T, "-b=datasets.procedural.length = 0"], "new", "datasets.procedural.length = 0"),
    ("binding_unknown", [T, "-b=train.nope = 1"], "new", "bad gin binding"),
    ("binding_malformed", [T, "-b=train.lr = ("], "new", "bad gin binding"),
    ("gin_missing", ["train {root}/missing.gin"], "new", "gin file not found"),
    ("gin_malformed", ["train {root}/bad.gin"], "new", "malformed gin file"),
    ("nccl_without_gpus", [T, "--backend=nccl", "--nproc-per-node=2"], "new", "nccl"),
    ("batch_not_divisible", [T, "--backend=gloo", "--nproc-per-node=3"], "new", "not divisible by the 3 processes"),
    ("nproc_without_backend", [T, "--nproc-per-node=2"], "new", "needs --backend"),
    ("nproc_zero", [T, "--backend=gloo", "--nproc-per-node=0"], "new", "--nproc-per-node 0"),
    ("run_dir_is_file", [T, "--run-dir={root}/a_file"], "a_file", "is a file"),
    ("config_changed_lr", [T, "-b=train.lr = 0.01"], "trained", "train.lr: 0.001 -> 0.01"),
    ("config_changed_seed", [T, "-b=train.seed = 7"], "trained", "train.seed: (unset) -> 7"),
    ("steps_below_trained", [T, "-b=train.steps = 1"], "trained", "has trained 2 steps"),
    ("train_poisoned_run", [T, "--run-dir={root}/poisoned"], "poisoned", "non-finite model weights"),
    ("train_garbage_checkpoint", [T, "--run-dir={root}/garbage_ckpt"], "garbage_ckpt", "not a torch checkpoint"),
    ("latent_folder_missing", [T, *L, "-b=datasets.latent_folder.root = '{root}/nowhere'"], "new", "nowhere"),
    ("latent_complex", [T, *_latent("complex")], "new", "complex64"),
    ("latent_wrong_shape", [T, *_latent("shape")], "new", "3.npy has shape (4, 4, 4)"),
    ("latent_integers", [T, *_latent("ints")], "new", "int64"),
    ("latent_garbage", [T, *_latent("garbage")], "new", "2.npy is not a .npy file"),
    ("label_float", [T, *_latent("label37")], "new", "4.npy holds 3.7"),
    ("label_out_of_range", [T, *_latent("label_range")], "new", "label 12"),
    ("label_two_values", [T, *_latent("label_pair")], "new", "should hold one value"),
    ("sample_objective_mismatch", ["sample {root}/trained", "--sampler=ode"], "trained",
     "trained with 'gaussian'; use ddim or ddpm"),
    ("sample_unknown_sampler", ["sample {root}/trained", "--sampler=nope"], "trained", "unknown sampler 'nope'"),
    ("sample_zero_samples", ["sample {root}/trained", "-n=0", "--steps=2"], "trained", "generate.num_samples = 0"),
    ("sample_zero_steps", ["sample {root}/trained", "--steps=0"], "trained", "generate.num_steps = 0"),
    ("sample_negative_cfg", ["sample {root}/trained", "--steps=2", "--cfg-scale=-1"], "trained", "generate.cfg_scale"),
    ("sample_negative_seed", ["sample {root}/trained", "--steps=2", "--seed=-3"], "trained", "generate.seed = -3"),
    ("sample_batch_zero", ["sample {root}/trained", "--steps=2", "-b=generate.batch_size = 0"], "trained",
     "generate.batch_size = 0"),
    ("sample_out_is_file", ["sample {root}/trained", "--out={root}/a_file"], "trained", "is a file"),
    ("sample_budget_unknown", ["sample {root}/trained", "-b=generate.nope = 1"], "trained", "unknown budget keyword"),
    ("flops_bad_model", ["flops {gin}", "-b=DiffusionTransformer.num_heads = 0"], "new", "num_heads = 0"),
    ("sample_no_run", ["sample {root}/nowhere"], "new", "not a run directory"),
    ("sample_nan_weights", ["sample {root}/poisoned", "--steps=2"], "poisoned", "non-finite ema weights"),
    ("sample_garbage_checkpoint", ["sample {root}/garbage_ckpt", "--steps=2"], "garbage_ckpt",
     "1.pt: not a torch checkpoint"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_one_line_exit_2_nothing_written(world, case, capsys):
    """Each bad config or input: status 2, one line naming what is wrong, and no file in the run
    directory written or overwritten (a new run directory is not even created)."""
    name, argv, run, words = case
    run_dir = world / ("new_" + name if run == "new" else run)
    args = argv[0].format(gin=world / "tiny.gin", root=world).split() + [a.format(root=world) for a in argv[1:]]
    if args[0] == "train" and not any(a.startswith("--run-dir") for a in args):
        args.append(f"--run-dir={run_dir}")
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dyncompute {args[0]}: error: "), err
    assert words in lines[0], lines[0]
    assert out == ""
    assert _snapshot(run_dir) == before
    if run == "new":
        assert not run_dir.exists()


def test_at_least_forty_bad_inputs():
    assert len(BAD) >= 40


def test_debug_shows_the_traceback_and_internal_errors_keep_theirs(world, capsys, monkeypatch):
    assert main(["--debug", "train", str(world / "tiny.gin"), "-b", "train.steps = -5",
                 "--run-dir", str(world / "never")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("dyncompute train: error: train.steps")

    import dyncompute.commands

    def broken(args):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(dyncompute.commands, "plugins", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["plugins"])


def _train(gin_file, run_dir, *bindings):
    with scoped([gin_file], list(bindings)):
        return train(run_dir)


def _assert_same_run(a: Path, b: Path) -> None:
    """Two run directories ended with bit-identical weights, EMA, optimizer state and logged losses."""
    ca, cb = torch.load(latest_checkpoint(a), weights_only=True), torch.load(latest_checkpoint(b), weights_only=True)
    assert latest_checkpoint(a).name == latest_checkpoint(b).name
    for key in ("model", "ema"):
        assert ca[key].keys() == cb[key].keys()
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), key
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    assert list(ma["step"]) == list(range(1, len(ma) + 1)) == list(mb["step"])
    assert (ma["loss"].to_numpy() == mb["loss"].to_numpy()).all()


def test_nan_stops_with_status_3_and_keeps_a_finite_checkpoint(world, tmp_path, capsys):
    """A diverging run (lr 1e4) stops before a non-finite step is applied: status 3, one line, the
    newest checkpoint finite and named; sampling it works."""
    run = tmp_path / "run"
    _train(world / "tiny.gin", run)
    code = main(["train", str(world / "tiny.gin"), "--run-dir", str(run), "-b", "train.steps = 40",
                 "-b", "train.lr = 1e4", "--allow-config-change"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "diverged at step" in err[0]
    last = latest_checkpoint(run)
    assert f"the newest checkpoint, {last.name}, is finite" in err[0]
    state = torch.load(last, weights_only=True)
    assert all(torch.isfinite(v).all() for key in ("model", "ema") for v in state[key].values())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "finished", "resume", "stopped"]
    assert history[2]["changes"]["train.lr"] == ["0.001", "10000.0"]
    assert main(["sample", str(run), "-n", "2", "--steps", "2", "--sampler", "ddim"]) == 0


def test_sampling_refuses_non_finite_weights_and_falls_back(world, tmp_path, caplog):
    run = tmp_path / "run"
    _copy_run(world / "trained", run, keep=2)
    _poison(latest_checkpoint(run))
    assert main(["sample", str(run), "-n", "2", "--steps", "2", "--sampler", "ddim"]) == 0
    assert f"{latest_checkpoint(run)} holds non-finite ema weights" in caplog.text
    assert "using checkpoint_1.pt instead" in caplog.text


def test_kill_one_process_then_resume_is_exact(world, tmp_path):
    """SIGKILL mid-run (checkpoints every step, so kills land in writes too), then resume: bit-identical
    to an uninterrupted run, temp files cleaned, metrics.csv matching, checkpoints kept at 2."""
    killed = tmp_path / "killed"
    killer = _KillMidRun(world / "tiny.gin", ["--run-dir", str(killed), "-b", "train.steps = 24"], killed, at=3)
    _train(world / "tiny.gin", tmp_path / "ref", "train.steps = 24")  # meanwhile
    killer.join()
    assert killer.step < 24, "the run ended before it was killed"
    _train(world / "tiny.gin", killed, "train.steps = 24")
    _assert_same_run(tmp_path / "ref", killed)
    assert [p.name for p in checkpoints(killed)] == ["checkpoint_23.pt", "checkpoint_24.pt"]
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp")]


def test_kill_two_process_launcher_leaves_no_worker_and_resumes_exactly(world, tmp_path):
    """Two gloo processes: SIGKILL the launcher mid-run; its workers die with it; resuming ends
    bit-identical to an uninterrupted two-process run (which trains meanwhile, to save time)."""
    bindings = ["train.steps = 30", "train.checkpoint_every = 2"]
    killed = tmp_path / "killed"
    killer = _KillMidRun(world / "tiny.gin", ["--run-dir", str(killed), "--backend", "gloo", "--nproc-per-node", "2",
                                              *[x for b in bindings for x in ("-b", b)]], killed, at=4)
    assert launch(str(world / "tiny.gin"), bindings, str(tmp_path / "ref"), "gloo", 2) == 30
    killer.join()
    assert len(killer.workers) >= 3  # the fork server, the resource tracker and the two trainers
    _wait_for(lambda: not any(_alive(pid) for pid in killer.workers), timeout=20)
    assert killer.step < 30, "the run ended before it was killed"
    assert launch(str(world / "tiny.gin"), bindings, str(killed), "gloo", 2) == 30
    _assert_same_run(tmp_path / "ref", killed)


class _KillMidRun(threading.Thread):
    """``dyncompute train GIN ARGS`` in a subprocess, SIGKILLed from this thread once it has saved
    checkpoint ``at``; ``workers``: its descendants seen just before; ``step``: the newest checkpoint after."""

    def __init__(self, gin_file: Path, args: list, run_dir: Path, at: int):
        super().__init__()
        self.run_dir, self.at, self.workers, self.step, self.error = run_dir, at, [], None, None
        self.proc = subprocess.Popen([sys.executable, "-m", "dyncompute.cli", "train", str(gin_file), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.start()

    def run(self):
        def saved(k):  # a checkpoint of step k or later (older ones are deleted as newer ones come)
            return any(int(p.stem.split("_")[1]) >= k for p in checkpoints(self.run_dir))

        try:
            _wait_for(lambda: saved(1), self.proc)
            self.workers = _descendants(self.proc.pid)
            _wait_for(lambda: saved(self.at), self.proc)
        except AssertionError as e:
            self.error = e
        finally:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.step = int(latest_checkpoint(self.run_dir).stem.split("_")[1]) if checkpoints(self.run_dir) else 0

    def join(self):
        super().join()
        assert self.error is None, self.error


def _wait_for(condition, proc=None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) first: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_run_directory_hygiene_across_restarts(world, tmp_path, caplog):
    """A resume after a bad checkpoint, stray files and interrupted writes: it falls back (warning
    naming the bad file, renamed aside), keeps stray files, removes temp files, keeps the newest 2
    checkpoints across restarts, cuts metrics.csv back to the checkpoint, records the resume; and ends
    bit-identical to an uninterrupted run."""
    gin_file = world / "tiny.gin"
    _train(gin_file, tmp_path / "ref", "train.steps = 4")
    run = tmp_path / "run"
    _train(gin_file, run)  # 2 steps: checkpoint_1, checkpoint_2
    ckpts = run / "checkpoints"
    (ckpts / "checkpoint_2.pt").write_bytes(os.urandom(4096))  # a bad newest checkpoint
    stray = {"checkpoint_20_backup.pt": b"mine", "notes.txt": b"keep me"}
    for name, data in stray.items():
        (ckpts / name).write_bytes(data)
    for temp in (".checkpoint_3.pt.a1b2c3.tmp", "tmpabcd1234", "../.metrics.csv.x9y8.tmp"):
        (ckpts / temp).write_bytes(b"half written")
    _train(gin_file, run, "train.steps = 4", "train.log_every = 2")  # more steps and another log interval: allowed
    assert "checkpoint_2.pt: not a torch checkpoint" in caplog.text and "using checkpoint_1.pt instead" in caplog.text
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(["checkpoint_20_backup.pt", "checkpoint_2.pt.bad",
                                                             "checkpoint_3.pt", "checkpoint_4.pt", "notes.txt"])
    assert all((ckpts / name).read_bytes() == data for name, data in stray.items())
    assert not list(run.glob(".*.tmp"))
    _assert_same_run(tmp_path / "ref", run)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [(h["event"], h["step"]) for h in history] == [("start", 0), ("finished", 2), ("resume", 1), ("finished", 4)]
    assert history[2]["changes"] == {"train.log_every": ["1", "2"], "train.steps": ["2", "4"]}
    assert "train.steps = 4" in (run / "config.gin").read_text()
    _train(gin_file, run, "train.steps = 5", "train.log_every = 2", "train.keep_checkpoints = 1")
    assert [p.name for p in checkpoints(run)] == ["checkpoint_5.pt"]  # the limit applies to what is on disk


def test_run_directory_lock(world, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run):
        assert main(["train", str(world / "tiny.gin"), "--run-dir", str(run)]) == 2
    assert "is in use by another training process" in capsys.readouterr().err
    assert list(run.iterdir()) == []


def test_bad_file_found_mid_run_is_named(world, tmp_path, capsys):
    """A latent file whose values break after the up-front check: status 2 and the file named."""
    folder = tmp_path / "latents"
    (folder / "features").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i in range(8):
        np.save(folder / "features" / f"{i}.npy", np.full((4, 8, 8), np.nan if i == 5 else 0.0, np.float32))
        np.save(folder / "labels" / f"{i}.npy", np.array(i))
    code = main(["train", str(world / "tiny.gin"), "--run-dir", str(tmp_path / "run"), *[f"-b={b}" for b in LATENT],
                 f"-b=datasets.latent_folder.root = '{folder}'", "-b=train.batch_size = 4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "5.npy holds non-finite values" in err[0]


def test_two_process_errors_reach_the_launcher_as_one_line(world, tmp_path):
    """A worker's divergence (or bad file) stops both processes and is raised in the launcher as the same
    kind of error; no worker hangs at the next collective."""
    bindings = ["train.steps = 40", "train.lr = 1e4"]
    with pytest.raises(Diverged, match="diverged at step .* the newest checkpoint, checkpoint_"):
        launch(str(world / "tiny.gin"), bindings, str(tmp_path / "nan"), "gloo", 2)
    state = torch.load(latest_checkpoint(tmp_path / "nan"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    folder = world / "latents" / "good"
    bad = tmp_path / "latents"
    (bad / "features").mkdir(parents=True)
    (bad / "labels").mkdir()
    for i in range(6):
        np.save(bad / "features" / f"{i}.npy", np.load(folder / "features" / f"{i}.npy") * (np.nan if i == 3 else 1))
        np.save(bad / "labels" / f"{i}.npy", np.array(i))
    with pytest.raises(DataError, match="3.npy holds non-finite values"):
        launch(str(world / "tiny.gin"), [*LATENT, f"datasets.latent_folder.root = '{bad}'", "train.batch_size = 6"],
               str(tmp_path / "data"), "gloo", 2)

