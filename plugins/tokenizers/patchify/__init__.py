"""`patchify`: DiT's static tokenizer, and the import/export of facebookresearch/DiT checkpoints."""
from .official import infer_dit_config, load_official_dit, read_dit, read_official_dit, to_official_dit
from .tokenizer import Patchify

__all__ = ["Patchify", "infer_dit_config", "load_official_dit", "read_dit", "read_official_dit", "to_official_dit"]
