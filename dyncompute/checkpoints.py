"""Checkpoint key maps: load and export state dicts under another codebase's key names.

The machinery only; each tokenizer plugin owns its own map (facebookresearch/DiT's beside `patchify`,
AMD-AGI/DynamicChunkingDiT's inside `dynamic_chunking`).
"""
from __future__ import annotations

import torch

from .model import DiffusionTransformer

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
