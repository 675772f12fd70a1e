"""The core model: registries, packed tokens, patchify DiT, DiT checkpoint import/export."""
from pathlib import Path

import pytest
import torch

from dyncompute import DATASETS, FEATURE_EXTRACTORS, REDUCERS, SAMPLERS, TOKENIZERS, DiffusionTransformer, Tokens
from dyncompute.attention import varlen_attention
from dyncompute.io import CheckpointError, atomic_save, load_checkpoint
from dyncompute.layers import grid_positions, sincos_2d
from dyncompute.registry import UnknownPluginError
from dyncompute_plugins.tokenizers.patchify import (
    infer_dit_config,
    load_official_dit,
    read_official_dit,
    to_official_dit,
)

REF = Path(__file__).resolve().parent / "reference" / "dit_ref_small.pt"  # copied from shared/reference


def tiny(**kw):
    cfg = dict(input_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=4)
    cfg.update(kw)
    return DiffusionTransformer(**cfg)


@pytest.fixture(scope="module")
def ref():
    return torch.load(REF, weights_only=True)


def test_registries_are_filled_from_entry_points():
    assert "patchify" in TOKENIZERS.names()
    assert {"ddpm", "ddim", "ode"} <= set(SAMPLERS.names())
    assert {"procedural", "latent_folder"} <= set(DATASETS.names())
    assert REDUCERS.names() is not None and FEATURE_EXTRACTORS.names() is not None


@pytest.mark.parametrize("registry", [TOKENIZERS, SAMPLERS, DATASETS])
def test_unknown_plugin_lists_known_names(registry):
    with pytest.raises(UnknownPluginError) as e:
        registry.get("no_such_plugin")
    for name in registry.names():
        assert name in str(e.value)


def test_unknown_tokenizer_in_model_is_clear():
    with pytest.raises(UnknownPluginError, match="patchify"):
        tiny(tokenizer="nope")


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_patchify_shapes(p):
    m = tiny(input_size=16, tokenizer=TOKENIZERS.build("patchify", hidden_size=32, in_channels=4, out_channels=8,
                                                       input_size=16, patch_size=p))
    x = torch.randn(3, 4, 16, 16)
    out, info = m(x, torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9]), return_info=True)
    assert out.shape == (3, 8, 16, 16)
    assert info.tokens_per_sample == [(16 // p) ** 2] * 3


def test_image_size_not_divisible_by_patch_is_clear():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        TOKENIZERS.build("patchify", hidden_size=32, in_channels=4, out_channels=8, input_size=10, patch_size=4)


def test_wrong_input_shape_is_clear():
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 4, 8, 8\)"):
        tiny()(torch.randn(2, 3, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_patchify_rejects_budget():
    with pytest.raises(TypeError, match="tail_drop"):
        tiny()(torch.randn(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), tail_drop=0.2)


def test_sincos_matches_dit_table(ref):
    table = ref["state_dict"]["pos_embed"][0]
    ours = sincos_2d(table.shape[1], grid_positions(int(table.shape[0] ** 0.5)))
    assert torch.allclose(ours, table, atol=1e-6)


def test_load_official_dit_reproduces_reference(ref):
    model = load_official_dit(ref["state_dict"], ref["config"]).eval()
    i = ref["inputs"]
    with torch.no_grad():
        out = model(i["x"], i["t"], i["y"])
        cfg = ref["cfg"]
        guided = model.forward_with_cfg(i["x"], i["t"], cfg["y"], cfg["cfg_scale"],
                                        guided_channels=cfg["guided_channels"])
    assert (out - ref["expected"]["out"]).abs().max() < 1e-5
    assert (guided - cfg["out"]).abs().max() < 1e-5


def test_dit_config_inferred_from_shapes(ref):
    with pytest.raises(ValueError, match="cannot infer num_heads"):
        infer_dit_config(ref["state_dict"])
    inferred = infer_dit_config(ref["state_dict"], num_heads=4)
    for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_classes", "learn_sigma"):
        assert inferred[k] == ref["config"][k]


def test_export_round_trip(ref):
    model = load_official_dit(ref["state_dict"], ref["config"])
    exported = to_official_dit(model)
    assert set(exported) == set(ref["state_dict"])
    for k, v in ref["state_dict"].items():
        assert torch.allclose(exported[k], v, atol=1e-6), k


def test_mismatched_state_dict_is_clear(ref):
    sd = dict(ref["state_dict"])
    sd.pop("blocks.1.mlp.fc2.bias")
    with pytest.raises(ValueError, match="missing.*blocks.1.mlp.fc2.bias"):
        load_official_dit(sd, ref["config"])


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_official_dit(tmp_path / "DiT-XL-2-256x256.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a zip file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)
    good = tmp_path / "good.pt"
    atomic_save({"w": torch.ones(2)}, good)
    good.write_bytes(good.read_bytes()[:40])  # truncated
    with pytest.raises(CheckpointError):
        load_checkpoint(good)


def test_cfg_guides_all_eps_channels_by_default():
    m = tiny().eval()
    for p in m.parameters():  # break the zero init so outputs depend on the label
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    y = torch.tensor([1, 2, 10, 10])
    t = torch.tensor([10, 10, 10, 10])
    with torch.no_grad():
        raw = m(x, t, y)
        out = m.forward_with_cfg(x, t, y, cfg_scale=3.0)
    expect = raw[2:, :4] + 3.0 * (raw[:2, :4] - raw[2:, :4])
    assert torch.allclose(out[:2, :4], expect, atol=1e-5)
    assert torch.allclose(out[:2, 4:], raw[:2, 4:], atol=1e-6)


def test_varlen_attention_equals_per_sample_attention():
    lengths = [3, 7, 5]
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    pos = torch.zeros(sum(lengths), 2, dtype=torch.long)
    out = varlen_attention(q, k, v, Tokens.from_lengths(q.flatten(1), lengths, pos))
    s = 0
    for n in lengths:
        ref = torch.softmax(q[s:s + n].transpose(0, 1) @ k[s:s + n].transpose(0, 1).transpose(1, 2) / 8 ** 0.5, -1)
        ref = (ref @ v[s:s + n].transpose(0, 1)).transpose(0, 1)
        assert torch.allclose(out[s:s + n], ref, atol=1e-5)
        s += n


def test_backbone_packed_equals_each_sample_alone():
    """A sample's backbone output must not depend on what else is in the batch."""
    m = tiny().eval()
    for p in m.backbone.parameters():
        torch.nn.init.normal_(p, std=0.1)
    lengths = [5, 9, 2]
    x = torch.randn(sum(lengths), 32)
    pos = torch.zeros(sum(lengths), 2, dtype=torch.long)
    c = torch.randn(3, 32)
    with torch.no_grad():
        packed = m.backbone(Tokens.from_lengths(x, lengths, pos), c).x
        s = 0
        for b, n in enumerate(lengths):
            alone = m.backbone(Tokens.from_lengths(x[s:s + n], [n], pos[s:s + n]), c[b:b + 1]).x
            assert (packed[s:s + n] - alone).abs().max() < 1e-5
            s += n


def test_tokens_validation():
    with pytest.raises(ValueError, match="sum\\(lengths\\) == T"):
        Tokens.from_lengths(torch.randn(5, 4), [2, 2], torch.zeros(5, 2, dtype=torch.long))
