"""The generated parts of the README stay true, and the CI example only calls what exists."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from conftest import DVC, ROOT, stage_env

sys.path.insert(0, str(ROOT / "tools"))
from params_reference import BEGIN, END, reference  # noqa: E402

README = (ROOT / "README.md").read_text()


def between(doc: str, begin: str, end: str) -> str:
    return doc[doc.index(begin) + len(begin):doc.index(end)].strip()


def test_parameter_reference_is_generated_from_params_yaml():
    expected = reference((ROOT / "params.yaml").read_text())
    doc = (ROOT / "docs" / "params.md").read_text()
    assert between(doc, BEGIN, END) == expected, "run: python tools/params_reference.py --write docs/params.md"
    assert "docs/params.md" in README
    keys = re.findall(r"^\| `([\w.]+)` \|", expected, flags=re.M)
    assert {"data.source", "model.fusion", "compress.quantize.layers", "export.alias"} <= set(keys)
    undocumented = [line for line in expected.splitlines()[2:] if line.rstrip().endswith("|  |")]
    assert not undocumented, "comment these keys in params.yaml: " + ", ".join(undocumented)


def test_readme_dag_is_what_dvc_draws():
    drawn = subprocess.run([DVC, "dag", "--mermaid"], cwd=ROOT, env=stage_env(ROOT), capture_output=True,
                           text=True, check=True).stdout.strip()
    assert between(README, "<!-- dag:begin -->", "<!-- dag:end -->") == f"```mermaid\n{drawn}\n```"


def test_ci_example_calls_existing_make_targets_and_dvc_commands():
    workflow = yaml.safe_load((ROOT / ".github/workflows/pipeline.yml").read_text())
    steps = workflow["jobs"]["repro"]["steps"]
    commands = " ".join(step.get("run", "") for step in steps)
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert set(re.findall(r"\bmake (\w+)", commands)) <= targets
    assert {"pull", "push", "ci", "ui", "exps"} <= targets
    order = [name for name in ("make pull", "dvc repro --pull", "make push", "dvc metrics diff") if name in commands]
    assert order == ["make pull", "dvc repro --pull", "make push", "dvc metrics diff"]
    assert [commands.index(name) for name in order] == sorted(commands.index(name) for name in order)


def test_layout_is_where_dvc_yaml_says_each_stage_writes():
    """mmpipe/layout.py (the paths the stage scripts and summary use) and dvc.yaml agree, stage by stage."""
    from mmpipe import layout

    def paths(entries) -> set[str]:
        return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {name: paths(spec.get("outs")) | paths(spec.get("metrics")) | paths(spec.get("plots"))
                for name, spec in stages.items()}
    assert declared == layout.stage_outputs()
    # every stage's inputs among them are declared as dependencies too
    assert str(layout.SOURCE) in paths(stages["collect"]["deps"]) and str(layout.RAW) in paths(stages["clean"]["deps"])
    assert {str(layout.FEATURES), str(layout.WEIGHTS)} <= paths(stages["train"]["deps"]) and str(layout.FUSION.parent) in paths(stages["evaluate"]["deps"])


def test_dvc_yaml_matrices_and_plots_follow_the_modality_registry():
    from mmpipe.modalities import MODALITIES, names

    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for stage in ("preprocess", "preprocess-part"):
        assert dvc_yaml["stages"][stage]["matrix"]["modality"] == list(names()), f"dvc.yaml {stage}'s matrix"
    plots = {name: spec for entry in dvc_yaml["plots"] for name, spec in entry.items()}
    for m, module in MODALITIES.items():
        spec = plots.get(f"Robustness, {m} corrupted")
        assert spec, f"dvc.yaml has no robustness plot of {m}"
        for model in ("fused", "baseline"):
            columns = spec["y"][f"plots/eval/robustness_{m}_{model}.csv"]
            assert sorted([columns] if isinstance(columns, str) else columns) == sorted(module.CORRUPTIONS), (m, model)


def test_readme_leads_with_what_how_and_how_long_then_a_current_table_of_contents():
    first_screen = "\n".join(README.splitlines()[:20])
    for needed in ("make repro", "make test", "min", "DVC", "deploy"):
        assert needed in first_screen, needed
    headings, fence = [], False
    for line in README.splitlines():
        fence ^= line.startswith("```")
        match = None if fence else re.match(r"^(#{2,3}) (.*)$", line)
        if match and match[2] != "Contents":
            headings.append(("  " if len(match[1]) == 3 else "") + match[2])
    listed = re.findall(r"^( *)- \[([^\]]+)\]\(#([^)]+)\)$", between(README, "## Contents", "## Quick start"), flags=re.M)
    assert [indent + title for indent, title, _ in listed] == headings
    for _, title, anchor in listed:  # GitHub's anchors: lower case, punctuation dropped, spaces as dashes
        assert anchor == re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"), title
    order = [h.strip() for h in headings if not h.startswith(" ")]
    journey = ["Quick start", "From your own files to a deployed prediction", "Using pretrained encoders",
               "Predicting a number or a set of tags", "The deployment bundle", "Troubleshooting"]
    assert [order.index(h) for h in journey] == sorted(order.index(h) for h in journey)
