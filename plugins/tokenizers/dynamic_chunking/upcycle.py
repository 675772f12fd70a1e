"""Upcycling: a DC-DiT whose backbone and conditioning come from a trained DiT (DC-DiT paper, v1).

The DiT's backbone blocks and timestep / label embedders are copied exactly; the embedders stay frozen
(the blocks keep the conditioning they were trained with); the new scaffold (stem, encoder, router,
de-chunk, decoder, final layer) starts from its own initialisation and reads the conditioning through a
trainable LayerNorm adaptor (``tokenizers.dynamic_chunking.cond_adaptor = True``). The copied blocks
may train at a fraction of the learning rate (``block_lr_scale``), so that the large gradients of a
random scaffold do not wash out what they learnt. An optional distillation warm-up adds, for the first
``distill_steps`` steps, the MSE between the DC-DiT backbone's block outputs and a frozen copy of the
DiT's at matching grid positions; then training is ordinary diffusion training. It is a
`TrainingExtension` (``train.extension = @upcycling()``), so the run is checkpointed and resumed like
any other; ``dyncompute upcycle DIT CONFIG.gin`` binds it.

Matching positions: a kept DC-DiT token sits at pixel (r, c) of the input grid; the teacher's token for
it is the DiT patch containing that pixel, (r // P, c // P) for patch size P. Both backbones get the
student's conditioning vector (the frozen embedders are the teacher's, and this keeps the student's
label dropout), and the teacher sees its own patch embedding of the same noisy input.
"""
from __future__ import annotations

import gin
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Events

from dyncompute.errors import ConfigError
from dyncompute.finetune import TrainingExtension
from dyncompute.observe import Evaluation
from dyncompute.tokens import Tokens

from ..patchify import Patchify, read_dit
from .tokenizer import DynamicChunking

COPIED = ("backbone.blocks.", "t_embedder.", "y_embedder.")
FROZEN = ("t_embedder.", "y_embedder.")
MATCHED = ("hidden_size", "depth", "num_heads", "mlp_ratio", "num_classes")


def check_upcyclable(model: nn.Module, dit: nn.Module, source) -> None:
    """The DC-DiT must be a dynamic-chunking model with the DiT's backbone and conditioning sizes."""
    if not isinstance(model.tokenizer, DynamicChunking):
        raise ConfigError(f"upcycling makes a DC-DiT: the config's tokenizer is {model.config.tokenizer!r}, "
                          f"not 'dynamic_chunking'")
    if not isinstance(dit.tokenizer, Patchify):
        raise ConfigError(f"{source} is not a DiT (its tokenizer is {dit.config.tokenizer!r}, not 'patchify')")
    for key in MATCHED:
        ours, theirs = getattr(model.config, key), getattr(dit.config, key)
        if ours != theirs:
            raise ConfigError(f"checkpoint {source} has {key} = {theirs} but the DC-DiT config has {key} = {ours}")


BRIDGED = (("tokenizer.x_embedder.proj.", "tokenizer.bridge.x_embedder."),
           ("tokenizer.final_layer.", "tokenizer.bridge.final_layer."))


def upcycle(model: nn.Module, dit: nn.Module) -> None:
    """Copy the DiT's backbone blocks and t/y embedders into ``model`` (and, when it has a DiT bridge, the
    DiT's patch embedding and final layer into it) and freeze the embedders."""
    theirs = dit.state_dict()
    copied = {k: v for k, v in theirs.items() if k.startswith(COPIED)}
    bridge = model.tokenizer.bridge
    if bridge is not None:
        if bridge.patch_size != dit.tokenizer.patch_size:
            raise ConfigError(f"the DiT bridge has patch size {bridge.patch_size} but the DiT's is "
                              f"{dit.tokenizer.patch_size}: bind tokenizers.dynamic_chunking.dit_bridge = "
                              f"{dit.tokenizer.patch_size}")
        copied.update({ours + k[len(src):]: v for k, v in theirs.items()
                       for src, ours in BRIDGED if k.startswith(src)})
    model.load_state_dict(copied, strict=False)
    for name, p in model.named_parameters():
        if name.startswith(FROZEN):
            p.requires_grad_(False)


def teacher_index(student: Tokens, grid: int, patch: int) -> torch.Tensor:
    """(T,) row of each student token's teacher token in the teacher's packed (B * grid², D) output."""
    r, c = student.pos[:, 0] // patch, student.pos[:, 1] // patch
    return student.batch * grid * grid + r * grid + c


def distillation_loss(student: Tokens, student_outs: list[torch.Tensor], teacher_outs: list[torch.Tensor],
                      grid: int, patch: int) -> torch.Tensor:
    """Mean over blocks of the MSE between each student token's block output and its teacher patch's."""
    index = teacher_index(student, grid, patch)
    losses = [F.mse_loss(s.reshape(-1, s.shape[-1]).float(), t.reshape(-1, t.shape[-1])[index].float())
              for s, t in zip(student_outs, teacher_outs)]
    return torch.stack(losses).mean()


@torch.no_grad()
def block_outputs(backbone: nn.Module, tokens: Tokens, c: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output of a (frozen) backbone run on ``tokens`` with conditioning ``c``."""
    h, outs = tokens.batched(), []
    for block in backbone.blocks:
        h = block(h, c, tokens)
        outs.append(h)
    return outs


class BlockDistillation:
    """Loss term (`dyncompute.finetune.LossTerm`): ``weight`` x the block-output MSE against a frozen DiT
    teacher for the first ``steps`` steps. Forward hooks on the student's backbone (`watch`) read its
    tokens, conditioning and block outputs of the training forward."""

    def __init__(self, teacher: nn.Module, weight: float, steps: int):
        self.teacher, self.weight, self.steps = teacher.eval().requires_grad_(False), weight, steps
        self.grid, self.patch = teacher.tokenizer.grid_size, teacher.tokenizer.patch_size
        self.seen: dict = {}

    def watch(self, student: nn.Module) -> None:
        student.backbone.register_forward_pre_hook(self._inputs)
        for i, block in enumerate(student.backbone.blocks):
            block.register_forward_hook(lambda _m, _a, out, i=i: self.seen.__setitem__(i, out))

    def _inputs(self, _module, args) -> None:
        self.seen = {"tokens": args[0], "c": args[1]}

    def __call__(self, ev: Evaluation, engine) -> dict[str, torch.Tensor]:
        if engine.state.iteration > self.steps or "tokens" not in self.seen:
            return {}
        tokens, c = self.seen["tokens"], self.seen["c"]
        student = [self.seen[i] for i in range(len(self.teacher.backbone.blocks))]
        teacher_tokens, _ = self.teacher.tokenizer.encode(ev.x, c)
        teacher = block_outputs(self.teacher.backbone, teacher_tokens, c)
        return {"distill": self.weight * distillation_loss(tokens, student, teacher, self.grid, self.patch)}


@gin.configurable("upcycling")
class Upcycling(TrainingExtension):
    """DC-DiT from a DiT ``source`` (a run directory of ours or an original DiT file)."""

    def __init__(self, source: str = gin.REQUIRED, distill_steps: int = 0, distill_weight: float = 1.0,
                 block_lr_scale: float = 1.0, prior_steps: int = 0):
        if not 0 < block_lr_scale <= 1:
            raise ConfigError(f"upcycling.block_lr_scale must lie in (0, 1], got {block_lr_scale!r}")
        if isinstance(prior_steps, bool) or not isinstance(prior_steps, int) or prior_steps < 0:
            raise ConfigError(f"upcycling.prior_steps must be an integer >= 0, got {prior_steps!r}")
        self.prior_steps = prior_steps  # DiT bridge: anneal its patch-grid prior to 0 over these steps (0: keep it)
        self.source, self.distill_steps, self.distill_weight = source, distill_steps, distill_weight
        self.block_lr_scale = block_lr_scale
        self.distillation: BlockDistillation | None = None

    def setup(self, model: nn.Module) -> None:
        dit = read_dit(self.source, num_heads=model.config.num_heads)
        check_upcyclable(model, dit, self.source)
        upcycle(model, dit)
        if self.distill_steps:
            teacher = dit.to(next(model.parameters()).device)
            self.distillation = BlockDistillation(teacher, self.distill_weight, self.distill_steps)

    def param_groups(self, model: nn.Module) -> list[dict]:
        blocks = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.blocks.")]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.blocks.")]
        return [{"params": rest}, {"params": blocks, "lr_scale": self.block_lr_scale}]

    def loss_terms(self, model: nn.Module):
        return () if self.distillation is None else (self.distillation,)

    def attach(self, trainer, model, ema, run_dir) -> None:
        if self.distillation is not None:  # after the EMA copy is made: the copy needs no hooks
            self.distillation.watch(model)
        if self.prior_steps and model.tokenizer.bridge is not None:
            trainer.add_event_handler(Events.ITERATION_STARTED, self._anneal_prior, (model, ema))

    def _anneal_prior(self, engine, models) -> None:
        """Linear from 1 at the first step to 0 after ``prior_steps`` (set from the iteration: resumes exactly)."""
        scale = max(0.0, 1.0 - (engine.state.iteration - 1) / self.prior_steps)
        for m in models:
            m.tokenizer.bridge.prior_scale.fill_(scale)
