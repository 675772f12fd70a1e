"""Evaluation: FID / IS / CAS through ignite metrics, the feature-extractor plugins, router diagnostics,
held-out loss in training, and `dyncompute eval`."""
import itertools
import json
import math
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import REFERENCE
from test_engine import _train

from dyncompute.cli import main
from dyncompute.data.procedural import ProceduralShapes
from dyncompute.evaluation.features import FeatureExtractor, ImageError, check_images
from dyncompute.evaluation.heldout import HELDOUT_SEED, nest
from dyncompute.evaluation.metrics import quality
from dyncompute.evaluation.router import auroc, spearman
from dyncompute.registry import FEATURE_EXTRACTORS

# The classifier of the default dataset configuration (32x32 RGB, 10 classes), trained by
# `FEATURE_EXTRACTORS.build("shapes_classifier", cache_dir=DIR)` with the default recipe (~12 s on two idle
# cores; 0.991 on its check seed) and committed, so tests read it from a tmp cache instead of training it.
DATA = {"size": 32, "channels": 3, "num_classes": 10}
CACHED = REFERENCE / "shapes_classifier-3110ed51bfdeaddb.pt"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    shutil.copy(CACHED, cache / CACHED.name)
    return cache


@pytest.fixture(scope="session")
def classifier(cache_dir):
    built = FEATURE_EXTRACTORS.build("shapes_classifier", dataset=ProceduralShapes(**DATA), cache_dir=str(cache_dir))
    assert built.path.name == CACHED.name, "the default recipe changed: retrain and commit its cache file"
    return built


def heldout(n, seed=HELDOUT_SEED):
    data = ProceduralShapes(**DATA, length=n, seed=seed)
    items = [data[i] for i in range(n)]
    return torch.stack([it["x"] for it in items]), torch.stack([it["y"] for it in items])


class Logits(FeatureExtractor):
    """A stand-in extractor with given logits per image (features: the mean pixel), for IS checks."""

    num_features = 1

    def __init__(self, logits):
        super().__init__()
        self.logits, self.num_classes = logits, logits.shape[1]

    def extract(self, images):
        return images.mean((1, 2, 3))[:, None], self.logits[: len(images)]


# ---- metrics ------------------------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(classifier):
    x, y = heldout(160)
    fids = []
    for sigma in (0.0, 0.1, 0.2, 0.4, 0.8):
        noisy = (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
        fids.append(quality([classifier], noisy, y, x, y)["fid_shapes"])
    assert abs(fids[0]) < 1e-3
    assert all(a < b for a, b in itertools.pairwise(fids)), fids


def test_inception_score_of_uniform_logits_is_one_and_of_confident_balanced_logits_is_k():
    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.arange(40) % 4
    assert quality([Logits(torch.zeros(40, 4))], x, y, x, y)["is"] == pytest.approx(1.0, abs=1e-6)
    confident = 50.0 * torch.nn.functional.one_hot(y, 4).float()
    assert quality([Logits(confident)], x, y, x, y)["is"] == pytest.approx(4.0, rel=1e-4)


def test_classifier_cas_on_real_heldout_images(classifier):
    """CAS of real held-out images (a seed the classifier never saw) against their true labels."""
    x, y = heldout(500)
    assert classifier.heldout_accuracy >= 0.98
    out = quality([classifier], x, y, x, y)
    assert out["cas"] >= 0.98 and out["cas_real"] == out["cas"]
    wrong = quality([classifier], x, (y + 1) % DATA["num_classes"], x, y)["cas"]
    assert wrong < 0.05  # CAS reads the conditioning labels


def test_classifier_trains_caches_and_refuses_a_weak_result(tmp_path):
    """A few steps of the real recipe: cached under its config hash, and below min_accuracy it is an error."""
    tiny = {"steps": 5, "train_images": 64, "check_images": 50, "min_accuracy": 0.98}
    with pytest.raises(RuntimeError, match=r"held-out accuracy, below 0.98 .*shapes_classifier.steps"):
        FEATURE_EXTRACTORS.build("shapes_classifier", cache_dir=str(tmp_path), **tiny)
    (cached,) = tmp_path.glob("shapes_classifier-*.pt")
    loaded = FEATURE_EXTRACTORS.build("shapes_classifier", cache_dir=str(tmp_path), **{**tiny, "min_accuracy": 0.0})
    assert loaded.path == cached and loaded.heldout_accuracy < 0.98  # read back, not retrained
    x, _ = heldout(4)
    features, logits = loaded(x)
    assert features.shape == (4, loaded.num_features) and logits.shape == (4, 10)


@pytest.mark.parametrize("images, message", [
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "floating point"),
    (torch.rand(4, 3, 8, 8) * 255, r"must lie in \[-1, 1\]"),
    (torch.zeros(3, 8, 8), r"shape \(N, C, H, W\)"),
    (torch.zeros(4, 2, 8, 8), r"shape \(N, C, H, W\)"),
    (torch.full((4, 3, 8, 8), float("nan")), "NaN"),
    ("not a tensor", "torch.Tensor"),
])
def test_bad_images_are_clear_errors(images, message):
    with pytest.raises(ImageError, match=message):
        check_images(images)
    good = torch.zeros(4, 3, 8, 8)
    if torch.is_tensor(images) and images.dim() == 4 and images.shape[0] == 4:
        with pytest.raises(ImageError, match="^generated images .*" + message):
            quality([Logits(torch.zeros(4, 2))], images, torch.zeros(4), good, torch.zeros(4))


def test_fid_needs_as_many_real_as_generated_images():
    x = torch.zeros(8, 3, 8, 8)
    with pytest.raises(ValueError, match="as many real as generated"):
        quality([Logits(torch.zeros(8, 2))], x, torch.zeros(8), x[:4], torch.zeros(4))


# ---- inception -------------------------------------------------------------------------------------------

def _random_inception_state(path):
    """A random state dict with torch-fidelity's InceptionV3 layout (its own building blocks)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    net = torch.nn.Module()
    blocks = [("Conv2d_1a_3x3", tfi.BasicConv2d(3, 32, kernel_size=3, stride=2)),
              ("Conv2d_2a_3x3", tfi.BasicConv2d(32, 32, kernel_size=3)),
              ("Conv2d_2b_3x3", tfi.BasicConv2d(32, 64, kernel_size=3, padding=1)),
              ("Conv2d_3b_1x1", tfi.BasicConv2d(64, 80, kernel_size=1)),
              ("Conv2d_4a_3x3", tfi.BasicConv2d(80, 192, kernel_size=3)),
              ("Mixed_5b", tfi.InceptionA(192, pool_features=32)), ("Mixed_5c", tfi.InceptionA(256, pool_features=64)),
              ("Mixed_5d", tfi.InceptionA(288, pool_features=64)), ("Mixed_6a", tfi.InceptionB(288)),
              ("Mixed_6b", tfi.InceptionC(768, channels_7x7=128)), ("Mixed_6c", tfi.InceptionC(768, channels_7x7=160)),
              ("Mixed_6d", tfi.InceptionC(768, channels_7x7=160)), ("Mixed_6e", tfi.InceptionC(768, channels_7x7=192)),
              ("Mixed_7a", tfi.InceptionD(768)), ("Mixed_7b", tfi.InceptionE_1(1280)),
              ("Mixed_7c", tfi.InceptionE_2(2048)), ("fc", torch.nn.Linear(2048, 1008))]
    for name, layer in blocks:
        net.add_module(name, layer)
    torch.save(net.state_dict(), path)


def test_inception_runs_the_real_architecture_from_a_local_file(tmp_path, monkeypatch):
    """Random weights (the real file is not here): the path, shapes and FID/IS plumbing are what is checked."""
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    _random_inception_state(path)
    monkeypatch.setenv("DYNCOMPUTE_INCEPTION_WEIGHTS", str(path))
    inception = FEATURE_EXTRACTORS.build("inception")
    x = torch.rand(2, 1, 16, 16) * 2 - 1  # one channel is read as grey, as the .npz export writes it
    features, logits = inception(x)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()


def test_inception_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DYNCOMPUTE_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth.*github.com/toshas"):
        FEATURE_EXTRACTORS.build("inception")
    missing = tmp_path / "nowhere.pth"
    monkeypatch.setenv("DYNCOMPUTE_INCEPTION_WEIGHTS", str(missing))
    with pytest.raises(FileNotFoundError, match=f"not found: {missing}"):
        FEATURE_EXTRACTORS.build("inception")
    with pytest.raises(FileNotFoundError, match="explicit.pth"):  # the setting wins over the environment
        FEATURE_EXTRACTORS.build("inception", weights_path=str(tmp_path / "explicit.pth"))


# ---- router diagnostics ------------------------------------------------------------------------------

def test_auroc_of_perfect_inverted_and_uninformative_maps():
    mask = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.3
    assert auroc(mask.float(), mask) == 1.0
    assert auroc(1 - mask.float(), mask) == 0.0
    assert auroc(torch.full(mask.shape, 0.7), mask) == 0.5  # ties count one half
    assert abs(auroc(torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)), mask) - 0.5) < 0.05
    assert math.isnan(auroc(torch.rand(8), torch.ones(8)))


def test_spearman_sign_and_constant_input():
    t = torch.arange(10.0)
    assert spearman(-t ** 3, t) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.ones(10), t))


def test_tokenizer_protocol_maps():
    from dyncompute.model import DiffusionTransformer

    kw = {"input_size": 8, "in_channels": 3, "num_classes": 4, "hidden_size": 32, "depth": 1, "num_heads": 2}
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 1])
    static = DiffusionTransformer(**kw, tokenizer="patchify")
    _, info = static(x, t, y, return_info=True)
    assert static.tokenizer.token_map(info.state) is None and static.tokenizer.boundary_probability(info.state) is None
    dynamic = DiffusionTransformer(**kw, tokenizer="dynamic_chunking")
    _, info = dynamic(x, t, y, return_info=True)
    p, kept = dynamic.tokenizer.boundary_probability(info.state), dynamic.tokenizer.token_map(info.state)
    assert p.shape == kept.shape == (2, 8, 8) and torch.equal(kept, p > 0.5)  # no tail drop: kept = p > 0.5


def test_nest_groups_timestep_columns():
    assert nest({"router_auroc_t20": 0.7, "router_auroc_t0": 0.9, "cas": 0.5}) == {
        "router_auroc": {"20": 0.7, "0": 0.9}, "cas": 0.5}


# ---- training and `dyncompute eval` ----------------------------------------------------------------------

TINY = """
DiffusionTransformer.input_size = 32
DiffusionTransformer.in_channels = 3
DiffusionTransformer.num_classes = 10
DiffusionTransformer.hidden_size = 32
DiffusionTransformer.depth = 1
DiffusionTransformer.num_heads = 2
DiffusionTransformer.tokenizer = 'dynamic_chunking'
routers.predictability.init_bias = 0.0
datasets.procedural.size = 32
datasets.procedural.length = 64
train.batch_size = 8
train.steps = 4
train.checkpoint_every = 4
train.log_every = 1
train.ema_decay = 0.5
train.progress = False
train.device = 'cpu'
train_evaluator.num_images = 8
"""


@pytest.fixture
def gin_file(tmp_path):
    """A tiny DC-DiT on 32x32 images (the classifier's size); the training helper is test_engine's."""
    (tmp_path / "tiny_dcdit.gin").write_text(TINY)
    return tmp_path / "tiny_dcdit.gin"


def test_training_evaluator_writes_metrics_and_leaves_training_alone(gin_file, tmp_path):
    plain = _train(gin_file, tmp_path / "plain")
    evaluated = _train(gin_file, tmp_path / "evaluated", "train.eval_every = 2",
                       "train_evaluator.timesteps = (0, 500, 999)")
    for a, b in zip(plain["model"].state_dict().values(), evaluated["model"].state_dict().values()):
        assert torch.equal(a, b)  # the evaluator draws no training randomness
    metrics = pd.read_csv(tmp_path / "evaluated" / "metrics.csv")
    for column in ("denoising_mse_t0", "denoising_mse_t999", "router_auroc_t500", "kept_fraction_t0",
                   "kept_vs_noise_spearman"):
        assert metrics[column].notna().tolist() == [False, True, False, True], column
    assert metrics["denoising_mse_t999"].iloc[-1] > 0
    assert metrics["kept_fraction_t0"].dropna().between(0, 1).all()


def test_eval_cli_json_on_a_tiny_run(gin_file, tmp_path, cache_dir, classifier, capsys, monkeypatch):
    monkeypatch.setenv("DYNCOMPUTE_CACHE", str(cache_dir))
    run = tmp_path / "run"
    _train(gin_file, run)
    args = ["eval", str(run), "--samples", "80", "--sampler", "ddim", "--steps", "2", "--heldout", "8",
            "--out", str(tmp_path / "eval")]
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 80
    for key in ("fid_shapes", "is_shapes", "cas", "fid_shapes_real", "cas_real", "kept_vs_noise_spearman"):
        assert isinstance(result[key], float), key
    assert 1.0 <= result["is_shapes"] <= DATA["num_classes"] and 0.0 <= result["cas"] <= 1.0
    assert result["cas_real"] >= 0.95  # 80 real images; the 0.98 bar is checked on 500 above
    for key in ("router_auroc", "kept_fraction", "denoising_mse"):
        assert {"0", "20", "50", "100", "250", "500", "999"} <= set(result[key]), key
    assert all(0.0 <= v <= 1.0 for v in result["router_auroc"].values())
    assert (tmp_path / "eval" / "router_maps.png").stat().st_size > 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["cas"] == result["cas"]


def test_eval_runs_in_a_fresh_process(gin_file, tmp_path, cache_dir, classifier):
    """A new `dyncompute eval` process has never imported the trainer, whose bindings the run's config holds
    (it failed with "No configurable matching 'train'" while every in-process test passed)."""
    run = tmp_path / "run"
    _train(gin_file, run)
    cmd = [sys.executable, "-m", "dyncompute.cli", "eval", str(run), "--sampler", "ddim", "--steps", "2",
           "--heldout", "8", "--json", "--out", str(tmp_path / "eval")]
    env = {**os.environ, "DYNCOMPUTE_CACHE": str(cache_dir)}
    done = subprocess.run(cmd + ["--samples", "80"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_samples"] == 80
    few = subprocess.run(cmd + ["--samples", "4"], capture_output=True, text=True, env=env)  # before sampling
    assert few.returncode == 2 and few.stderr.count("\n") == 1 and "fid_shapes needs more images" in few.stderr


def test_eval_cli_errors_are_one_line(gin_file, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DYNCOMPUTE_INCEPTION_WEIGHTS", raising=False)
    run = tmp_path / "run"
    _train(gin_file, run, "train.steps = 1", "train.checkpoint_every = 1")
    assert main(["eval", str(run), "--features", "inception"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "DYNCOMPUTE_INCEPTION_WEIGHTS" in err
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err
