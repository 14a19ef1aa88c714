"""Publishing bundles to a real MLflow registry (SQLite store): the champion is replaced only by a
candidate at least as accurate on the same raw test files (scored from the champion's own bundle),
an identical bundle is registered once, and a registration that fails or is killed leaves no
version and no logged model stuck in PENDING."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys

import mlflow
import pytest
from mlflow.entities import LoggedModelStatus

from mmpipe.deploy import registry
from mmpipe.deploy.export import example_request
from mmpipe.deploy.verify import _bundle_accuracy, bundle_accuracy, load_predictor, raw_test_items
from mmpipe.features.loader import FeatureSet
from mmpipe.tracking import process_tags
from mmpipe.modalities import names

GATED = {"gates": {"checked": {"min_accuracy": 0.1}, "passed": True, "failed": []}}


@pytest.fixture
def store(tmp_path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("registry-test", artifact_location=(tmp_path / "artifacts").as_uri())
    try:
        with mlflow.start_run(experiment_id=experiment):
            yield experiment
    finally:
        mlflow.set_tracking_uri(previous)


def candidate(bundle, tmp_path, name: str, shift_labels: bool = False, note: str = "") -> tuple:
    """A copy of the tiny bundle in <name>/deploy; ``shift_labels``: its label order rotated (the same
    model, every prediction named wrongly: a worse bundle); ``note``: a change no prediction sees."""
    folder = tmp_path / name / "deploy"
    shutil.copytree(bundle["folder"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if shift_labels:
        manifest["labels"] = manifest["labels"][1:] + manifest["labels"][:1]
    if note:
        (folder / "requirements.txt").write_text((folder / "requirements.txt").read_text() + f"# {note}\n")
        manifest["files"]["requirements.txt"] = registry.hashlib.sha256((folder / "requirements.txt").read_bytes()).hexdigest()
    manifest["versions"]["git_commit"] = name  # build facts differ between exports: not the content
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_the_champion_moves_only_to_a_candidate_as_good_on_the_same_test_data(bundle, tiny_corpus, tmp_path, store):
    roots = {"features_root": tiny_corpus / "features", "raw_dir": tiny_corpus / "raw", "clean_dir": tiny_corpus / "clean"}
    score = functools.partial(bundle_accuracy, **roots)  # the champion's: its own bundle, in its own process
    test = FeatureSet(tiny_corpus / "features", split="test")
    items = raw_test_items(tiny_corpus / "raw", tiny_corpus / "clean", test.sample_ids, list(names()))
    example = example_request(load_predictor(bundle["folder"]).Predictor(bundle["folder"]), items)

    def publish(folder, evaluation=GATED, policy="gated", data="d1"):
        accuracy, _, _ = _bundle_accuracy(folder, batch_size=64, **roots)
        return registry.publish(folder, "tiny", "champion", policy, evaluation, accuracy, example, score, data,
                                {"predictor_raw_test_accuracy": accuracy}, {"shipped_variant": "int8"})

    client = mlflow.MlflowClient()
    first = publish(candidate(bundle, tmp_path, "a"))
    assert first["registered"] and first["version"] == "1" and first["alias_moved"]
    assert first["alias_decision"].endswith("passed in the main workspace; no current champion")
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    # the registered artifact is the bundle folder as it is named in place, never a temporary one
    logged = client.get_logged_model(first["model_id"])
    stored = mlflow.artifacts.list_artifacts(artifact_uri=f"{logged.artifact_location}/artifacts")
    assert [a.path.rsplit("/", 1)[-1] for a in stored] == ["deploy"]

    again = publish(candidate(bundle, tmp_path, "a-again"))  # the same content, exported again
    assert not again["registered"] and again["version"] == "1" and not again["alias_moved"]
    assert again["alias_decision"].startswith("identical to version 1 (bundle digest ")
    assert len(client.search_model_versions("name = 'tiny'")) == 1

    worse = publish(candidate(bundle, tmp_path, "worse", shift_labels=True))
    assert worse["registered"] and worse["version"] == "2" and not worse["alias_moved"]
    champion = worse["champion_before"]
    assert champion["version"] == "1" and champion["items"] == len(test) and not champion["data_changed"]
    assert worse["alias_decision"].startswith("not better than the champion: ")
    assert f"vs champion version 1's {champion['accuracy']:.4f} on the same {len(test)} raw test files" in worse["alias_decision"]
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"

    no_gate = publish(candidate(bundle, tmp_path, "no-gate", note="no gate"), evaluation={"gates": {"checked": {}}})
    assert no_gate["registered"] and not no_gate["alias_moved"] and "no quality gate is configured" in no_gate["alias_decision"]

    equal = publish(candidate(bundle, tmp_path, "equal", note="same predictions"), data="d2")
    assert equal["registered"] and equal["alias_moved"]
    assert "at least as accurate as the champion" in equal["alias_decision"]
    assert "(the test data changed since version 1 was registered)" in equal["alias_decision"]
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == equal["version"]
    models = client.search_logged_models([store])
    assert models and all(m.status == LoggedModelStatus.READY for m in models)


def test_a_failed_or_killed_registration_leaves_no_version_and_nothing_pending(bundle, tiny_corpus, tmp_path, store,
                                                                              monkeypatch):
    test = FeatureSet(tiny_corpus / "features", split="test")
    items = raw_test_items(tiny_corpus / "raw", tiny_corpus / "clean", test.sample_ids, list(names()))
    example = example_request(load_predictor(bundle["folder"]).Predictor(bundle["folder"]), items)
    folder = candidate(bundle, tmp_path, "a")
    client = mlflow.MlflowClient()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C (or a SIGTERM turned into an exception) while the version is described

    monkeypatch.setattr(client.__class__, "update_model_version", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registry.register(folder, "tiny", example, {"m": 1.0}, {"bundle.digest": "x"})
    monkeypatch.undo()
    assert client.search_model_versions("name = 'tiny'") == []  # the version it had made is gone
    (model,) = client.search_logged_models([store])
    assert model.status == LoggedModelStatus.FAILED

    # kill -9 cannot be caught: the next export marks what a dead (or reused) pid left PENDING as FAILED
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_id = mlflow.active_run().info.run_id
    left = {}
    mine = process_tags()
    for name, tags in (("dead", mine | {"mmpipe.pid": dead.stdout.strip()}), ("reused", mine | {"mmpipe.process_start": "1.0"}),
                       ("alive", mine)):
        left[name] = mlflow.initialize_logged_model(name=name, source_run_id=run_id, tags=tags).model_id
    assert sorted(registry.fail_abandoned(store)) == sorted([left["dead"], left["reused"]])
    assert client.get_logged_model(left["alive"]).status == LoggedModelStatus.PENDING  # a live export's: kept


def test_a_champion_that_cannot_be_scored_keeps_the_alias_unless_it_cannot_compare():
    base = {"version": "3", "items": 0, "data_changed": False}
    unreachable = base | {"fetched": False, "accuracy": None, "why": "its bundle could not be fetched: OSError"}
    assert registry.decide("gated", GATED, 0.99, unreachable) == (
        False, "champion version 3 could not be scored (its bundle could not be fetched: OSError): alias not moved")
    other_classes = base | {"fetched": True, "accuracy": None, "why": "it does not predict the classes cat"}
    moved, why = registry.decide("gated", GATED, 0.5, other_classes)
    assert moved and why.endswith("champion version 3 not comparable (it does not predict the classes cat)")
    assert registry.decide("always", {}, 0.1, unreachable) == (True, "export.move_alias is always")
    assert registry.decide("never", GATED, 1.0, None) == (False, "export.move_alias is never")
