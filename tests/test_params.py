"""params.yaml schemas: the committed file is valid and complete; bad values give one line each."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT
from mmpipe import params
from mmpipe.errors import PipelineError
from mmpipe.io import flatten


@pytest.mark.parametrize("section", params.sections())
def test_committed_params_validate(section):
    params.load(section, ROOT / "params.yaml")


@pytest.mark.parametrize("section", params.sections())
def test_params_yaml_spells_out_every_key(section):
    # DVC tracks values in params.yaml, not schema defaults: every key must be written there.
    written = flatten(yaml.safe_load((ROOT / "params.yaml").read_text())[section])
    schema = flatten(params.schema(section)().model_dump(mode="json"))
    assert sorted(written) == sorted(schema)


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
