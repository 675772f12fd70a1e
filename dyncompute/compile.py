"""The opt-in compiled path: ``torch.compile`` where the shapes allow it, set by one gin binding.

``DiffusionTransformer.compile = True`` (training and sampling build the model through gin, so both
take it) compiles, on first call:
- **static tokenizers** (``Tokenizer.static_shapes``, e.g. patchify: every input of a size gives the
  same token count) and no reducers: the whole forward as one graph (``fullgraph``);
- otherwise (dynamic chunking, reducers): every backbone block with **dynamic shapes**: the token count,
  the per-sample lengths and the batch size are runtime values (`Tokens` hands compiled code a flag,
  tensors and a symbolic longest length; attention is one custom operator, torch's varlen kernel on CUDA; the
  per-sample sums of the backward are one operator), so a new set of lengths does not recompile, and all blocks
  share one graph; the tokenizer's ``static_parts`` (e.g. DC-DiT's convolutional ends, whose shapes
  follow the input grid) are compiled with static shapes, once the first call shows the model off the
  CPU: there compiling them made the DC-DiT-S forward slower (B = 8, 2-core CPU: 1.006 and 1.009 x, 20
  interleaved rounds in each of two processes, though the encoder alone ran faster compiled), so on the CPU
  they stay eager.
``nn.Module.compile`` leaves parameter names and state dicts as they are (checkpoints and EMA copies see
the plain modules); ``torch.compiler.set_stance("force_eager")`` runs eager, and `plain_modules` lets
TorchScript tracing (fvcore's FLOP count), which cannot enter compiled code, trace the modules as written.
"""
from __future__ import annotations

import contextlib

from torch import nn


def compile_model(model: nn.Module) -> nn.Module:
    """Compile ``model`` (a `DiffusionTransformer`) in place as described above; returns it."""
    tokenizer = model.tokenizer
    if tokenizer.static_shapes and not len(model.reducers):
        model.compile(fullgraph=True)
        return model
    for block in model.backbone.blocks:
        block.compile(dynamic=True)
    if tokenizer.static_parts:
        model.register_forward_pre_hook(_compile_static_parts)
    return model


def _compile_static_parts(model: nn.Module, args) -> None:
    """Pre-hook, acting on the first call only: compile the tokenizer's static parts unless the input is on
    the CPU."""
    if getattr(model, "_static_parts_seen", False):
        return
    model._static_parts_seen = True
    if args and args[0].device.type != "cpu":
        for name in model.tokenizer.static_parts:
            model.tokenizer.get_submodule(name).compile()


@contextlib.contextmanager
def plain_modules(model: nn.Module):
    """Calls to ``model``'s compiled submodules run their plain forward inside this context."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if m._compiled_call_impl is not None]
    for m, _ in compiled:  # what nn.Module.compile set; nn.Module.__call__ falls back to _call_impl
        m._compiled_call_impl = None
    try:
        yield model
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl
