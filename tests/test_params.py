"""params.yaml schemas: the committed file is valid and complete; bad values give one line each."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT
from mmpipe import params
from mmpipe.errors import PipelineError


@pytest.mark.parametrize("section", params.sections())
def test_committed_params_validate(section):
    params.load(section, ROOT / "params.yaml")


def leaves(tree: dict, mappings: frozenset[str] = frozenset(), prefix: str = "") -> dict:
    """{dotted key: value} of a nested dict; an empty dict (a free-form mapping such as
    encoder_width_scale: {}) and whatever is written under one of ``mappings`` count as one key."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        nested = isinstance(value, dict) and value and name not in mappings
        out.update(leaves(value, mappings, name) if nested else {name: value})
    return out


@pytest.mark.parametrize("section", params.sections())
def test_params_yaml_spells_out_every_key(section):
    # DVC tracks values in params.yaml, not schema defaults: every key must be written there.
    defaults = leaves(params.schema(section)().model_dump(mode="json"))
    mappings = frozenset(key for key, value in defaults.items() if value == {})
    written = leaves(yaml.safe_load((ROOT / "params.yaml").read_text())[section], mappings)
    assert sorted(written) == sorted(defaults)


def _error(section, raw):
    with pytest.raises(PipelineError) as info:
        params.validate(section, raw)
    return str(info.value)


def test_unknown_key_names_it():
    msg = _error("clean", {"min_per_clas": 3})
    assert msg == "params.yaml: clean.min_per_clas: unknown key"


def test_wrong_type_names_key_and_expectation():
    msg = _error("data", {"n_samples": "lots"})
    assert msg.startswith("params.yaml: data.n_samples: Input should be a valid integer")
    assert "'lots'" in msg and "\n" not in msg


def test_out_of_range_nested_key():
    msg = _error("data", {"builtin": {"p_missing": {"image": 1.5, "text": 0.1, "audio": 0.1}}})
    assert msg.startswith("params.yaml: data.builtin.p_missing.image: Input should be less than or equal to 1")


def test_split_fractions_must_sum_to_one():
    msg = _error("clean", {"split": {"train": 0.5, "val": 0.2, "test": 0.2}})
    assert "clean.split" in msg and "sum to 1" in msg


def test_enum_value():
    msg = _error("clean", {"on_bad_modality": "ignore"})
    assert msg.startswith("params.yaml: clean.on_bad_modality:") and "keep_sample" in msg


def test_several_problems_one_line_each():
    msg = _error("clean", {"min_per_class": 0, "workers": -1, "bogus": 1})
    lines = msg.splitlines()
    assert len(lines) == 3
    assert {line.split(":")[1].strip() for line in lines} == {"clean.min_per_class", "clean.workers", "clean.bogus"}


def test_missing_section_and_file(tmp_path):
    (tmp_path / "params.yaml").write_text("data: {}\n")
    with pytest.raises(PipelineError, match="section 'clean' is missing"):
        params.load("clean", tmp_path / "params.yaml")
    with pytest.raises(PipelineError, match="params file not found"):
        params.load("clean", tmp_path / "nope.yaml")


def test_a_preset_fills_the_keys_left_to_auto_and_a_number_wins(tmp_path):
    """preset: quick | balanced | best gives epochs, patience, baselines, every encoder's width and the
    robustness sweep's density where params.yaml says auto (or nothing); an explicit value wins; balanced
    is the schema defaults; the stages that read those keys depend on `preset` in dvc.yaml."""
    import yaml

    from conftest import ROOT

    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert doc["preset"] == "balanced" and doc["train"]["epochs"] == "auto" and doc["evaluate"]["noise_levels"] == "auto"
    balanced = {s: params.validate(s, doc[s]) for s in ("train", "model", "evaluate")}  # the default preset
    for key, value in params.PRESETS["balanced"]["train"].items():
        assert getattr(balanced["train"], key) == getattr(params.TrainParams(), key) == value, key
    assert balanced["evaluate"].noise_levels == params.EvaluateParams().noise_levels
    assert balanced["model"].encoders == params.ModelParams().encoders
    quick = {s: params.validate(s, doc[s], preset="quick") for s in ("train", "model", "evaluate")}
    best = {s: params.validate(s, doc[s], preset="best") for s in ("train", "model", "evaluate")}
    assert (quick["train"].epochs, quick["train"].patience, quick["train"].baselines) == (15, 4, False)
    assert best["train"].epochs == 60 and len(best["evaluate"].noise_levels) == 21 == 2 * len(params.EvaluateParams().noise_levels) - 1
    for m in type(params.ModelParams().encoders).model_fields:  # every modality's encoder: narrower / wider
        widths = [getattr(s["model"].encoders, m).width for s in (quick, best)]
        assert widths[0] < getattr(params.ModelParams().encoders, m).width < widths[1], m
    explicit = params.validate("train", {**doc["train"], "epochs": 7}, preset="best")
    assert explicit.epochs == 7 and explicit.patience == 12
    # read from params.yaml by every stage; an unknown preset stops it in one line
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**doc, "preset": "quick"}))
    assert params.load("train", tmp_path / "params.yaml").epochs == 15
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**doc, "preset": "fastest"}))
    with pytest.raises(PipelineError) as err:
        params.load("evaluate", tmp_path / "params.yaml")
    assert str(err.value) == f"{tmp_path / 'params.yaml'}: preset: must be one of quick, balanced, best (got 'fastest')"
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("train", "evaluate"):
        assert "preset" in stages[stage]["params"], stage


def test_pretrained_weights_must_sit_in_their_modalitys_folder():
    """preprocess@<m> depends on weights/<m>/ only (dvc.yaml): a file elsewhere under weights/ is refused in
    one line; its own folder, or a path outside weights/, is fine."""
    with pytest.raises(PipelineError) as err:
        params.validate("model", {"encoders": {"image": {"arch": "resnet18", "weights": "weights/resnet18.pth"}}})
    assert str(err.value) == ("params.yaml: model.encoders.image.weights: weights/resnet18.pth is under weights/ but not "
                              "in weights/image/ — move it there (e.g. weights/image/resnet18.pth): DVC re-runs a "
                              "modality's stages when its own weights folder changes")
    for fine in ("weights/image/resnet18.pth", "/models/resnet18.pth"):
        assert params.validate("model", {"encoders": {"image": {"arch": "resnet18", "weights": fine}}})
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "weights/${item.modality}" in stages["preprocess"]["deps"] and "weights" in stages["train"]["deps"]
    for m in params.ModelParams().encoders.__class__.model_fields:
        assert (ROOT / "weights" / m).is_dir(), m  # each feature stage's dependency exists in a fresh clone


def test_an_encoder_width_scale_for_an_unknown_modality_names_it():
    message = _error("compress", {"distill": {"encoder_width_scale": {"audoi": 0.5, "image": 0.4}}})
    assert "encoder_width_scale: audoi is not a modality (registered: image, text, audio" in message
    assert "\n" not in message.strip()
    message = _error("compress", {"distill": {"encoder_width_scale": {"audoi.features.3": 0.5}}})
    assert "encoder_width_scale: audoi.features.3 is not a modality" in message
    message = _error("compress", {"distill": {"init": "scratch", "encoder_width_scale": {"image.features.3": 0.5}}})
    assert "encoder_width_scale: image.features.3 names a layer: init scratch scales whole encoders" in message
    assert params.validate("compress", {"distill": {"encoder_width_scale": {"image.features.3": 0.5}}})


def test_attention_maps_need_the_teacher_on_the_students_views():
    msg = _error("compress", {"distill": {"teacher_views": "clean", "map_weight": 2.0}})
    assert msg.startswith("params.yaml: compress.distill") and "map_weight needs teacher_views: augmented" in msg
    assert "\n" not in msg
    assert params.validate("compress", {"distill": {"teacher_views": "clean", "map_weight": 0.0}})
