"""`inception`: the TF-compatible InceptionV3 of FID and IS, as torch-fidelity provides it.

2048-d pool features for FID, the 1008 unbiased logits for IS (torch-fidelity's choices, matching the
TensorFlow originals). Images are quantised to uint8 exactly as the ``.npz`` samples are, then resized
inside the network the TensorFlow way. Weights come only from a local file: the ``weights_path``
setting (``feature_extractors.inception.weights_path``) or the ``DYNCOMPUTE_INCEPTION_WEIGHTS``
environment variable; nothing is downloaded. Without torch-fidelity's released file the numbers are not
FIDs (a random network still runs, which is how the tests check the path).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dyncompute.evaluation.features import FeatureExtractor, to_uint8_rgb
from dyncompute.io import load_checkpoint
from dyncompute.registry import FEATURE_EXTRACTORS

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
WEIGHTS_ENV = "DYNCOMPUTE_INCEPTION_WEIGHTS"
FEATURES = ("2048", "logits_unbiased")


def weights_file(weights_path: str | None = None) -> Path:
    """The local weights file (setting first, then the environment); a clear error when absent."""
    path = weights_path or os.environ.get(WEIGHTS_ENV)
    where = (f"download {WEIGHTS_FILE} (torch-fidelity's release: {WEIGHTS_URL}) and point "
             f"{WEIGHTS_ENV} or feature_extractors.inception.weights_path at it")
    if not path:
        raise FileNotFoundError(f"Inception weights not configured: {where}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"Inception weights file not found: {path}; {where}")
    return Path(path)


@FEATURE_EXTRACTORS.register("inception")
class Inception(FeatureExtractor):
    """torch-fidelity's FeatureExtractorInceptionV3 from a local file; ``dataset`` is not used."""

    fid_name, is_name = "fid", "is"
    num_features, num_classes = 2048, 1008

    def __init__(self, dataset=None, weights_path: str | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = weights_file(weights_path)
        state = load_checkpoint(path)  # weights_only=True: torch-fidelity's own load below is not
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{path} is not an InceptionV3 state dict ({WEIGHTS_FILE} expected)")
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", list(FEATURES),
                                               feature_extractor_weights_path=str(path))

    def extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net(to_uint8_rgb(images))
        return features, logits
