"""Import and export of original checkpoints (facebookresearch/DiT key names).

``load_official_dit(state_dict, config)`` builds a `DiffusionTransformer` with the `patchify`
tokenizer from an official DiT state dict; ``to_official_dit(model)`` writes one back.
"""
from __future__ import annotations

import re

import torch

from .io import load_checkpoint
from .model import DiffusionTransformer

# official DiT name -> dyncompute name (prefix rewrite, first match wins)
_DIT_PREFIXES = (
    ("x_embedder.", "tokenizer.x_embedder."),
    ("final_layer.", "tokenizer.final_layer."),
    ("blocks.", "backbone.blocks."),
    ("t_embedder.", "t_embedder."),
    ("y_embedder.", "y_embedder."),
)
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT-S/B/L/XL (and DC-DiT's widths)


def _rename(key: str, table) -> str | None:
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def load_renamed(model: DiffusionTransformer, state_dict: dict, prefixes, pos_embed: torch.Tensor,
                 not_loaded=()) -> DiffusionTransformer:
    """Load an original-key-name state dict through a prefix table; its frozen ``pos_embed`` must equal
    ours. Anything missing or left over is an error naming the keys."""
    converted, unexpected = {}, []
    for key, value in state_dict.items():
        if key == "pos_embed":
            check_pos_embed(value, pos_embed)
            continue
        new = _rename(key, prefixes)
        (unexpected.append(key) if new is None else converted.__setitem__(new, value))
    missing, extra = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if k not in not_loaded]
    if missing or extra or unexpected:
        raise ValueError(f"state dict does not match the config: missing {sorted(missing)}, "
                         f"unexpected {sorted(extra) + unexpected}")
    return model


def export_renamed(model: DiffusionTransformer, prefixes, pos_embed: torch.Tensor, not_loaded=()) -> dict:
    """The inverse of `load_renamed`: our state dict under original key names, ``pos_embed`` included."""
    inverse = tuple((dst, src) for src, dst in prefixes)
    out = {"pos_embed": pos_embed.reshape(1, -1, pos_embed.shape[-1]).detach().clone()}
    for key, value in model.state_dict().items():
        if key in not_loaded:
            continue
        new = _rename(key, inverse)
        if new is None:
            raise ValueError(f"{key} has no counterpart in the original model (a plugin or reducer it lacks)")
        out[new] = value.detach().clone()
    return out


def check_pos_embed(value: torch.Tensor, ours: torch.Tensor) -> None:
    value = value.reshape(-1, value.shape[-1]).float()
    ours = ours.reshape(-1, ours.shape[-1])
    if value.shape != ours.shape or (value - ours).abs().max() > 1e-4:
        raise ValueError(f"checkpoint pos_embed {tuple(value.shape)} is not the frozen sin-cos table "
                         f"{tuple(ours.shape)}")


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


def build_dit(config: dict) -> DiffusionTransformer:
    """A patchify DiffusionTransformer from a DiT-style config dict."""
    from dyncompute_plugins.tokenizers.patchify import Patchify

    c = dict(config)
    out_channels = c["in_channels"] * (2 if c.get("learn_sigma", True) else 1)
    tokenizer = Patchify(hidden_size=c["hidden_size"], in_channels=c["in_channels"], out_channels=out_channels,
                         input_size=c["input_size"], patch_size=c["patch_size"])
    return DiffusionTransformer(
        input_size=c["input_size"], in_channels=c["in_channels"], num_classes=c["num_classes"],
        hidden_size=c["hidden_size"], depth=c["depth"], num_heads=c["num_heads"],
        mlp_ratio=c.get("mlp_ratio", 4.0), tokenizer=tokenizer, learn_sigma=c.get("learn_sigma", True),
        class_dropout_prob=c.get("class_dropout_prob", 0.1),
    )


def load_official_dit(state_dict: dict, config: dict | None = None) -> DiffusionTransformer:
    """Build a model from a facebookresearch/DiT state dict (original key names)."""
    state_dict = unwrap_state_dict(state_dict)
    model = build_dit(config or infer_dit_config(state_dict))
    return load_renamed(model, state_dict, _DIT_PREFIXES, model.tokenizer.pos_embed)


def to_official_dit(model: DiffusionTransformer) -> dict:
    """Export a patchify model (no reducers) to facebookresearch/DiT key names."""
    return export_renamed(model, _DIT_PREFIXES, model.tokenizer.pos_embed)


def unwrap_state_dict(obj: dict) -> dict:
    """Accept a bare state dict or a training checkpoint holding one under 'ema' or 'model'; drop the
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    for key in ("ema", "model"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def read_official_dit(path, config: dict | None = None) -> DiffusionTransformer:
    """Load e.g. DiT-XL-2-256x256.pt from a local path."""
    return load_official_dit(load_checkpoint(path), config)


def load_official_dcdit(state_dict: dict, config: dict | None = None, **tokenizer_kwargs) -> DiffusionTransformer:
    """Build a DC-DiT from an AMD-AGI/DynamicChunkingDiT state dict (the dynamic_chunking plugin does it)."""
    from dyncompute_plugins.tokenizers.dynamic_chunking.official import load_official_dcdit as load

    return load(state_dict, config, **tokenizer_kwargs)


def to_official_dcdit(model: DiffusionTransformer) -> dict:
    """Export a dynamic_chunking model to AMD-AGI/DynamicChunkingDiT key names."""
    from dyncompute_plugins.tokenizers.dynamic_chunking.official import to_official_dcdit as export

    return export(model)
