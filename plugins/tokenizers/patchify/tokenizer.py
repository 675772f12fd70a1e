"""`patchify`: DiT's static tokenizer (PatchEmbed + frozen 2-D sin-cos positions; FinalLayer + unpatchify)."""
from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from timm.layers import PatchEmbed

from dyncompute.layers import FinalLayer, grid_positions, sincos_2d
from dyncompute.registry import TOKENIZERS
from dyncompute.tokenizer import Tokenizer
from dyncompute.tokens import Tokens


@TOKENIZERS.register("patchify")
class Patchify(Tokenizer):
    """Every P x P patch becomes one token: L = (H / P)^2 for every sample and timestep."""

    flop_components = {"x_embedder": "embeddings", "final_layer": "final layer"}
    static_shapes = True

    def __init__(self, hidden_size: int, in_channels: int, out_channels: int, input_size: int,
                 cond_dim: int | None = None, patch_size: int = 2):
        super().__init__()
        if patch_size < 1 or input_size % patch_size:
            raise ValueError(f"image size {input_size} is not divisible by the patch size {patch_size}")
        self.patch_size, self.out_channels = patch_size, out_channels
        self.grid_size = input_size // patch_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        pos = grid_positions(self.grid_size)
        self.register_buffer("pos", pos, persistent=False)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, pos)[None], persistent=False)
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, cond_dim)

    def initialize_weights(self) -> None:
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like nn.Linear, as DiT does
        nn.init.zeros_(self.x_embedder.proj.bias)
        self.final_layer.zero_init()

    def token_grid(self) -> tuple[int, int]:
        return self.grid_size, self.grid_size

    def encode(self, x: torch.Tensor, c: torch.Tensor, **budget):
        self.check_budget(budget)
        # channels-last input: the convolution's (B, D, h, w) output then is (B, h*w, D) memory, so the
        # tokens are a view (not a strided add and a copy of every token)
        x = self.x_embedder(x.contiguous(memory_format=torch.channels_last))
        return Tokens.from_batched(x + self.pos_embed, self.pos), None

    def to_grid(self, tokens: Tokens, state, c: torch.Tensor) -> torch.Tensor:
        """Every patch is a token: the backbone's output already is the (B, L, D) grid."""
        if not tokens.uniform or tokens.x.shape[0] != tokens.num_samples * self.grid_size ** 2:
            raise ValueError("patchify decodes only the full token grid; a reducer must restore every token")
        return tokens.batched()

    def head(self, h: torch.Tensor, state, c: torch.Tensor) -> torch.Tensor:
        out = self.final_layer(h, c)
        g, p = self.grid_size, self.patch_size
        return rearrange(out, "n (h w) (p q c) -> n c (h p) (w q)", h=g, w=g, p=p, q=p)
