"""The fusion model: shapes, missing modalities, modality dropout, rebuild from config."""

from __future__ import annotations

import json

import pytest
import torch

from mmpipe import params
from mmpipe.models.fusion import FUSIONS, drop_modalities
from mmpipe.training.model_io import build_model, model_config

STATES = {
    "image": {"arrays": {"image": {"shape": [3, 32, 32]}}, "array_order": ["image"], "mean": [0.5] * 3, "std": [0.25] * 3},
    "text": {"arrays": {"text": {"shape": [48]}, "text_length": {"shape": []}},
             "array_order": ["text", "text_length"], "vocab_size": 50},
    "audio": {"arrays": {"audio": {"shape": [64, 151]}}, "array_order": ["audio"], "mean": [-5.0] * 64, "std": [2.0] * 64},
}
LABELS = [str(d) for d in range(10)]


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            "text": torch.randint(2, 50, (n, 48), generator=g, dtype=torch.int32),
            "text_length": torch.randint(1, 48, (n,), generator=g, dtype=torch.int32),
            "audio": (torch.randn(n, 64, 151, generator=g) * 2 - 5).half(),
            "available": torch.ones(n, 3, dtype=torch.bool)}


def model(fusion, modalities=("image", "text", "audio")):
    cfg = params.ModelParams(fusion=fusion, dim=32, hidden=32, encoders={"image": {"width": 8}, "text": {"width": 16}, "audio": {"width": 4}})
    config = model_config(list(modalities), STATES, cfg.model_dump(), LABELS)
    torch.manual_seed(0)
    return build_model(json.loads(json.dumps(config))).eval()  # the config survives JSON


@pytest.mark.parametrize("fusion", FUSIONS)
def test_logits_shape_and_missing_modality_uses_placeholder(fusion):
    net = model(fusion)
    b = batch()
    assert net(b).shape == (6, 10)
    b["available"][:, 2] = False  # audio missing: its content must not matter
    other = dict(b, audio=torch.zeros_like(b["audio"]))
    with torch.no_grad():
        assert torch.allclose(net(b), net(other))
        b["available"][:, 2] = True
        assert not torch.allclose(net(b), net(dict(b, audio=torch.zeros_like(b["audio"]))))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_no_modality_available_still_gives_finite_logits(fusion):
    b = batch()
    b["available"][:] = False
    assert torch.isfinite(model(fusion)(b)).all()


def test_single_modality_model():
    net = model("concat", modalities=("text",))
    b = batch()
    assert net(dict(b, available=b["available"][:, [1]])).shape == (6, 10)
    assert list(net.encoders) == ["text"]


def test_training_mode_augments_and_eval_is_deterministic():
    net = model("concat")
    b = batch()
    with torch.no_grad():
        assert torch.equal(net(b), net(b))
        net.train()
        torch.manual_seed(1)
        first = net(b)
        torch.manual_seed(2)
        assert not torch.allclose(first, net(b))


def test_drop_modalities_never_empties_a_sample():
    torch.manual_seed(0)
    available = torch.rand(10_000, 3) < 0.7
    available[0] = False  # a sample with nothing stays with nothing
    kept = drop_modalities(available, 0.9)
    assert not (kept & ~available).any()
    assert (kept.any(dim=1) == available.any(dim=1)).all()
    dropped_share = 1 - kept.sum() / available.sum()
    assert 0.5 < dropped_share < 0.8
    assert torch.equal(drop_modalities(available, 0.0), available)


def test_attention_heads_must_divide_dim():
    with pytest.raises(Exception, match="multiple of attention_heads"):
        params.validate("model", {"dim": 30, "attention_heads": 4})
