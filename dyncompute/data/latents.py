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

from dyncompute.errors import ConfigError, DataError
from dyncompute.registry import DATASETS

LAYOUT = "root/features/<name>.npy and root/labels/<name>.npy (or fast-DiT's *_features/ and *_labels/)"


@DATASETS.register("latent_folder")
class LatentFolder(Dataset):
    """Latents as ``{"x": (C, H, W) float, "y": long scalar, "mask": (H, W) bool}`` items.

    Latents have no ground-truth detail map, so ``mask`` is all True: it keeps items collatable
    with :class:`ProceduralShapes` ones, and mask-based metrics become trivial on this data.
    Building it checks the folder cheaply (``scan`` files' headers and labels); every item read is
    checked too, and a bad file is always named.
    """

    def __init__(self, root: str | Path, num_classes: int = 1000, scan: int = 4096):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"datasets.latent_folder.num_classes = {num_classes!r}: must be an integer >= 1")
        self.root = Path(root)
        self.num_classes = num_classes
        features_dir, labels_dir = _find_dirs(self.root)
        self.features, self.labels = _paired_files(features_dir, labels_dir)
        self.shape = _feature_shape(self.features[0], _header(self.features[0])[0])
        self.channels, self.size, _ = self.shape
        self._scan(scan)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One sample, checked as it is read: a file broken after the up-front scan is still named."""
        array = _load(self.features[index])
        self._check_feature(index, array.shape, array.dtype)
        x = torch.from_numpy(np.ascontiguousarray(array.reshape(self.shape), dtype=np.float32))
        if not torch.isfinite(x).all():
            raise DataError(f"feature file {self.features[index]} holds non-finite values (NaN or inf)")
        y = self._label(index, _load(self.labels[index]))
        return {"x": x, "y": torch.tensor(y, dtype=torch.long), "mask": torch.ones(x.shape[1:], dtype=torch.bool)}

    def _scan(self, limit: int) -> None:
        """Headers of the feature files and the label values, all of them or ``limit`` spread evenly
        (always the first and the last): cheap, and a bad file is named before training starts."""
        n = len(self.features)
        picks = range(n) if n <= limit else sorted(set(np.linspace(0, n - 1, limit).round().astype(int).tolist()))
        for i in picks:
            self._check_feature(i, *_header(self.features[i]))
            self._label(i, _load(self.labels[i]))

    def _check_feature(self, index: int, shape: tuple, dtype: np.dtype) -> None:
        path = self.features[index]
        if not np.issubdtype(dtype, np.floating):
            raise DataError(f"feature file {path} holds {dtype} values; latents must be real floating point")
        if _feature_shape(path, shape) != self.shape:
            raise DataError(f"feature file {path} has shape {tuple(shape)}, unlike {self.features[0].name} "
                            f"{self.shape}; every latent must have the same shape")

    def _label(self, index: int, label: np.ndarray) -> int:
        path = self.labels[index]
        if label.size != 1:
            raise DataError(f"label file {path} should hold one value, has shape {label.shape}")
        value = label.reshape(()).item()
        integral = np.issubdtype(label.dtype, np.integer) or (
            np.issubdtype(label.dtype, np.floating) and np.isfinite(value) and float(value).is_integer())
        if not integral:
            raise DataError(f"label file {path} holds {value!r} ({label.dtype}); labels must be integer class indices")
        if not 0 <= int(value) < self.num_classes:
            raise DataError(f"label {int(value)} in {path} is outside [0, {self.num_classes}); "
                            "set datasets.latent_folder.num_classes")
        return int(value)


def _feature_shape(path: Path, shape: tuple) -> tuple:
    """(C, H, W) of a feature file's shape; fast-DiT keeps a leading batch axis of 1."""
    shape = tuple(shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or shape[1] != shape[2] or min(shape) < 1:
        raise DataError(f"feature file {path} should be (C, H, H) or (1, C, H, H), has shape {shape}")
    return shape


def _header(path: Path) -> tuple[tuple, np.dtype]:
    """Shape and dtype of a .npy file from its header; mapping (not reading) the data also finds truncation."""
    _check_magic(path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # truncated, or an object array
        raise DataError(f"cannot read {path} as a .npy array: {_npy_problem(error)}") from error
    return array.shape, array.dtype


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
        raise DataError(f"no .npy files in {features_dir} or {labels_dir}; expected {LAYOUT}")
    if features.keys() != labels.keys():
        only_f = sorted(features.keys() - labels.keys())[:5]
        only_l = sorted(labels.keys() - features.keys())[:5]
        raise DataError(
            f"feature and label files do not match in {features_dir.parent}: "
            f"without label {only_f}, without feature {only_l} (first few shown)"
        )
    names = sorted(features, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))
    return [features[n] for n in names], [labels[n] for n in names]


def _load(path: Path) -> np.ndarray:
    """np.load with the file named in the error, whatever way the file is broken."""
    _check_magic(path)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, OSError, EOFError... for bad files
        raise DataError(f"cannot read {path} as a .npy array: {_npy_problem(error)}") from error


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from error
    if magic != b"\x93NUMPY":
        raise DataError(f"{path} is not a .npy file (no .npy header)")


def _npy_problem(error: Exception) -> str:
    if "pickled" in str(error):
        return "it holds pickled Python objects, which are not loaded"
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__
