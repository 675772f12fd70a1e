"""A DiT/P's own input and output layers beside DC-DiT's scaffold: a function-preserving upcycling start.

This project's extension, not the paper's recipe. Upcycling copies a DiT's backbone blocks, but a fresh
encoder feeds them and a fresh decoder reads them, so at the start the copied blocks see inputs and
produce outputs that nothing around them understands. The bridge keeps the DiT's two ends:

- ``x_embedder``: the DiT's patch embedding (a P x P, stride-P convolution), read at every pixel from its
  patch; a kept token at pixel (r, c) enters the backbone as that embedding plus ``encoder_gate`` (zero
  at the start) times the encoder's features, with the DiT's position code of patch (r // P, c // P);
- ``place_prior``: a boundary prior per place in the patch, +-``PRIOR`` x ``prior_scale``, added to the
  router's logit for the keep decisions only: at scale 1 the first pixel of every patch is kept (the
  DiT's own tokens; ``start="all"``: every pixel, each patch's token once per pixel, which attention
  sees as the DiT's tokens, at 4x the backbone's work), while the router's own probabilities,
  unsaturated, still carry its gradients (confidence, ratio loss); upcycling can anneal the scale to 0
  (``upcycling.prior_steps``) so that the router, trained all along, takes over; ``places="grid"``
  lets it take over only where the prior keeps a pixel: it thins the DiT's tokens (one per patch at
  most, at the patch's first pixel) and never adds a token between them; the ratio loss then balances
  the router's own decisions on those pixels (`ratio_view`), so that they already keep the target share
  of the patches when the prior fades (balanced on the prior's decisions, which keep every patch, it
  drove the router's probabilities down unopposed: 3% kept when the prior faded, loss 0.72);
  ``fade="count"`` fades the prior in numbers rather than logits: of the patches the router would drop,
  the (1 - scale) share it is surest of are dropped;
- ``final_layer``: the DiT's final layer applied to each pixel's nearest kept token's backbone output
  (times DC-DiT's straight-through confidence gate, so that the router learns from this path too),
  keeping the entry for the pixel's place (r % P, c % P) in its patch; it is added to the scaffold's own
  output (whose final layer starts at zero).

With every patch kept once (as at the start) the upcycled DC-DiT computes the DiT's function; as the
router moves away from the patch grid it computes it on the kept tokens; training moves on from there.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dyncompute.errors import ConfigError
from dyncompute.layers import FinalLayer

PRIOR = 4.0  # sigmoid(4) = 0.98: the first pixel of each patch is a boundary, the others are not


class DiTBridge(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int, out_channels: int, input_size: int, patch_size: int,
                 cond_dim: int, start: str = "grid", places: str = "any", fade: str = "logit",
                 dropped: str = "neighbour", keep_above: int | None = None):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by the bridge's patch size {patch_size}")
        P = self.patch_size = patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, P, stride=P)
        self.final_layer = FinalLayer(hidden_size, P, out_channels, cond_dim)
        self.encoder_gate = nn.Parameter(torch.zeros(hidden_size))
        if start not in ("grid", "all"):
            raise ConfigError(f"tokenizers.dynamic_chunking.bridge_start must be 'grid' or 'all', got {start!r}")
        if places not in ("any", "grid"):
            raise ConfigError(f"tokenizers.dynamic_chunking.bridge_places must be 'any' or 'grid', got {places!r}")
        if places == "grid" and start != "grid":
            raise ConfigError("tokenizers.dynamic_chunking.bridge_places = 'grid' needs bridge_start = 'grid'")
        if fade not in ("logit", "count"):
            raise ConfigError(f"tokenizers.dynamic_chunking.bridge_fade must be 'logit' or 'count', got {fade!r}")
        if fade == "count" and places != "grid":
            raise ConfigError("tokenizers.dynamic_chunking.bridge_fade = 'count' needs bridge_places = 'grid'")
        if dropped not in ("neighbour", "scaffold"):
            raise ConfigError(f"tokenizers.dynamic_chunking.bridge_dropped must be 'neighbour' or 'scaffold', "
                              f"got {dropped!r}")
        if keep_above is not None and not (isinstance(keep_above, int) and 0 <= keep_above):
            raise ConfigError(f"tokenizers.dynamic_chunking.bridge_keep_above must be None or a timestep >= 0, "
                              f"got {keep_above!r}")
        self.places, self.fade, self.dropped, self.keep_above = places, fade, dropped, keep_above
        prior = torch.full((P * P,), -PRIOR if start == "grid" else PRIOR)  # "all": every pixel kept
        prior[0] = PRIOR
        self.register_buffer("place_prior", prior, persistent=False)
        self.register_buffer("prior_scale", torch.ones(()))  # saved: a resumed or loaded run keeps its scale
        rows, cols = torch.meshgrid(torch.arange(input_size), torch.arange(input_size), indexing="ij")
        self.register_buffer("place", ((rows % P) * P + cols % P).reshape(-1), persistent=False)  # (L,)
        self.register_buffer("first", self.place == 0, persistent=False)  # (L,) the patches' first pixels
        first = (rows - rows % P) * input_size + cols - cols % P
        self.register_buffer("patch_first", first.reshape(-1), persistent=False)  # (L,) its patch's first pixel

    def initialize_weights(self) -> None:
        """As a DiT's own ends start (upcycling then copies the DiT's)."""
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        self.final_layer.zero_init()

    def embed(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(B, L, D) backbone input at every pixel: its patch's embedding + gate x encoder features ``h``."""
        P = self.patch_size
        e = self.x_embedder(x).repeat_interleave(P, dim=-2).repeat_interleave(P, dim=-1)  # (B, D, H, W)
        return e.flatten(2).transpose(1, 2) + self.encoder_gate * h

    def route(self, p: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Boundary probabilities (B, L) for the keep decisions: the router's with the scaled per-place prior
        added to their logits (``places="grid"``: 0 off the patches' first pixels). ``keep_above``: samples
        at timestep ``t`` >= it keep every patch's first pixel, whatever the router wants (the DiT's tokens
        at high noise, where a sample's layout is decided)."""
        if self.fade == "count":
            q = self._count_faded(p)
        else:
            q = torch.sigmoid(torch.logit(p, eps=1e-6) + self.prior_scale * self.place_prior[self.place])
            q = q if self.places == "any" else q * self.first
        if self.keep_above is None:
            return q
        if t is None:
            raise ValueError("the DiT bridge's keep_above needs the timesteps t")
        return torch.where((t[:, None] >= self.keep_above) & self.first, torch.ones_like(q), q)

    def _count_faded(self, p: torch.Tensor) -> torch.Tensor:
        """``fade="count"``: of the patches the router would drop, only the (1 - prior_scale) share with the
        lowest probabilities are dropped, so the number dropped grows linearly while the prior fades
        (instead of flipping together when the prior crosses the router's logits)."""
        wanted = self.first & (p <= 0.5)
        allowed = ((1 - self.prior_scale) * wanted.sum(1, keepdim=True)).floor()
        rank = p.masked_fill(~wanted, float("inf")).argsort(dim=1, stable=True).argsort(dim=1, stable=True)
        return (self.first & ~(wanted & (rank < allowed))).to(p.dtype)  # 1: kept, 0: dropped

    def ratio_view(self, p: torch.Tensor, target_ratio: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(p, decisions, N) for the ratio loss when the router thins patches: its own probabilities and
        decisions at the patches' first pixels, towards ``target_ratio`` pixels per token, i.e. a
        ``P**2 / target_ratio`` share of the patches."""
        q = p[:, self.first]
        return q, q > 0.5, target_ratio / self.patch_size ** 2

    def head(self, z: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, C) prediction from each pixel's backbone state ``z`` (B, L, D): the DiT's output for the
        pixel's place in its patch. ``dropped="scaffold"``: 0 where the pixel's patch kept no token of its
        own (``mask`` (B, L): kept pixels), so that the scaffold's decoder predicts those pixels alone
        instead of the DiT's prediction of a neighbouring patch."""
        out = self.final_layer(z, c)  # (B, L, P * P * C), DiT's (p q c) order
        out = out.view(*out.shape[:2], self.patch_size ** 2, -1)
        index = self.place.view(1, -1, 1, 1).expand(out.shape[0], -1, 1, out.shape[-1])
        out = out.gather(2, index).squeeze(2)
        if self.dropped == "neighbour" or mask is None:
            return out
        own = mask.gather(1, self.patch_first.expand(mask.shape[0], -1))
        return out * own[..., None].to(out.dtype)
