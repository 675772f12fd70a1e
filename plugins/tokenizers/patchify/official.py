"""Import and export of original DiT checkpoints (facebookresearch/DiT key names).

``load_official_dit(state_dict, config)`` builds a `DiffusionTransformer` with the `patchify` tokenizer
from an official DiT state dict (e.g. ``DiT-XL-2-256x256.pt``); ``to_official_dit(model)`` writes one back.
"""
from __future__ import annotations

import re
from pathlib import Path

from dyncompute.checkpoints import DIT_HEADS, export_renamed, load_renamed, unwrap_state_dict
from dyncompute.errors import ConfigError
from dyncompute.io import load_checkpoint
from dyncompute.model import DiffusionTransformer, ModelConfig
from dyncompute.runs import load_run

# official DiT name -> dyncompute name (prefix rewrite, first match wins)
PREFIXES = (
    ("x_embedder.", "tokenizer.x_embedder."),
    ("final_layer.", "tokenizer.final_layer."),
    ("blocks.", "backbone.blocks."),
    ("t_embedder.", "t_embedder."),
    ("y_embedder.", "y_embedder."),
)


def infer_dit_config(state_dict: dict, num_heads: int | None = None) -> dict:
    """Read a DiT config off a state dict's shapes; num_heads (not in the shapes) from DiT's size table."""
    w = state_dict["x_embedder.proj.weight"]
    hidden, in_ch, p = w.shape[0], w.shape[1], w.shape[2]
    out_dim = state_dict["final_layer.linear.weight"].shape[0] // (p * p)
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    table = state_dict["y_embedder.embedding_table.weight"].shape[0]
    grid = int(round(state_dict["pos_embed"].shape[1] ** 0.5))
    num_heads = num_heads or DIT_HEADS.get(hidden)
    if num_heads is None:
        raise ValueError(f"cannot infer num_heads for hidden size {hidden} (not a DiT S/B/L/XL); pass a config")
    return dict(input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
                num_heads=num_heads, num_classes=table - 1, learn_sigma=out_dim == 2 * in_ch,
                class_dropout_prob=0.1,
                mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden)


def dit_model_config(config: dict) -> ModelConfig:
    """A DiT-style config dict (DiT's argument names) as a `ModelConfig` with the patchify tokenizer."""
    c = dict(config)
    return ModelConfig(input_size=c["input_size"], in_channels=c["in_channels"], num_classes=c["num_classes"],
                       hidden_size=c["hidden_size"], depth=c["depth"], num_heads=c["num_heads"],
                       mlp_ratio=c.get("mlp_ratio", 4.0), learn_sigma=c.get("learn_sigma", True),
                       class_dropout_prob=c.get("class_dropout_prob", 0.1), tokenizer="patchify",
                       tokenizer_kwargs={"patch_size": c["patch_size"]})


def load_official_dit(state_dict: dict, config: dict | None = None) -> DiffusionTransformer:
    """Build a model from a facebookresearch/DiT state dict (original key names)."""
    state_dict = unwrap_state_dict(state_dict)
    model = dit_model_config(config or infer_dit_config(state_dict)).build()
    return load_renamed(model, state_dict, PREFIXES, model.tokenizer.pos_embed)


def to_official_dit(model: DiffusionTransformer) -> dict:
    """Export a patchify model (no reducers) to facebookresearch/DiT key names."""
    return export_renamed(model, PREFIXES, model.tokenizer.pos_embed)


def read_official_dit(path, config: dict | None = None) -> DiffusionTransformer:
    """Load e.g. DiT-XL-2-256x256.pt from a local path (nothing is downloaded)."""
    return load_official_dit(load_checkpoint(path), config)


def read_dit(source, num_heads: int | None = None) -> DiffusionTransformer:
    """A DiT to start from (eval mode): a run directory of ours (its EMA weights), or an original DiT
    file (its heads from DiT's size table, else ``num_heads``: heads are not in a state dict's shapes)."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"DiT to start from not found: {source}")
    if path.is_dir():
        return load_run(path).eval()
    state = unwrap_state_dict(load_checkpoint(path))
    if "x_embedder.proj.weight" not in state:
        raise ConfigError(f"{source} is not an original DiT checkpoint (no x_embedder.proj.weight); "
                          "pass a run directory of ours instead")
    heads = None if state["x_embedder.proj.weight"].shape[0] in DIT_HEADS else num_heads
    return load_official_dit(state, infer_dit_config(state, num_heads=heads)).eval()
