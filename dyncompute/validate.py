"""Configuration values checked before any work starts, each failure one line naming the binding.

Training, the model, the data, sampling and the process layout are checked here; the run directory's
own state (config changes, checkpoints) is checked in :mod:`dyncompute.runs`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .errors import ConfigError, DataError, UserError, one_line

# Errors a constructor raises for arguments it cannot use; at configuration time they are the user's.
BUILD_ERRORS = (ValueError, TypeError, AssertionError, KeyError, IndexError, ZeroDivisionError)


def need_int(name: str, value: Any, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        need = "an integer" + (f" >= {low}" if low is not None else "")
        raise ConfigError(f"{name} = {value!r}: must be {need}")


def need_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """A finite real number in [low, high] (an open end excludes it)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if lo or hi else ""
        raise ConfigError(f"{name} = {value!r}: must be a finite number{where}")


def need_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} = {value!r}: must be True or False")


def need_choice(name: str, value: Any, choices: Iterable) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name} = {value!r}: must be one of {', '.join(map(repr, choices))}")


def check_device(name: str, device: Any) -> None:
    """``auto`` or a device this machine has."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{name} = {device!r}: not a device (use 'auto', 'cpu', 'cuda' or 'cuda:N')") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"{name} = {device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{name} = {device!r}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{name} = {device!r}: unsupported device type {dev.type!r}")


def check_training(s: dict, world: int = 1) -> None:
    """The trainer's settings (`engine.train`'s arguments) and how they meet the number of processes."""
    from .diffusion import OBJECTIVES
    from .registry import DATASETS

    for key in ("steps", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints"):
        need_int(f"train.{key}", s[key], 1)
    for key in ("warmup_steps", "seed", "num_workers"):
        need_int(f"train.{key}", s[key], 0)
    need_number("train.lr", s["lr"], low=0, low_open=True)
    need_number("train.weight_decay", s["weight_decay"], low=0)
    need_number("train.grad_clip", s["grad_clip"], low=0, low_open=True)
    need_number("train.ema_decay", s["ema_decay"], low=0, high=1, high_open=True)  # 1 would never update
    need_bool("train.progress", s["progress"])
    need_choice("train.objective", s["objective"], OBJECTIVES)
    if not isinstance(s["dataset"], str):
        raise ConfigError(f"train.dataset = {s['dataset']!r}: must be a registered dataset name")
    DATASETS.get(s["dataset"])  # unknown names list the known ones
    check_device("train.device", s["device"])
    if s["batch_size"] % world:
        raise ConfigError(f"train.batch_size = {s['batch_size']} is not divisible by the {world} processes; "
                          f"use a multiple of {world}")


def check_processes(backend: str | None, nproc_per_node: int | None) -> int:
    """The launcher's process layout; returns the number of processes on this node."""
    if nproc_per_node is None:
        return 1
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node {nproc_per_node}: must be at least 1")
    if backend is None and nproc_per_node > 1:
        raise ConfigError(f"--nproc-per-node {nproc_per_node} needs --backend (gloo on CPUs, nccl on GPUs)")
    if backend == "nccl":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise ConfigError("--backend nccl needs CUDA GPUs and this machine has none; use --backend gloo")
        if nproc_per_node > gpus:
            raise ConfigError(f"--nproc-per-node {nproc_per_node} with nccl: this machine has {gpus} GPUs")
    return nproc_per_node


def check_model(kwargs: dict, meta: bool = True) -> torch.nn.Module:
    """`DiffusionTransformer`'s arguments, then the model itself built from them; ``meta``: on the meta
    device where the plugins allow it, so that checking a large model costs no memory."""
    from .model import DiffusionTransformer

    for key in ("input_size", "in_channels", "num_classes", "hidden_size", "depth", "num_heads"):
        need_int(f"DiffusionTransformer.{key}", kwargs[key], 1)
    if kwargs["hidden_size"] % kwargs["num_heads"]:
        raise ConfigError(f"DiffusionTransformer.hidden_size = {kwargs['hidden_size']} is not divisible by "
                          f"DiffusionTransformer.num_heads = {kwargs['num_heads']}")
    need_number("DiffusionTransformer.mlp_ratio", kwargs["mlp_ratio"], low=0, low_open=True)
    need_number("DiffusionTransformer.class_dropout_prob", kwargs["class_dropout_prob"], low=0, high=1,
                high_open=True)
    need_bool("DiffusionTransformer.learn_sigma", kwargs["learn_sigma"])
    try:
        if meta:
            try:
                with torch.device("meta"):
                    return DiffusionTransformer()
            except RuntimeError as e:  # a plugin that looks at tensor values while it is built
                if "meta" not in str(e):
                    raise
        return DiffusionTransformer()
    except UserError:
        raise
    except (*BUILD_ERRORS, RuntimeError) as e:
        raise ConfigError(f"cannot build the model from this config: {one_line(e)}") from e


def check_data(dataset: str, model) -> Any:
    """The dataset, built and read once: it must give the model's image shape and labels it can embed."""
    from .registry import DATASETS

    try:
        data = DATASETS.build(dataset)
    except UserError:
        raise
    except FileNotFoundError as e:
        raise DataError(one_line(e)) from e
    except BUILD_ERRORS as e:
        raise ConfigError(f"dataset {dataset!r}: {one_line(e)}") from e
    if len(data) < 1:
        raise DataError(f"dataset {dataset!r} is empty")
    if (data.channels, data.size) != (model.in_channels, model.input_size):
        raise ConfigError(f"dataset {dataset!r} gives {data.channels}x{data.size}x{data.size} images but the model "
                          f"expects {model.in_channels}x{model.input_size}x{model.input_size} "
                          "(DiffusionTransformer.in_channels / input_size)")
    if data.num_classes > model.num_classes:
        raise ConfigError(f"dataset {dataset!r} has {data.num_classes} classes but DiffusionTransformer.num_classes "
                          f"= {model.num_classes}; the model needs at least as many")
    x = data[0]["x"]  # one item read as training will read it
    if x.dtype.is_complex or not x.dtype.is_floating_point or not torch.isfinite(x).all():
        raise DataError(f"dataset {dataset!r}: item 0 is not finite real floating point ({x.dtype})")
    return data


def check_sampling(model, num_samples, num_steps, cfg_scale, guided_channels, seed, batch_size, labels,
                   clip_denoised, budget: dict) -> None:
    """`sampling.generate`'s settings against the model they sample."""
    if clip_denoised is not None:
        need_bool("generate.clip_denoised", clip_denoised)
    need_int("generate.num_samples", num_samples, 1)
    need_int("generate.num_steps", num_steps, 1)
    need_number("generate.cfg_scale", cfg_scale, low=1.0)  # 1: no guidance
    need_int("generate.seed", seed, 0)
    need_int("generate.batch_size", batch_size, 1)
    if guided_channels is not None:
        need_int("generate.guided_channels", guided_channels, 1)
        if guided_channels > model.in_channels:
            raise ConfigError(f"generate.guided_channels = {guided_channels}: the model has {model.in_channels}")
    if labels is not None:
        ys = torch.as_tensor(labels)
        if ys.dtype.is_floating_point or ys.dtype.is_complex or ys.dim() != 1 or len(ys) != num_samples:
            raise ConfigError(f"generate.labels: must be {num_samples} integer class labels")
        if len(ys) and (ys.min() < 0 or ys.max() >= model.num_classes):
            raise ConfigError(f"generate.labels: must lie in [0, {model.num_classes})")
    try:  # Lite-CFG's uncond_budget is a budget of its own (for the unconditional half)
        model.tokenizer.check_budget({k: v for k, v in budget.items() if k != "uncond_budget"})
        model.tokenizer.check_budget(dict(budget.get("uncond_budget") or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(one_line(e)) from e
