"""Import / export of official DC-DiT checkpoints (AMD-AGI/DynamicChunkingDiT key names).

The official model is an H-Net with one chunking stage: ``hnet.encoder`` (conv ResBlocks + RMSNorm),
``hnet.routing_module``, ``hnet.main_network.main_network`` (DiT blocks + RMSNorm), ``hnet.decoder``,
``hnet.residual_proj``; ``x_embedder.proj`` is the 3x3 stem and ``pos_embed`` the frozen sin-cos table.
"""
from __future__ import annotations

import re

from dyncompute.checkpoints import DIT_HEADS, export_renamed, load_renamed, unwrap_state_dict
from dyncompute.model import DiffusionTransformer, ModelConfig

from .tokenizer import DynamicChunking

# official prefix -> dyncompute prefix (first match wins)
PREFIXES = (
    ("x_embedder.proj.", "tokenizer.stem."),
    ("hnet.encoder.layers.", "tokenizer.encoder.blocks."),
    ("hnet.encoder.rmsnorm.", "tokenizer.encoder.norm."),
    ("hnet.routing_module.", "tokenizer.router."),
    ("hnet.main_network.main_network.layers.", "backbone.blocks."),
    ("hnet.main_network.main_network.rmsnorm.", "tokenizer.backbone_norm."),
    ("hnet.decoder.layers.", "tokenizer.decoder.blocks."),
    ("hnet.decoder.rmsnorm.", "tokenizer.decoder.norm."),
    ("hnet.residual_proj.", "tokenizer.residual_proj."),
    ("final_layer.", "tokenizer.final_layer."),
    ("t_embedder.", "t_embedder."),
    ("y_embedder.", "y_embedder."),
)


def _count(state_dict: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in state_dict if (m := pattern.match(k))), default=-1)


def infer_config(state_dict: dict) -> dict:
    """Read the config keys of ``dcdit_ref_small.pt`` off a state dict's shapes."""
    D = state_dict["t_embedder.mlp.2.weight"].shape[0]
    stem = state_dict["x_embedder.proj.weight"]
    out = state_dict["final_layer.linear.weight"].shape[0]
    if D not in DIT_HEADS:
        raise ValueError(f"cannot infer num_heads for d_model {D}; pass a config")
    return dict(input_size=int(round(state_dict["pos_embed"].shape[1] ** 0.5)), in_channels=stem.shape[1],
                d_model=D, depth=_count(state_dict, "hnet.main_network.main_network.layers."),
                num_heads=DIT_HEADS[D], num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
                enc_dec_dim_factor=D // stem.shape[0], learn_sigma=out == 2 * stem.shape[1],
                mlp_ratio=state_dict["hnet.main_network.main_network.layers.0.mlp.fc1.weight"].shape[0] / D)


def dcdit_model_config(config: dict, encoder_depth: int = 2, decoder_depth: int = 2,
                       **tokenizer_kwargs) -> ModelConfig:
    """An official-style config dict (DC-DiT's argument names) as a `ModelConfig`."""
    c = dict(config)
    factor = c.get("enc_dec_dim_factor") or 1
    factor = factor[0] if isinstance(factor, (list, tuple)) else factor
    settings = dict(enc_dec_factor=factor, encoder_depth=encoder_depth, decoder_depth=decoder_depth,
                    dechunk_sigma=c.get("dechunk_kernel_sigma", 1.0), **tokenizer_kwargs)
    return ModelConfig(input_size=c["input_size"], in_channels=c["in_channels"], num_classes=c["num_classes"],
                       hidden_size=c["d_model"], depth=c["depth"], num_heads=c["num_heads"],
                       mlp_ratio=c.get("mlp_ratio", 4.0), learn_sigma=c.get("learn_sigma", True),
                       class_dropout_prob=c.get("class_dropout_prob", 0.1), tokenizer="dynamic_chunking",
                       tokenizer_kwargs=settings)


def load_official_dcdit(state_dict: dict, config: dict | None = None, **tokenizer_kwargs) -> DiffusionTransformer:
    """Build a model from an AMD-AGI/DynamicChunkingDiT state dict (original key names)."""
    state_dict = unwrap_state_dict(state_dict)
    model = dcdit_model_config(config or infer_config(state_dict),
                               encoder_depth=_count(state_dict, "hnet.encoder.layers."),
                               decoder_depth=_count(state_dict, "hnet.decoder.layers."), **tokenizer_kwargs).build()
    return load_renamed(model, state_dict, PREFIXES, model.tokenizer.pos_embed)


def to_official_dcdit(model: DiffusionTransformer) -> dict:
    """Export a dynamic-chunking model (no reducers) to the official key names, pos_embed included."""
    if not isinstance(model.tokenizer, DynamicChunking):
        raise ValueError("only dynamic_chunking models export to DC-DiT checkpoints")
    return export_renamed(model, PREFIXES, model.tokenizer.pos_embed)
