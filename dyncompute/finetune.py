"""Fine-tuning recipes: a run that starts from another model's weights and adds new parts.

A recipe is a `TrainingExtension` given to `engine.train` (``train.extension = @fine_tune()`` or a
plugin's, e.g. DC-DiT upcycling's ``@upcycling()``): it prepares the freshly built model (starting
weights, frozen parts) before the optimizer, the EMA copy and any resume see it, so a resumed run
restores its own weights; it may add loss terms to every step (e.g. distillation against a frozen
teacher) and attach ignite handlers. The trainer, checkpoints and resume stay the ones every run uses.

``fine_tune.source`` (a run directory, whose EMA weights are used, or a checkpoint file of ours) loads
every weight the model shares with the source; parameters only the model has must lie under
``new_prefixes`` (default: the reducers', e.g. DyDiT's routers), and every shared one must have the
source's shape. Original (other codebases') checkpoints go through their plugin's loader first.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import gin
import torch

from .errors import ConfigError
from .io import load_checkpoint
from .observe import Evaluation
from .runs import latest_checkpoint

# A loss term sees the step's training evaluation (x_t, t, model kwargs, ForwardInfo) and the trainer
# engine (its iteration), and returns named, already weighted losses ({} when it is not active).
LossTerm = Callable[[Evaluation, object], dict]


class TrainingExtension:
    """What a fine-tuning recipe adds to `engine.train`; every method has a do-nothing default."""

    def setup(self, model: torch.nn.Module) -> None:
        """Prepare the freshly built model (load starting weights, freeze parts)."""

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """The optimizer's parameter groups (frozen parameters left out); a group's ``lr_scale`` scales
        the run's learning rate for it (e.g. copied blocks trained gently)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def loss_terms(self, model: torch.nn.Module) -> Sequence[LossTerm]:
        """Extra loss terms added to every step's loss."""
        return ()

    def attach(self, trainer, model: torch.nn.Module, ema: torch.nn.Module, run_dir: Path) -> None:
        """Attach ignite handlers to the trainer."""


def read_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """EMA (else online) weights of a run directory's latest checkpoint or of a checkpoint file."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"fine-tuning source {source} does not exist")
    ckpt = latest_checkpoint(path) if path.is_dir() else path
    if ckpt is None:
        raise ConfigError(f"no checkpoint in {path}: train it first")
    state = load_checkpoint(ckpt)
    if not isinstance(state, dict):
        raise ConfigError(f"{ckpt} is not a checkpoint of ours (no state dict)")
    state = state.get("ema", state.get("model", state))
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_shared(model: torch.nn.Module, state: dict, source, new_prefixes=("reducers.",)) -> None:
    """Load ``state`` into ``model``; the model's own new parts are exactly those under ``new_prefixes``."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise ConfigError(f"checkpoint {source} does not fit the model (source vs model shapes): "
                          f"{', '.join(wrong[:4])}")
    missing = [k for k in own if k not in state and not k.startswith(tuple(new_prefixes))]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise ConfigError(f"checkpoint {source} does not match the model: missing {missing[:6]}, "
                          f"unexpected {extra[:6]}")
    model.load_state_dict(state, strict=False)


@gin.configurable("fine_tune")
class FineTune(TrainingExtension):
    """Start from ``source``'s weights; new parts (``new_prefixes``) keep their initialisation."""

    def __init__(self, source: str = gin.REQUIRED, new_prefixes: Sequence[str] = ("reducers.",)):
        self.source, self.new_prefixes = source, tuple(new_prefixes)

    def setup(self, model: torch.nn.Module) -> None:
        load_shared(model, read_weights(self.source), self.source, self.new_prefixes)
