"""Pre-extracted VAE latents in fast-DiT's layout: one ``.npy`` per sample, features and labels apart.

    root/
      features/0.npy   # (1, 4, 32, 32) or (4, 32, 32)
      labels/0.npy     # (1,) or ()

fast-DiT's own folder names (``imagenet256_features/`` and ``imagenet256_labels/``) work as well.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dyncompute.registry import DATASETS

LAYOUT = "root/features/<name>.npy and root/labels/<name>.npy (or fast-DiT's *_features/ and *_labels/)"


@DATASETS.register("latent_folder")
class LatentFolder(Dataset):
    """Latents as ``{"x": (C, H, W) float, "y": long scalar, "mask": (H, W) bool}`` items.

    Latents have no ground-truth detail map, so ``mask`` is all True: it keeps items collatable
    with :class:`ProceduralShapes` ones, and mask-based metrics become trivial on this data.
    """

    def __init__(self, root: str | Path, num_classes: int = 1000):
        self.root = Path(root)
        self.num_classes = num_classes
        features_dir, labels_dir = _find_dirs(self.root)
        self.features, self.labels = _paired_files(features_dir, labels_dir)
        self.channels, self.size, _ = self._load_x(0).shape

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x = self._load_x(index)
        label = _load(self.labels[index])
        if label.size != 1:
            raise ValueError(f"label file {self.labels[index]} should hold one value, has shape {label.shape}")
        y = int(label.reshape(()))
        if not 0 <= y < self.num_classes:
            raise ValueError(f"label {y} in {self.labels[index]} is outside [0, {self.num_classes}); set num_classes")
        return {"x": x, "y": torch.tensor(y, dtype=torch.long), "mask": torch.ones(x.shape[1:], dtype=torch.bool)}

    def _load_x(self, index: int) -> torch.Tensor:
        array = _load(self.features[index])
        if array.ndim == 4 and array.shape[0] == 1:  # fast-DiT keeps the batch axis
            array = array[0]
        if array.ndim != 3:
            raise ValueError(f"feature file {self.features[index]} should be (C, H, W) or (1, C, H, W), "
                             f"has shape {array.shape}")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _find_dirs(root: Path) -> tuple[Path, Path]:
    """root/features + root/labels, else the single fast-DiT style *_features + *_labels pair."""
    if not root.is_dir():
        raise FileNotFoundError(f"latent folder {root} does not exist; expected {LAYOUT}")
    if (root / "features").is_dir() and (root / "labels").is_dir():
        return root / "features", root / "labels"
    pairs = [(f, root / (f.name[: -len("features")] + "labels")) for f in sorted(root.glob("*_features"))]
    pairs = [(f, lab) for f, lab in pairs if f.is_dir() and lab.is_dir()]
    if len(pairs) == 1:
        return pairs[0]
    raise FileNotFoundError(f"no features/ and labels/ folders under {root}; expected {LAYOUT}")


def _paired_files(features_dir: Path, labels_dir: Path) -> tuple[list[Path], list[Path]]:
    """Feature and label files matched by name, in numeric order when names are integers."""
    features = {p.stem: p for p in features_dir.glob("*.npy")}
    labels = {p.stem: p for p in labels_dir.glob("*.npy")}
    if not features and not labels:
        raise ValueError(f"no .npy files in {features_dir} or {labels_dir}; expected {LAYOUT}")
    if features.keys() != labels.keys():
        only_f = sorted(features.keys() - labels.keys())[:5]
        only_l = sorted(labels.keys() - features.keys())[:5]
        raise ValueError(
            f"feature and label files do not match in {features_dir.parent}: "
            f"without label {only_f}, without feature {only_l} (first few shown)"
        )
    names = sorted(features, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))
    return [features[n] for n in names], [labels[n] for n in names]


def _load(path: Path) -> np.ndarray:
    """np.load with the file named in the error, whatever way the file is broken."""
    try:
        return np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, OSError, EOFError... for bad files
        raise ValueError(f"cannot read {path} as a .npy array: {error}") from error
