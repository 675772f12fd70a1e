"""`shapes_classifier`: a small CNN trained on the built-in procedural dataset, for fid_shapes / is_shapes / cas.

The Inception network knows nothing of textured shapes on 32x32 gradients; a classifier of the dataset's own
classes does. It is trained once per (dataset configuration, training configuration), cached under
``cache_dir`` by a hash of both, and must reach ``min_accuracy`` on held-out images drawn with a seed its
training never sees. Its pool features (FID) and logits (IS) give ``fid_shapes`` and ``is_shapes``: numbers
comparable between runs on the same data, never with published FIDs.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dyncompute.data.procedural import ProceduralShapes
from dyncompute.evaluation.features import FeatureExtractor
from dyncompute.io import atomic_save, load_checkpoint
from dyncompute.registry import FEATURE_EXTRACTORS

VERSION = 1  # bump when the network or the training recipe changes: old cache entries stop matching
CACHE_ENV = "DYNCOMPUTE_CACHE"
TRAIN_SEED = 9_001  # the classifier's training images
CHECK_SEED = 9_002  # its held-out accuracy check: never trained on


class ShapesCNN(nn.Module):
    """Conv-BN-ReLU stages halving the grid down to 4x4, global average pool (features), linear (logits)."""

    def __init__(self, channels: int, size: int, num_classes: int, width: int):
        super().__init__()
        layers, c = _stage(channels, width) + [nn.MaxPool2d(2)], width
        for _ in range(max(0, (size // 2).bit_length() - 3)):  # 32 -> 16 -> 8 -> 4
            layers += _stage(c, 2 * c) + [nn.MaxPool2d(2)]
            c *= 2
        self.body = nn.Sequential(*layers, *_stage(c, c), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)
        self.num_features = c

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def _stage(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


@FEATURE_EXTRACTORS.register("shapes_classifier")
class ShapesClassifier(FeatureExtractor):
    """The dataset's own classifier; ``dataset`` (a `ProceduralShapes`) fixes size, channels and classes."""

    fid_name, is_name, cas_name = "fid_shapes", "is_shapes", "cas"

    def __init__(self, dataset: ProceduralShapes | None = None, cache_dir: str | None = None, width: int = 16,
                 steps: int = 1000, batch_size: int = 64, lr: float = 1e-2, train_images: int = 8000,
                 check_images: int = 2000, min_accuracy: float = 0.98):
        super().__init__()
        self.config = {"version": VERSION, **_data_config(dataset), "width": width, "steps": steps,
                       "batch_size": batch_size, "lr": lr, "train_images": train_images,
                       "check_images": check_images, "train_seed": TRAIN_SEED, "check_seed": CHECK_SEED}
        c = self.config
        self.net = ShapesCNN(c["channels"], c["size"], c["num_classes"], width)
        self.num_features, self.num_classes = self.net.num_features, c["num_classes"]
        self.path = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dyncompute") / (
            f"shapes_classifier-{config_hash(c)}.pt")
        self.heldout_accuracy = self._load_or_train()
        if self.heldout_accuracy < min_accuracy:
            raise RuntimeError(f"shapes_classifier reaches {self.heldout_accuracy:.4f} held-out accuracy, below "
                               f"{min_accuracy} (cached: {self.path}); train longer with "
                               "feature_extractors.shapes_classifier.steps")
        self.requires_grad_(False)
        self.eval()

    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if tuple(images.shape[1:]) != (c["channels"], c["size"], c["size"]):
            raise ValueError(f"shapes_classifier was trained on {c['channels']}x{c['size']}x{c['size']} images, "
                             f"got {tuple(images.shape[1:])}")
        return self.net(images.float())

    def _load_or_train(self) -> float:
        if self.path.is_file():
            record = load_checkpoint(self.path)
            self.net.load_state_dict(record["state_dict"])
            return float(record["heldout_accuracy"])
        t0 = time.perf_counter()
        print(f"training shapes_classifier for {self.config} -> {self.path}", file=sys.stderr)
        accuracy = train_classifier(self.net, self.config)
        print(f"shapes_classifier: held-out accuracy {accuracy:.4f} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
        atomic_save({"config": self.config, "state_dict": self.net.state_dict(), "heldout_accuracy": accuracy},
                    self.path)
        return accuracy


def _data_config(dataset) -> dict:
    if dataset is None:
        dataset = ProceduralShapes()
    if not isinstance(dataset, ProceduralShapes):
        raise TypeError(f"shapes_classifier classifies the built-in procedural dataset, not {type(dataset).__name__}")
    return {"size": dataset.size, "channels": dataset.channels, "num_classes": dataset.num_classes,
            "detail_range": list(dataset.detail_range)}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def procedural_images(config: dict, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` items of the procedural dataset with ``config`` and ``seed``: (images, labels)."""
    data = ProceduralShapes(size=config["size"], channels=config["channels"], num_classes=config["num_classes"],
                            length=n, seed=seed, detail_range=tuple(config["detail_range"]))
    items = [data[i] for i in range(n)]
    return torch.stack([it["x"] for it in items]), torch.stack([it["y"] for it in items])


def train_classifier(net: ShapesCNN, config: dict) -> float:
    """AdamW with a one-cycle schedule on fixed training images; returns held-out accuracy."""
    x, y = procedural_images(config, config["train_seed"], config["train_images"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["train_seed"])
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=config["lr"], weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, config["lr"], total_steps=config["steps"])
        for _ in range(config["steps"]):
            idx = torch.randint(0, len(x), (config["batch_size"],))
            loss = F.cross_entropy(net(x[idx])[1], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    net.eval()
    x, y = procedural_images(config, config["check_seed"], config["check_images"])
    with torch.no_grad():
        return (net(x)[1].argmax(1) == y).float().mean().item()
