"""dyncompute: a research framework for dynamic-compute diffusion transformers.

The top-level names are imported on first use, so that the command line starts without torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "DiffusionTransformer": "model", "ModelConfig": "model", "ForwardInfo": "reducer", "Reducer": "reducer",
    "Tokenizer": "tokenizer", "Tokens": "tokens", "TOKENIZERS": "registry", "REDUCERS": "registry",
    "SAMPLERS": "registry", "DATASETS": "registry", "FEATURE_EXTRACTORS": "registry",
    "UnknownPluginError": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'dyncompute' has no attribute {name!r}")
