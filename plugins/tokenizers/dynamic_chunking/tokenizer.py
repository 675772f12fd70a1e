"""The DC-DiT scaffold as a tokenizer: stem -> encoder -> router -> chunk | backbone | de-chunk ->
STE gating + residual -> decoder -> FinalLayer."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange

from dyncompute.errors import ConfigError
from dyncompute.layers import FinalLayer, RMSNorm, grid_positions, muladd, sincos_2d
from dyncompute.registry import TOKENIZERS
from dyncompute.tokenizer import Tokenizer
from dyncompute.tokens import Tokens

from .bridge import DiTBridge
from .chunking import STE, boundary_rules, check_tail_drop, chunk, drop_tail
from .dechunk import DECHUNKERS, nearest_plug_back
from .encoder import ConvStack
from .losses import check_target_ratio, ratio_loss
from .routers import ROUTERS


def float32(x: torch.Tensor):
    """Autocast off: the router and the de-chunker compute in float32 even inside a bfloat16 autocast region
    (their inputs are cast with .float()); otherwise the convolutions and matmuls would run in bfloat16."""
    return torch.autocast(x.device.type, enabled=False)


@dataclass
class ChunkState:
    """What encode() hands to decoding; ``ForwardInfo.state`` (``info.state.p``, ``info.state.mask``)."""

    p: torch.Tensor  # (B, L) boundary probability (first/last forced to 1)
    mask: torch.Tensor  # (B, L) bool, kept tokens after tail dropping
    mask_natural: torch.Tensor  # (B, L) bool, boundaries before tail dropping
    confidence: torch.Tensor  # (B, L) max(p, 1 - p)
    residual: torch.Tensor  # (B, L, D) residual projection of the encoder output
    grid: tuple[int, int]
    tail_drop: float | torch.Tensor = 0.0
    bridge: torch.Tensor | None = None  # (B, L, C) the DiT bridge's prediction (bridge.py), set by to_grid

    @property
    def kept_fraction(self) -> torch.Tensor:
        """(B,) fraction of grid tokens the backbone saw."""
        return self.mask.float().mean(1)


@TOKENIZERS.register("dynamic_chunking")
class DynamicChunking(Tokenizer):
    """DC-DiT's learned, data-dependent tokenizer (P = 1 conv stem, width D / ``enc_dec_factor``)."""

    budget_keys = ("tail_drop",)
    dynamic_tokens = True
    # FLOP accounting (dyncompute.flops): submodule -> the paper's component names
    flop_components = {"stem": "embeddings", "cond_norm": "embeddings", "encoder": "encoder", "router": "router",
                       "dechunker": "de-chunk", "backbone_norm": "de-chunk", "residual_proj": "de-chunk",
                       "decoder": "decoder", "final_layer": "final layer", "bridge.x_embedder": "embeddings",
                       "bridge.final_layer": "final layer"}
    flop_order = ("embeddings", "encoder", "router", "chunk", "backbone", "de-chunk", "decoder", "final layer")
    flop_ignored_ops = ("prim::PythonOp.STE",)  # straight-through estimator: an identity, 0 MACs
    static_parts = ("stem", "encoder", "router", "decoder", "final_layer")  # shapes follow the grid

    def __init__(self, hidden_size: int, in_channels: int, out_channels: int, input_size: int,
                 cond_dim: int | None = None, router: str = "predictability",
                 dechunk: str = "gaussian_nearest", target_ratio: float = 4.0,
                 ratio_loss_weight: float = 0.03, ratio_group_size: int | None = None,
                 enc_dec_factor: int = 4, encoder_depth: int = 2, decoder_depth: int = 2,
                 dechunk_sigma: float = 1.0, tail_drop: float = 0.0,
                 budget_set: Sequence[float] = (), budget_warmup_steps: int = 0, cond_adaptor: bool = False,
                 pos_scale: float = 1.0, dit_bridge: int = 0, bridge_start: str = "grid",
                 bridge_places: str = "any", bridge_fade: str = "logit", bridge_dropped: str = "neighbour",
                 bridge_keep_above: int | None = None):
        super().__init__()
        check_target_ratio(target_ratio)
        for rho in (tail_drop, *budget_set):
            check_tail_drop(rho)
        if not (isinstance(pos_scale, (int, float)) and pos_scale > 0):
            raise ConfigError(f"tokenizers.dynamic_chunking.pos_scale must be a positive number, got {pos_scale!r}")
        if hidden_size % enc_dec_factor:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by enc_dec_factor {enc_dec_factor}")
        D, d, cond_dim = hidden_size, hidden_size // enc_dec_factor, cond_dim or hidden_size
        self.hidden_size, self.width, self.out_channels, self.input_size = D, d, out_channels, input_size
        self.target_ratio, self.ratio_loss_weight = target_ratio, ratio_loss_weight
        self.ratio_group_size = ratio_group_size
        self.tail_drop, self.budget_set, self.budget_warmup_steps = tail_drop, tuple(budget_set), budget_warmup_steps

        self.stem = nn.Conv2d(in_channels, d, 3, padding=1)
        self.encoder = ConvStack(d, D, encoder_depth, cond_dim, widen="last")
        self.router = ROUTERS.get(router)(D, target_ratio=target_ratio)
        self.dechunker = DECHUNKERS.get(dechunk)(sigma=dechunk_sigma)
        self.backbone_norm = RMSNorm(D, eps=1e-5)  # DC-DiT's main network ends with an RMSNorm
        self.residual_proj = nn.Linear(D, D)
        self.decoder = ConvStack(D, d, decoder_depth, cond_dim, widen="first")
        self.final_layer = FinalLayer(d, 1, out_channels, cond_dim=cond_dim)
        # Sin-cos code of each pixel's (row, col) x pos_scale: 1 is the official DC-DiT's; an upcycled DC-DiT
        # uses 1 / P of its DiT/P, so that a token at pixel (r, c) gets the code the DiT gave patch (r/P, c/P).
        self.pos_scale = float(pos_scale)
        # Upcycling's function-preserving start (bridge.py): a DiT/P's patch embedding and final layer
        # beside the scaffold, tokens coded with the DiT's position of their patch. 0: none (the paper's).
        self.bridge = None
        if bridge_keep_above is not None and not dit_bridge:
            raise ConfigError("tokenizers.dynamic_chunking.bridge_keep_above needs a DiT bridge (dit_bridge = P)")
        if dit_bridge:
            if pos_scale != 1:
                raise ConfigError("tokenizers.dynamic_chunking.dit_bridge codes positions by patch: "
                                  "leave pos_scale at 1")
            if bridge_places == "grid" and not target_ratio > dit_bridge ** 2:
                raise ConfigError(f"tokenizers.dynamic_chunking.bridge_places = 'grid' keeps at most one token per "
                                  f"patch: target_ratio must exceed {dit_bridge ** 2}, got {target_ratio}")
            self.bridge = DiTBridge(in_channels, D, out_channels, input_size, dit_bridge, cond_dim, bridge_start,
                                    bridge_places, bridge_fade, bridge_dropped, bridge_keep_above)
            self.timestep_aware = bridge_keep_above is not None  # encode() then gets t
        positions = grid_positions(input_size) // dit_bridge if dit_bridge else grid_positions(input_size) * pos_scale
        self.register_buffer("pos_embed", sincos_2d(D, positions), persistent=False)
        # Upcycling from a DiT: a trainable LayerNorm between the (frozen, DiT-scaled) conditioning vector
        # and the scaffold's encoder, decoder and final layer. Off by default: official checkpoints have none.
        self.cond_norm = nn.LayerNorm(cond_dim) if cond_adaptor else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "step", None)  # runs saved before the multi-budget draw moved to the trainer
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def initialize_weights(self) -> None:
        w = self.stem.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like nn.Linear, as DiT does for its stem
        nn.init.zeros_(self.stem.bias)
        nn.init.zeros_(self.residual_proj.weight)
        nn.init.zeros_(self.residual_proj.bias)
        nn.init.ones_(self.backbone_norm.weight)
        self.router.initialize_weights()
        self.final_layer.zero_init()
        if self.bridge is not None:
            self.bridge.initialize_weights()

    # ---- budgets -------------------------------------------------------------------------------
    def training_budgets(self) -> tuple[tuple[dict[str, float], ...], int]:
        """Multi-budget training: a tail-drop fraction drawn per step from ``budget_set``."""
        return tuple({"tail_drop": rho} for rho in self.budget_set), self.budget_warmup_steps

    # ---- tokenizer interface -------------------------------------------------------------------
    def encode(self, x: torch.Tensor, c: torch.Tensor, tail_drop=None, t=None, **budget) -> tuple[Tokens, ChunkState]:
        self.check_budget(budget)
        rho = self.tail_drop if tail_drop is None else tail_drop
        check_tail_drop(rho)
        grid = tuple(x.shape[-2:])
        # channels-last activations: oneDNN runs these 3x3 convolutions ~1.8x faster than on NCHW, and the
        # encoder's (B, D, H, W) -> (B, H*W, D) tokens become a view
        h = self.encoder(self.stem(x.contiguous(memory_format=torch.channels_last)), self.scaffold_condition(c))
        with float32(h):  # routing decisions in float32 under mixed precision, as the official fp32_router_dechunk
            p, mask_natural, confidence = boundary_rules(self.router(h, grid))
        if self.bridge is not None:  # the prior decides; p and the confidence (the router's gradients) stay
            _, mask_natural, _ = boundary_rules(self.bridge.route(p, t))  # the router's own, unsaturated
            confidence = torch.where(mask_natural, p, 1 - p)
        mask = drop_tail(p, mask_natural, rho)
        residual = self.residual_proj(h.float())
        tokens = chunk(h if self.bridge is None else self.bridge.embed(x, h), mask, self.pos_embed, grid[1])
        return tokens, ChunkState(p, mask, mask_natural, confidence, residual, grid, rho)

    def to_grid(self, tokens: Tokens, state: ChunkState, c: torch.Tensor) -> torch.Tensor:
        """De-chunk: RMSNorm, smooth and plug back onto every pixel, gate by STE(confidence), add the
        residual projection of the encoder output; (B, H*W, D)."""
        gate = STE.apply(state.confidence)[..., None]  # forward 1; the router's gradient from the loss
        if self.bridge is not None:  # the DiT's final layer reads each pixel's nearest kept token, gated alike
            z_pixel = nearest_plug_back(tokens.x, tokens, state.mask, state.grid[1])
            state.bridge = self.bridge.head(z_pixel * gate, c, state.mask)
        z = self.backbone_norm(tokens.x)
        with float32(z):
            h = self.dechunker(z, tokens, state.p, state.mask, state.grid)
        return muladd(state.residual, h, gate).to(z.dtype)

    def scaffold_condition(self, c: torch.Tensor) -> torch.Tensor:
        """The conditioning the encoder, decoder and final layer see (through the adaptor when there is one)."""
        return c if self.cond_norm is None else self.cond_norm(c)

    def head(self, h: torch.Tensor, state: ChunkState, c: torch.Tensor) -> torch.Tensor:
        r, w = state.grid
        c = self.scaffold_condition(c)
        h = self.decoder(rearrange(h, "b (r w) d -> b d r w", r=r, w=w), c)
        out = self.final_layer(h, c)
        if self.bridge is not None:
            out = out + state.bridge
        return rearrange(out, "b (r w) c -> b c r w", r=r, w=w)

    def aux_losses(self, state: ChunkState) -> dict[str, torch.Tensor]:
        p, decisions, N = state.p, state.mask_natural, self.target_ratio
        if self.bridge is not None and self.bridge.places == "grid":
            p, decisions, N = self.bridge.ratio_view(p, N)
        loss = ratio_loss(p, decisions, N, self.ratio_group_size)
        return {"ratio": self.ratio_loss_weight * loss}

    def token_grid(self) -> tuple[int, int]:
        """Kept tokens sit on the pixel grid (P = 1)."""
        return self.input_size, self.input_size

    def token_map(self, state: ChunkState) -> torch.Tensor:
        """(B, H, W) bool: which grid positions the backbone saw."""
        return state.mask.view(-1, *state.grid)

    def boundary_probability(self, state: ChunkState) -> torch.Tensor:
        """(B, H, W): the router's boundary probability (first and last positions forced to 1)."""
        return state.p.view(-1, *state.grid)
