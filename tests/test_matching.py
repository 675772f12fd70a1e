"""Matched baselines: exact DiT costs, depth/width search, compute-matched steps, the match CLI."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dyncompute import flops, matching

BASE = matching.DiTShape(hidden_size=64, depth=3, num_heads=4, patch_size=2, input_size=16, in_channels=4,
                         num_classes=10)


def test_dit_cost_is_exact_at_any_depth():
    macs, params = matching.dit_cost(BASE)
    model = BASE.build()
    x, t, y = flops.measurement_inputs(model, 1)
    assert macs == flops.count_forward(model, x, t, y).useful_macs
    assert params == flops.count_parameters(model)


def test_match_depth_recovers_a_known_depth():
    macs, params = matching.dit_cost(replace(BASE, depth=7))
    for target, value in (("macs", macs), ("params", params)):
        m = matching.match_dit(BASE, target, value, by="depth")
        assert m.shape.depth == 7 and m.error == 0


def test_match_width_lands_within_two_percent():
    base = replace(BASE, hidden_size=256, depth=2, num_heads=4)
    macs, params = matching.dit_cost(base)
    for target, value in (("macs", 1.37 * macs), ("params", 1.29 * params)):  # between depths
        m = matching.match_dit(base, target, value, by="auto")
        assert abs(m.error) <= 0.02, m
        assert m.shape.hidden_size % 4 == 0 and m.shape.hidden_size % m.shape.num_heads == 0
    quickstart = matching.DiTShape(hidden_size=64, depth=4, num_heads=4, input_size=32, in_channels=3,
                                   num_classes=10)
    value = 1.005 * matching.dit_cost(replace(quickstart, hidden_size=80, num_heads=5))[0]
    m = matching.match_dit(quickstart, "macs", value, by="auto")  # no depth, only a width comes within 2%
    assert abs(m.error) <= 0.02 and abs(matching.match_dit(quickstart, "macs", value, by="depth").error) > 0.02, m
    assert matching.heads_for(768, 64) == 12 and matching.heads_for(760, 64) == 10
    with pytest.raises(ValueError):
        matching.match_dit(BASE, "gflops", target)


def test_compute_matched_steps_rule():
    # no warm-up: same total compute
    assert matching.compute_matched_steps(400_000, 2.0, 0, 1.0, 1.0) == 800_000
    s = matching.compute_matched_steps(400_000, 10.0, 100_000, 12.0, 8.0)
    assert 100_000 * 12.0 + (s - 100_000) * 8.0 == pytest.approx(400_000 * 10.0)
    with pytest.raises(ValueError):
        matching.compute_matched_steps(1, 0.0, 0, 1.0, 1.0)


def test_match_cli_for_a_dynamic_model(tmp_path, capsys):
    from dyncompute.cli import main

    gin_file = tmp_path / "tiny_dc.gin"
    gin_file.write_text("\n".join([
        "DiffusionTransformer.input_size = 16", "DiffusionTransformer.in_channels = 3",
        "DiffusionTransformer.num_classes = 10", "DiffusionTransformer.hidden_size = 256",
        "DiffusionTransformer.depth = 2", "DiffusionTransformer.num_heads = 4",
        "DiffusionTransformer.tokenizer = 'dynamic_chunking'", "tokenizers.dynamic_chunking.router = 'cosine'"]))
    args = [str(gin_file), "--samples", "4", "--dit-steps", "1000", "--warm-steps", "100", "--budgets", "0,0.5"]
    assert main(["match", *args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for label in ("iso_flop", "iso_param"):
        assert out[label]["within_tol"], out[label]
        assert out[label]["shape"]["patch_size"] == 2
    assert abs(out["iso_flop"]["useful_macs"] / out["source"]["macs"] - 1) <= 0.02
    assert abs(out["iso_param"]["params"] / out["source"]["params"] - 1) <= 0.02
    steps = out["compute_matched"]
    assert steps["F_mean"] <= steps["F_0"]  # dropping boundaries never adds work
    assert main(["match", str(gin_file), "--samples", "2", "--backbone-tokens", "32"]) == 0
    text = capsys.readouterr().out
    assert "iso-flop" in text and "iso-param" in text
