"""Datasets: the procedural set must be deterministic and have the structure DC-DiT relies on."""
from __future__ import annotations

import gin
import numpy as np
import pytest
import torch

from dyncompute.data import LatentFolder, ProceduralShapes
from dyncompute.registry import DATASETS


@pytest.fixture(scope="module")
def samples():
    ds = ProceduralShapes(size=32, length=200)
    return [ds[i] for i in range(200)]


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("x", "y", "mask"))


def test_registered_and_gin_configurable():
    assert "procedural" in DATASETS and "latent_folder" in DATASETS
    gin.parse_config("datasets.procedural.size = 16")
    try:
        assert ProceduralShapes().size == 16
    finally:
        gin.clear_config()


def test_deterministic_per_seed_and_index():
    ds = ProceduralShapes(seed=3)
    assert _same(ds[7], ds[7])
    assert _same(ds[7], ProceduralShapes(seed=3)[7])  # a fresh instance (another worker) agrees
    assert not torch.equal(ds[7]["x"], ds[17]["x"])
    assert not torch.equal(ds[7]["x"], ProceduralShapes(seed=4)[7]["x"])


def test_unaffected_by_global_rng():
    ds = ProceduralShapes()
    torch.manual_seed(0)
    a = ds[5]
    torch.manual_seed(123)
    torch.rand(100)
    assert _same(a, ds[5])


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_shapes_dtypes_range(size, channels):
    ds = ProceduralShapes(size=size, channels=channels, length=20)
    assert (ds.size, ds.channels, ds.num_classes) == (size, channels, 10)
    for i in (0, 3, 11):
        item = ds[i]
        assert item["x"].shape == (channels, size, size) and item["x"].dtype == torch.float32
        assert item["mask"].shape == (size, size) and item["mask"].dtype == torch.bool
        assert item["y"].dtype == torch.long and item["y"].ndim == 0
        assert item["x"].min() >= -1 and item["x"].max() <= 1


def test_detail_fraction_spread(samples):
    fractions = torch.tensor([s["mask"].float().mean().item() for s in samples])
    assert fractions.min() >= 0.1 and fractions.max() <= 0.7
    assert fractions.std() > 0.05


def test_classes_balanced(samples):
    counts = torch.bincount(torch.stack([s["y"] for s in samples]), minlength=10)
    assert len(counts) >= 10 and (counts > 0).all()
    assert ProceduralShapes(num_classes=20)[19]["y"].item() == 19


def test_background_smooth_detail_busy(samples):
    def neighbour_diffs(x):
        return torch.cat([(x[:, 1:] - x[:, :-1]).abs().mean(0).flatten(),
                          (x[:, :, 1:] - x[:, :, :-1]).abs().mean(0).flatten()])

    def pair_masks(m):
        return torch.cat([(m[1:] & m[:-1]).flatten(), (m[:, 1:] & m[:, :-1]).flatten()])

    background, detail = [], []
    for s in samples:
        diffs = neighbour_diffs(s["x"])
        background.append(diffs[pair_masks(~s["mask"])])
        detail.append(diffs[pair_masks(s["mask"])])
    background, detail = torch.cat(background).mean(), torch.cat(detail).mean()
    assert background < 0.05 and detail > 10 * background


@pytest.mark.parametrize("size", [16, 32])
def test_every_edge_lies_inside_the_mask(size):
    """Both sides of a sharp colour jump are masked: the 1-px band catches the outer side."""
    ds = ProceduralShapes(size=size)
    for i in range(30):
        x, m = ds[i]["x"], ds[i]["mask"]
        jump_v = (x[:, 1:] - x[:, :-1]).abs().amax(0) > 0.3
        jump_h = (x[:, :, 1:] - x[:, :, :-1]).abs().amax(0) > 0.3
        assert (m[1:] & m[:-1])[jump_v].all() and (m[:, 1:] & m[:, :-1])[jump_h].all()


@pytest.mark.parametrize(
    "kwargs",
    [{"size": 20}, {"size": 4}, {"size": 32.0}, {"channels": 2}, {"num_classes": 21}, {"detail_range": (0.5, 0.2)}],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ProceduralShapes(**kwargs)


# -- LatentFolder --------------------------------------------------------------------------------


def _write_latents(root, n=3, batch_axis=True):
    (root / "features").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((n, 4, 8, 8)).astype(np.float32)
    for i in range(n):
        np.save(root / "features" / f"{i}.npy", latents[i : i + 1] if batch_axis else latents[i])
        np.save(root / "labels" / f"{i}.npy", np.array([i * 7]) if batch_axis else np.array(i * 7))
    return latents


@pytest.mark.parametrize("batch_axis", [True, False])
def test_latent_folder_round_trip(tmp_path, batch_axis):
    latents = _write_latents(tmp_path, n=12, batch_axis=batch_axis)
    ds = LatentFolder(tmp_path, num_classes=100)
    assert len(ds) == 12 and (ds.channels, ds.size, ds.num_classes) == (4, 8, 100)
    for i in (0, 2, 10):  # numeric order: 10 comes after 2
        item = ds[i]
        assert torch.equal(item["x"], torch.from_numpy(latents[i]))
        assert item["y"].item() == i * 7 and item["y"].dtype == torch.long
        assert item["mask"].shape == (8, 8) and item["mask"].all()
    torch.utils.data.default_collate([ds[0], ds[1]])


def test_latent_folder_fast_dit_names(tmp_path):
    (tmp_path / "imagenet256_features").mkdir()
    (tmp_path / "imagenet256_labels").mkdir()
    np.save(tmp_path / "imagenet256_features" / "0.npy", np.zeros((1, 4, 8, 8), np.float32))
    np.save(tmp_path / "imagenet256_labels" / "0.npy", np.array([3]))
    assert LatentFolder(tmp_path)[0]["y"].item() == 3


def test_latent_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="features"):
        LatentFolder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="labels"):
        LatentFolder(tmp_path)


def test_latent_folder_empty_and_mismatched(tmp_path):
    (tmp_path / "features").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(ValueError, match="no .npy"):
        LatentFolder(tmp_path)
    np.save(tmp_path / "features" / "0.npy", np.zeros((4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        LatentFolder(tmp_path)


def test_latent_folder_corrupt_file(tmp_path):
    """A broken file is named when the folder is opened, and when it breaks later, when it is read."""
    _write_latents(tmp_path)
    good = (tmp_path / "features" / "1.npy").read_bytes()
    (tmp_path / "features" / "1.npy").write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match="1.npy is not a .npy file"):
        LatentFolder(tmp_path)
    (tmp_path / "features" / "1.npy").write_bytes(good)
    ds = LatentFolder(tmp_path)
    np.save(tmp_path / "features" / "1.npy", np.full((4, 8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="1.npy holds non-finite"):
        ds[1]
    np.save(tmp_path / "features" / "1.npy", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"1.npy has shape \(4, 4, 4\)"):
        ds[1]
