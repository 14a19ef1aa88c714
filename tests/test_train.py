"""Training: deterministic on CPU, resumes after a kill, writes a model that rebuilds from its folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mmpipe import params
from mmpipe.features.loader import FeatureSet
from mmpipe.models.train import accuracy, load_model, train

SMALL = params.ModelParams(dim=16, hidden=32, image_width=4, text_embed_dim=8, text_width=16, audio_width=4,
                           attention_heads=2)


@pytest.fixture(scope="module")
def features(tiny_corpus):
    return tiny_corpus / "features"


def run(features, out, checkpoints, epochs=2, fusion="concat", modalities=("image", "text", "audio"), on_epoch=None):
    cfg = params.TrainParams(epochs=epochs, batch_size=32, device="cpu", patience=10)
    model_cfg = SMALL.model_copy(update={"fusion": fusion})
    return train(cfg, model_cfg, features, list(modalities), out, checkpoints, on_epoch)


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention"])
def test_same_seed_gives_identical_weights_and_metrics(features, tmp_path, fusion):
    a = run(features, tmp_path / "a", tmp_path / "ck", fusion=fusion)
    b = run(features, tmp_path / "b", tmp_path / "ck", fusion=fusion)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert a["history"] == [{**r, "samples_per_s": a["history"][i]["samples_per_s"]} for i, r in enumerate(b["history"])]
    assert a["metrics"]["val_accuracy"] == b["metrics"]["val_accuracy"]


def test_killed_training_resumes_from_last_epoch(features, tmp_path):
    straight = run(features, tmp_path / "straight", tmp_path / "ck1", epochs=3)

    def die_at_epoch_2(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(features, tmp_path / "resumed", tmp_path / "ck2", epochs=3, on_epoch=die_at_epoch_2)
    assert len(list((tmp_path / "ck2").glob("*.pt"))) == 1  # epoch 1's checkpoint survived
    epochs_seen = []
    resumed = run(features, tmp_path / "resumed", tmp_path / "ck2", epochs=3,
                  on_epoch=lambda epoch, row: epochs_seen.append(epoch))
    assert epochs_seen == [2]  # epochs 0 and 1 were not trained again
    assert [r["val_accuracy"] for r in resumed["history"]] == [r["val_accuracy"] for r in straight["history"]]
    a, b = load_file(str(tmp_path / "straight/model.safetensors")), load_file(str(tmp_path / "resumed/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "ck2").glob("*.pt"))  # finished runs leave no checkpoint


def test_saved_model_rebuilds_and_scores_the_same(features, tmp_path):
    result = run(features, tmp_path / "m", tmp_path / "ck", modalities=("text",))
    model = load_model(tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    assert config["modalities"] == ["text"] and config["labels"] == [str(d) for d in range(10)]
    val = FeatureSet(features, split="val")
    assert accuracy(model, val, ["text"], torch.device("cpu")) == result["metrics"]["val_accuracy"]
    assert result["metrics"]["parameters"] == sum(p.numel() for p in model.parameters())
