"""dyncompute: a research framework for dynamic-compute diffusion transformers."""
from .model import DiffusionTransformer, ForwardInfo
from .registry import DATASETS, FEATURE_EXTRACTORS, REDUCERS, SAMPLERS, TOKENIZERS, UnknownPluginError
from .tokens import Tokens

__version__ = "0.1.0"
__all__ = ["DiffusionTransformer", "ForwardInfo", "Tokens", "TOKENIZERS", "REDUCERS", "SAMPLERS",
           "DATASETS", "FEATURE_EXTRACTORS", "UnknownPluginError"]
