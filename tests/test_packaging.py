"""The package: pyproject.toml, the requirement files and constraints.txt agree; the installed
``mmpipe`` command works; a missing extra stops a run in one line naming it; the CI workflow lints."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT
from mmpipe.errors import PipelineError

PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines) -> dict[str, str]:
    found = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        assert canonical(match[1]) not in found, f"listed twice: {match[1]}"
        found[canonical(match[1])] = match[3]
    return found


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_pyproject_requirements_and_constraints_agree():
    meta = project()
    runtime = pins(meta["dependencies"])
    extras = {name: pins(d for d in deps if not d.startswith("mmpipe[")) for name, deps in
              meta["optional-dependencies"].items()}
    assert set(extras) == {"text", "tune", "dev"}
    assert "mmpipe[text,tune]" in meta["optional-dependencies"]["dev"]  # the tests need every extra
    assert runtime == pins((ROOT / "requirements.txt").read_text().splitlines())
    optional = {name: version for deps in extras.values() for name, version in deps.items()}
    assert optional == pins((ROOT / "requirements-dev.txt").read_text().splitlines())
    assert not set(runtime) & set(optional), "a package both required and optional"
    constraints = pins((ROOT / "constraints.txt").read_text().splitlines())
    disagree = {n: (v, constraints.get(n)) for n, v in {**runtime, **optional}.items() if constraints.get(n) != v}
    assert not disagree, f"pins that differ from constraints.txt (pyproject, constraints): {disagree}"
    for heavy in ("optuna", "transformers", "tokenizers", "librosa", "numba", "llvmlite"):  # extras only
        assert heavy not in runtime
    assert meta["scripts"] == {"mmpipe": "mmpipe.cli:main"}
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"


def test_the_installed_package_is_this_checkout():
    """.venv's mmpipe is the editable install of this pyproject.toml (make reinstalls when it changes)."""
    installed = {canonical(PIN.match(r)[1]): PIN.match(r)[3] for r in importlib.metadata.requires("mmpipe")
                 if "extra ==" not in r}
    assert installed == pins(project()["dependencies"])
    import mmpipe
    assert Path(mmpipe.__file__).resolve().parent == ROOT / "mmpipe"
    entry = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "mmpipe"]
    assert [e.value for e in entry] == ["mmpipe.cli:main"]


def test_mmpipe_command_help_and_doctor(tmp_path):
    mmpipe = Path(sys.executable).with_name("mmpipe")
    proc = subprocess.run([str(mmpipe), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("doctor", "predict", "ui", "tune"):
        assert command in proc.stdout
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run([str(mmpipe), "doctor", "--offline"], cwd=ROOT / "stages", env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith(("ok", "warn", "FAIL"))}
    assert lines["packages"].startswith("ok") and "pinned versions" in lines["packages"]
    assert lines["params.yaml"].startswith("ok") and str(ROOT / "params.yaml") in lines["params.yaml"]
    assert lines["mlflow"].startswith("ok") and str(tmp_path) in lines["mlflow"]
    assert "torch 2.11.0" in lines["torch"]
    assert proc.stdout.strip().splitlines()[-1].startswith("doctor: 0 failed, ")
    # outside a project: one line, exit 1, the rest of the report still printed
    proc = subprocess.run([str(mmpipe), "doctor", "--offline"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 1
    assert "not inside an mmpipe project" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_mmpipe_predict_without_a_bundle_says_how_to_build_one(tmp_path):
    proc = subprocess.run([str(Path(sys.executable).with_name("mmpipe")), "predict", "--bundle", str(tmp_path),
                           "--text", "hello"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {tmp_path}: no deployment bundle (predict.py) here; build it with "
                                   "`dvc repro export` or pass --bundle DIR")


@pytest.mark.parametrize("module, extra, call", [
    ("tokenizers", "text", "tokenizer"),
    ("transformers", "text", "encoder"),
    ("optuna", "tune", "study"),
])
def test_a_missing_extra_stops_in_one_line_naming_it(module, extra, call, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    with pytest.raises(PipelineError) as info:
        if call == "tokenizer":
            from mmpipe.modalities.text import pretrained_tokenizer
            (tmp_path / "tokenizer.json").write_text("{}")
            pretrained_tokenizer(str(tmp_path), 16)
        elif call == "encoder":
            from mmpipe.models.backbones import TransformersEncoder
            TransformersEncoder("text", {"model_type": "bert"}, 16, None, "none", 1.0)
        else:
            from mmpipe import params, tune
            tune.open_study(params.validate("tune", {}), "s", tmp_path / "tune.db", 2)
    message = str(info.value)
    assert "\n" not in message
    assert f"optional package {module!r}, not installed: pip install -e '.[{extra}]' -c constraints.txt" in message


def test_a_broken_optional_package_is_not_called_missing(monkeypatch, tmp_path):
    """An extra that is installed but fails on one of its own imports shows that error, not 'install it'."""
    from mmpipe.extras import require

    (tmp_path / "halfinstalled").mkdir()
    (tmp_path / "halfinstalled" / "__init__.py").write_text("import no_such_dependency_of_it\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as info:
        require("halfinstalled", "a test")
    assert not isinstance(info.value, PipelineError) and info.value.name == "no_such_dependency_of_it"
    with pytest.raises(PipelineError, match=r"needs the optional package 'not_installed_anywhere'"):
        require("not_installed_anywhere", "a test")


def test_ci_workflow_passes_actionlint():
    actionlint = Path(sys.executable).with_name("actionlint")
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows
    proc = subprocess.run([str(actionlint), "-no-color", *map(str, workflows)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_the_fast_subset_on_pull_requests_and_everything_on_main():
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "pipeline.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert "pull_request" in triggers and "schedule" in triggers and triggers["push"]["branches"] == ["main"]
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "make test-fast" in runs and "make test" in runs.replace("make test-fast", "")
    assert "dvc plots diff" in runs and "dvc metrics diff" in runs
    assert any(s.get("uses", "").startswith("actions/cache@") and "constraints.txt" in str(s.get("with", {}))
               for s in steps)


def test_the_code_has_no_pyflakes_findings():
    proc = subprocess.run([sys.executable, "-m", "pyflakes", "mmpipe", "stages", "bench", "tests", "tools"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    # a package's __init__ re-exports names from its modules on purpose: pyflakes calls those unused
    findings = [line for line in proc.stdout.splitlines()
                if not ("__init__.py:" in line and line.endswith("imported but unused"))]
    assert not findings and not proc.stderr, "\n".join(findings) + proc.stderr


def test_doctor_on_a_broken_install_reports_every_check_without_a_traceback(tmp_path):
    """What a half-installed environment gets (here: PyYAML and torch made unimportable): each check's
    line says what failed, the exit status is 1, and nothing dies on the way."""
    code = ("import sys; sys.modules['yaml'] = None; sys.modules['torch'] = None\n"
            "from mmpipe.cli import main; main(['doctor', '--offline'])")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith(("ok", "warn", "FAIL"))}
    assert lines["torch"].startswith("FAIL") and "torch" in lines["torch"]
    assert lines["params.yaml"].startswith("FAIL") and "yaml" in lines["params.yaml"]
    assert lines["disk"].startswith("ok")


def test_the_wheelhouse_check_adds_the_tracked_tree_and_fails_over_the_limit(tmp_path):
    """`make wheelhouse` ends with tools/offline/carry_size.py: the git-tracked files (not ignored ones) plus
    the wheelhouse must fit what a lent GPU machine carries (64 MiB); over it, exit 1 with one line."""
    repo = tmp_path / "repo"
    (repo / ".whl").mkdir(parents=True)
    (repo / "tracked.bin").write_bytes(b"\0" * 3 * 2**20)
    (repo / "ignored.bin").write_bytes(b"\0" * 50 * 2**20)
    (repo / ".gitignore").write_text("/ignored.bin\n/.whl/\n")
    (repo / ".whl" / "a-1.0-py3-none-any.whl").write_bytes(b"\0" * 2 * 2**20)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)

    def check(*args):
        return subprocess.run([sys.executable, str(ROOT / "tools" / "offline" / "carry_size.py"), ".whl", *args],
                              cwd=repo, capture_output=True, text=True, timeout=60)

    fits = check()
    assert fits.returncode == 0 and fits.stdout.startswith("working tree 3.0 MiB + .whl 2.0 MiB = 5.0 MiB (limit 64 MiB)")
    over = check("--limit-mib", "4")
    assert over.returncode == 1 and "over the limit" in over.stdout and len(over.stdout.splitlines()) == 1
    (repo / ".whl" / "a-1.0-py3-none-any.whl").unlink()
    (repo / ".whl").rmdir()
    assert check().returncode == 1
