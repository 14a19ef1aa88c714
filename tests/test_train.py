"""Training: deterministic on CPU, resumes after a kill, writes a model that rebuilds from its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpipe import params
from mmpipe.features.loader import FeatureSet
from mmpipe.training.model_io import load_model
from mmpipe.training.train import accuracy, clear_checkpoints, place_splits, train

SMALL = params.ModelParams(dim=16, hidden=32, attention_heads=2, encoders={"image": {"width": 4}, "text": {"embed_dim": 8, "width": 16}, "audio": {"width": 4}})


@pytest.fixture(scope="module")
def features(tiny_corpus):
    return tiny_corpus / "features"


def run(features, out, checkpoints, epochs=2, fusion="concat", modalities=("image", "text", "audio"), on_epoch=None,
        memory_budget_mb=4096):
    cfg = params.TrainParams(epochs=epochs, batch_size=32, device="cpu", patience=10, memory_budget_mb=memory_budget_mb)
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
    # finished: its checkpoint now holds the finished model, which a re-run takes instead of training
    [finished] = list((tmp_path / "ck2").glob("*.pt"))
    assert torch.load(finished, weights_only=True)["finished"] and resumed["checkpoint"] == finished
    epochs_seen.clear()
    again = run(features, tmp_path / "again", tmp_path / "ck2", epochs=3, on_epoch=lambda e, r: epochs_seen.append(e))
    assert epochs_seen == [] and again["metrics"] == resumed["metrics"] and again["history"] == resumed["history"]
    assert (tmp_path / "again/model.safetensors").read_bytes() == (tmp_path / "resumed/model.safetensors").read_bytes()
    clear_checkpoints([again["checkpoint"]])  # what the stage does once every output is written
    assert not list((tmp_path / "ck2").glob("*.pt"))


def test_a_killed_run_does_not_resume_into_changed_model_code_or_weights(features, tmp_path, monkeypatch):
    from mmpipe.training import train as train_module

    def die_at_epoch_1(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(features, tmp_path / "killed", tmp_path / "ck", epochs=2, on_epoch=die_at_epoch_1)
    monkeypatch.setattr(train_module, "code_digest", lambda: "the model code after an edit")
    epochs_seen = []
    run(features, tmp_path / "after", tmp_path / "ck", epochs=2, on_epoch=lambda epoch, row: epochs_seen.append(epoch))
    assert epochs_seen == [0, 1]  # trained from the start, not from the old code's checkpoint
    # the digest covers the loop, the networks (the fusion head included) and the encoders' factories
    import mmpipe.modalities.audio
    import mmpipe.models.fusion

    covered = {p.resolve() for folder in train_module.MODEL_CODE for p in folder.glob("*.py")}
    assert {Path(m.__file__).resolve() for m in (train_module, mmpipe.models.fusion, mmpipe.modalities.audio)} <= covered
    # the digest follows the files' bytes; the weights files' sha256 is part of the key too
    code = tmp_path / "code"
    code.mkdir()
    (code / "fusion.py").write_text("x = 1\n")
    monkeypatch.undo()
    monkeypatch.setattr(train_module, "MODEL_CODE", [code])
    before = train_module.code_digest()
    (code / "fusion.py").write_text("x = 2\n")
    assert train_module.code_digest() != before
    cfg = params.TrainParams(epochs=2)
    key = [tmp_path, "m", {"a": 1}, cfg, features]
    assert train_module.checkpoint_path(*key, {"image": "aa"}) != train_module.checkpoint_path(*key, {"image": "bb"})


def test_resume_after_a_non_improving_epoch_is_exact(features, tmp_path):
    """The early-stopping counter and every RNG survive a kill: a run killed right after an epoch that did
    not improve stops at the same epoch, with the same weights, as the run that was never killed."""
    cfg = params.TrainParams(epochs=12, batch_size=32, device="cpu", patience=2, lr=0.02)
    straight = train(cfg, SMALL, features, ["image", "text", "audio"], tmp_path / "straight", tmp_path / "ck1")
    history = [r["val_accuracy"] for r in straight["history"]]
    # killed after the next-to-last epoch: with patience 2, early stopping ended the run after two epochs
    # without improvement, so that epoch did not improve and the counter stood at 1 when it was killed
    kill_after = len(history) - 2
    assert len(history) < cfg.epochs and history[kill_after] <= max(history[:kill_after]), history  # preconditions

    def die(epoch, row):
        if epoch == kill_after + 1:  # the checkpoint of the non-improving epoch is on disk by now
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(cfg, SMALL, features, ["image", "text", "audio"], tmp_path / "killed", tmp_path / "ck2", die)
    saved = torch.load(next((tmp_path / "ck2").glob("*.pt")), weights_only=True)
    assert saved["epoch"] == kill_after and saved["stalled"] >= 1
    resumed = train(cfg, SMALL, features, ["image", "text", "audio"], tmp_path / "killed", tmp_path / "ck2")
    assert resumed["metrics"]["epochs_run"] == straight["metrics"]["epochs_run"]
    assert [r["val_accuracy"] for r in resumed["history"]] == history
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in straight["history"]]
    assert (tmp_path / "killed/model.safetensors").read_bytes() == (tmp_path / "straight/model.safetensors").read_bytes()


def test_saved_model_rebuilds_and_scores_the_same(features, tmp_path):
    result = run(features, tmp_path / "m", tmp_path / "ck", modalities=("text",))
    model = load_model(tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    assert config["modalities"] == ["text"] and config["labels"] == [str(d) for d in range(10)]
    val = FeatureSet(features, split="val")
    assert accuracy(model, val, ["text"], torch.device("cpu")) == result["metrics"]["val_accuracy"]
    assert result["metrics"]["parameters"] == sum(p.numel() for p in model.parameters())


def test_split_over_the_memory_budget_is_streamed_and_trains_to_the_same_weights(features, tmp_path, monkeypatch):
    held = run(features, tmp_path / "held", None)
    assert held["metrics"]["data"] == {"train": "in_memory", "val": "in_memory"}

    def no_loading(self, device):
        raise AssertionError(f"the {self.split} split was loaded whole")
    monkeypatch.setattr(FeatureSet, "to", no_loading)
    streamed = run(features, tmp_path / "streamed", None, memory_budget_mb=0)
    assert streamed["metrics"]["data"] == {"train": "streamed", "val": "streamed"}
    assert (tmp_path / "held/model.safetensors").read_bytes() == (tmp_path / "streamed/model.safetensors").read_bytes()
    assert [{**r, "samples_per_s": 0} for r in held["history"]] == [{**r, "samples_per_s": 0} for r in streamed["history"]]

    # the budget is shared: the train split (larger than 1 MiB here) streams, the small val split still fits
    monkeypatch.undo()
    splits = {s: FeatureSet(features, split=s) for s in ("train", "val")}
    assert splits["train"].nbytes > 2**20 > splits["val"].nbytes
    assert place_splits(splits, torch.device("cpu"), 2**20) == {"train": "streamed", "val": "in_memory"}
    batches = list(splits["train"].batches(32, shuffle=True, seed=3))
    reference = FeatureSet(features, split="train").to("cpu")
    for got, want in zip(batches, reference.batches(32, shuffle=True, seed=3), strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_cuda_graphs_resolve_per_device_and_fall_back_to_eager_in_one_line(capsys):
    """train.cuda_graphs: auto is on for one CUDA process only (not beside train.compile or a teacher), true off
    CUDA is a one-line error; a compiled step that fails on its first call (auto) trains eagerly from then on,
    said once, while ``true`` lets the failure stop the run."""
    from mmpipe.errors import PipelineError
    from mmpipe.training.distributed import world
    from mmpipe.training.train import GraphedSteps, use_cuda_graphs
    one, cpu, cuda = world(), torch.device("cpu"), torch.device("cuda")
    assert use_cuda_graphs("auto", cuda, one, False, False) and not use_cuda_graphs("auto", cpu, one, False, False)
    assert not use_cuda_graphs("auto", cuda, one, True, False) and not use_cuda_graphs("auto", cuda, one, False, True)
    assert not use_cuda_graphs(False, cuda, one, False, False)
    with pytest.raises(PipelineError, match="train.cuda_graphs: true needs a CUDA device"):
        use_cuda_graphs(True, cpu, one, False, False)

    model = torch.nn.Linear(3, 2)
    calls = []

    def broken(inputs):
        calls.append(1)
        raise RuntimeError("no compiler here\nsecond line")

    steps = GraphedSteps(model, broken)
    x = torch.randn(4, 3)
    torch.testing.assert_close(steps(x), model(x))
    torch.testing.assert_close(steps(x), model(x))
    assert len(calls) == 1 and steps.step is model and steps.train(False) is steps and not model.training
    out = capsys.readouterr().out
    assert out.count("CUDA graphs unavailable (RuntimeError: no compiler here)") == 1 and "second line" not in out
    with pytest.raises(RuntimeError, match="no compiler here"):
        GraphedSteps(model, broken, strict=True)(x)
