"""Trainer, resume, gin handling, sampling and the CLI on a tiny model."""
import numpy as np
import pandas as pd
import pytest
import torch

from dyncompute.cli import main
from dyncompute.config import ConfigError, scoped
from dyncompute.engine import train
from dyncompute.runs import latest_checkpoint, load_run
from dyncompute.sampling import generate

TINY = """
DiffusionTransformer.input_size = 8
DiffusionTransformer.in_channels = 3
DiffusionTransformer.num_classes = 10
DiffusionTransformer.hidden_size = 32
DiffusionTransformer.depth = 2
DiffusionTransformer.num_heads = 2
tokenizers.patchify.patch_size = 2
datasets.procedural.size = 8
datasets.procedural.length = 16  # 2 batches an epoch: checkpoints fall on epoch ends
train.batch_size = 8
train.lr = 1e-3
train.steps = 4
train.checkpoint_every = 2
train.log_every = 1
train.progress = False
train.device = 'cpu'
"""


@pytest.fixture
def gin_file(tmp_path):
    path = tmp_path / "tiny.gin"
    path.write_text(TINY)
    return path


def _train(gin_file, run_dir, *bindings):
    with scoped([gin_file], list(bindings)):
        return train(run_dir)


def test_train_writes_run_dir(gin_file, tmp_path):
    result = _train(gin_file, tmp_path / "run")
    run = tmp_path / "run"
    assert result["steps"] == 4
    assert (run / "config.gin").read_text().count("DiffusionTransformer.hidden_size = 32") == 1
    assert "train.steps" in (run / "operative_config.gin").read_text()
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["step"]) == [1, 2, 3, 4]
    assert {"loss", "mse", "vb", "grad_norm", "lr", "tokens_per_sample"} <= set(metrics.columns)
    assert latest_checkpoint(run).name == "checkpoint_4.pt"


def test_training_learns(gin_file, tmp_path):
    """A few dozen steps on the built-in data must bring the diffusion loss down."""
    result = _train(gin_file, tmp_path / "run", "train.steps = 40", "train.checkpoint_every = 40")
    loss = result["metrics"]["mse"]
    assert loss.iloc[-10:].mean() < 0.8 * loss.iloc[:5].mean()


def test_resume_continues_exactly(gin_file, tmp_path):
    full = _train(gin_file, tmp_path / "full")
    start = _train(gin_file, tmp_path / "start", "train.steps = 1")["model"]
    assert any(not torch.equal(a, b) for a, b in zip(full["model"].state_dict().values(),
                                                     start.state_dict().values()))
    _train(gin_file, tmp_path / "split", "train.steps = 3")  # stops mid-epoch (2 batches an epoch)
    resumed = _train(gin_file, tmp_path / "split")  # picks up checkpoint_3 and runs step 4
    assert resumed["steps"] == 4
    for a, b in zip(full["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    m_full = pd.read_csv(tmp_path / "full" / "metrics.csv")
    m_split = pd.read_csv(tmp_path / "split" / "metrics.csv")
    assert np.allclose(m_full["loss"], m_split["loss"])


def test_malformed_gin_is_clear(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("train.steps = = 3\n")
    with pytest.raises(ConfigError, match="malformed gin file .*bad.gin"):
        with scoped([bad]):
            pass
    with pytest.raises(ConfigError, match="gin file not found"):
        with scoped([tmp_path / "missing.gin"]):
            pass
    with pytest.raises(ConfigError, match="bad gin binding"):
        with scoped([], ["no_such_thing.param = 1"]):
            pass


def test_dataset_model_mismatch_is_clear(gin_file, tmp_path):
    with pytest.raises(ValueError, match="gives 3x16x16 images"):
        _train(gin_file, tmp_path / "r", "datasets.procedural.size = 16")


def test_sample_cli_writes_png_and_adm_npz(gin_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(gin_file), "--run-dir", str(run)]) == 0
    assert main(["sample", str(run), "-n", "6", "--sampler", "ddim", "--steps", "5",
                 "--out", str(tmp_path / "s")]) == 0
    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (6, 8, 8, 3) and arr.dtype == np.uint8
    assert (tmp_path / "s" / "samples.png").stat().st_size > 0
    assert '"nfe": 5' in capsys.readouterr().out


def test_generate_with_cfg_counts_nfe(gin_file, tmp_path):
    _train(gin_file, tmp_path / "run")
    model = load_run(tmp_path / "run")
    res = generate(model, num_samples=4, sampler="ddim", num_steps=3, cfg_scale=2.0, device="cpu")
    assert res.images.shape == (4, 3, 8, 8) and res.nfe == 3


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.gin")]) == 2
    assert "gin file not found" in capsys.readouterr().err
