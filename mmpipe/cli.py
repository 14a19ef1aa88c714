"""The mmpipe command: what users do outside dvc (the pipeline itself is `dvc repro`).

    mmpipe doctor                 is this machine and project ready? versions, CUDA, disk, params, stores
    mmpipe predict [ARGS...]      the deployment bundle's predictor (artifacts/deploy/predict.py ARGS)
    mmpipe ui [--port 5000]       MLflow's UI on the project's store, opened on the pipeline's runs
    mmpipe tune                   the hyperparameter search (features first, then the Optuna study)

Each subcommand is a thin call into the library or the stage it names; run it inside the project
(the folder with dvc.yaml, or below it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from mmpipe.errors import PipelineError, redact
from mmpipe.stage import run_stage

MIN_FREE_DISK_GB = 5.0   # a default run writes ~0.5 GB (cache included); a realistic 10k-sample run ~3 GB
REMOTE_TIMEOUT_S = 20.0


def project() -> Path:
    """The DVC project this command runs in (the nearest folder up with dvc.yaml and params.yaml), or a
    one-line error. Standard library only: doctor must get this far on a broken install."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    raise PipelineError(f"{here}: not inside an mmpipe project (no dvc.yaml and params.yaml here or above); "
                        "cd into your clone of the project")


# ---- doctor -------------------------------------------------------------------------------------------

class Report:
    """Lines of ``ok`` / ``warn`` / ``FAIL`` / ``info``; failed() when any check failed."""

    def __init__(self, out: Callable[[str], None] = print):
        self.out, self.failures, self.warnings = out, 0, 0

    def __call__(self, status: str, what: str, detail: str) -> None:
        self.failures += status == "FAIL"
        self.warnings += status == "warn"
        self.out(f"{status:<5} {what:<18} {redact(detail)}")

    def check(self, what: str, probe: Callable[[], tuple[str, str]]) -> None:
        """Run ``probe`` -> (status, detail); an exception is that check's FAIL, never the command's."""
        try:
            status, detail = probe()
        except PipelineError as exc:
            status, detail = "FAIL", str(exc)
        except Exception as exc:  # noqa: BLE001 - a broken install must be reported, not crash the report
            first = str(exc).splitlines()[0] if str(exc) else ""
            status, detail = "FAIL", f"{type(exc).__name__}: {first}"
        self(status, what, detail)


def pinned_requirements(extra: str | None = None) -> dict[str, str]:
    """name -> pinned version of mmpipe's dependencies (those of ``extra``, or the runtime ones)."""
    found = {}
    for line in importlib.metadata.requires("mmpipe") or []:
        spec, _, marker = line.partition(";")
        in_extra = f'extra == "{extra}"' in marker.replace("'", '"') if extra else not marker.strip()
        if in_extra and "==" in spec:
            name, _, version = spec.partition("==")
            found[name.strip()] = version.strip()
    return found


def check_packages(report: Report) -> None:
    mismatched, missing = [], []
    for name, pin in pinned_requirements().items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        if have.split("+")[0] != pin:  # torch's local version (+cpu, +cu128) is the build, not the version
            mismatched.append(f"{name} {have} (pinned {pin})")
    if missing:
        report("FAIL", "packages", f"not installed: {', '.join(missing)}: pip install -e . -c constraints.txt")
    elif mismatched:
        report("warn", "packages", f"versions differ from the pins: {'; '.join(mismatched)}")
    else:
        report("ok", "packages", f"{len(pinned_requirements())} runtime dependencies at their pinned versions")
    for extra in ("text", "tune", "dev"):
        names = [n for n in pinned_requirements(extra) if n != "mmpipe"]
        absent = [n for n in names if not _distribution(n)]
        report("info", f"extra [{extra}]", "installed" if not absent else
               f"not installed ({', '.join(absent)}): pip install -e '.[{extra}]' -c constraints.txt")


def _distribution(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def check_torch() -> tuple[str, str]:
    import torch

    build = f"torch {torch.__version__} (CUDA {torch.version.cuda})" if torch.version.cuda else \
        f"torch {torch.__version__} (CPU build)"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return "ok", f"{build}; GPU: {', '.join(names)}; every stage uses it (device: auto)"
    return "ok", f"{build}; no GPU: every stage runs on the CPU ({os.cpu_count()} cores)"


def check_onnxruntime() -> tuple[str, str]:
    import onnxruntime

    return "ok", f"onnxruntime {onnxruntime.__version__}, providers {', '.join(onnxruntime.get_available_providers())}"


def check_disk(root: Path) -> tuple[str, str]:
    free = shutil.disk_usage(root).free / 1e9
    status = "ok" if free >= MIN_FREE_DISK_GB else "warn"
    return status, f"{free:.1f} GB free under {root}" + ("" if status == "ok" else
                                                           f" (under {MIN_FREE_DISK_GB:.0f} GB: a large run may not fit)")


def check_params(root: Path) -> tuple[str, str]:
    from mmpipe import params

    for section in params.sections():
        params.load(section, root / params.PARAMS_FILE)
    return "ok", f"{root / params.PARAMS_FILE}: every section valid ({', '.join(params.sections())})"


def check_mlflow() -> tuple[str, str]:
    from mmpipe import tracking
    from mmpipe.tracking.store import _open_store

    uri = tracking.tracking_uri()
    _, experiment = _open_store()
    return "ok", f"{uri} (experiment id {experiment})"


def check_dvc_remote(root: Path) -> tuple[str, str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return "warn", "no default DVC remote: `make push` / `make pull` and CI's run-cache need one (dvc remote add -d)"
        url = repo.config["remote"][name]["url"]
        answer: dict[str, object] = {}

        def probe():  # a cloud remote may hang on credentials or the network: bounded by a thread's join
            try:
                odb = repo.cloud.get_remote_odb(name)
                answer["exists"] = odb.fs.exists(odb.path)
            except Exception as exc:  # noqa: BLE001 - reported as the check's detail
                answer["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(REMOTE_TIMEOUT_S)
    if thread.is_alive():
        return "warn", f"{name} = {url}: no answer in {REMOTE_TIMEOUT_S:.0f} s (network or credentials)"
    if "error" in answer:
        return "warn", f"{name} = {url}: not reachable ({answer['error']})"
    if not answer["exists"]:
        return "ok", f"{name} = {url}: reachable, empty (the first `make push` creates it)"
    return "ok", f"{name} = {url}: reachable"


def doctor(args: argparse.Namespace) -> int:
    report = Report()
    report("ok" if sys.version_info >= (3, 11) else "FAIL", "python",
           f"{platform.python_version()} at {sys.executable}")
    check_packages(report)
    report.check("torch", check_torch)
    report.check("onnxruntime", check_onnxruntime)
    try:
        root = project()
    except PipelineError as exc:
        report("FAIL", "project", str(exc))
        return 1
    report.check("disk", lambda: check_disk(root))
    report.check("params.yaml", lambda: check_params(root))
    report.check("mlflow store", check_mlflow)
    if not args.offline:
        report.check("dvc remote", lambda: check_dvc_remote(root))
    print(f"doctor: {report.failures} failed, {report.warnings} warnings")
    return 1 if report.failures else 0


# ---- predict, ui, tune --------------------------------------------------------------------------------

def predict(args: argparse.Namespace, rest: list[str]) -> int:
    bundle = Path(args.bundle) if args.bundle else project() / "artifacts" / "deploy"
    script = bundle / "predict.py"
    if not script.is_file():
        raise PipelineError(f"{bundle}: no deployment bundle (predict.py) here; build it with `dvc repro export` "
                            "or pass --bundle DIR")
    # the bundle's own predictor, as a user of the bundle alone runs it: the same answers, the same messages
    return subprocess.call([sys.executable, str(script), *rest])


def ui(args: argparse.Namespace) -> int:
    from mmpipe import tracking
    from mmpipe.tracking.store import _open_store

    if "MLFLOW_TRACKING_URI" not in os.environ:
        project()  # the project's own store (mlflow.db beside dvc.yaml)
    uri = tracking.tracking_uri()

    def address(base: str) -> str:
        # MLflow 3 opens an experiment on its GenAI overview unless the address names the workflow
        # (its GenAI / Model training switch wins over the experiment's kind tag that tracking sets)
        _, experiment_id = _open_store()
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"

    if not uri.startswith("sqlite:"):  # MLFLOW_TRACKING_URI names a server: its own UI
        print(f"MLflow UI of your tracking server, the pipeline's runs: {redact(address(uri))}")
        return 0
    print(f"MLflow UI, the pipeline's runs: {address(f'http://{args.host}:{args.port}')}", flush=True)
    if args.url_only:
        return 0
    mlflow = Path(sys.executable).with_name("mlflow")
    os.execv(str(mlflow), [str(mlflow), "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)])
    return 0  # not reached


def tune(args: argparse.Namespace) -> int:
    from mmpipe.extras import require

    require("optuna", "mmpipe tune (the hyperparameter search)")
    root = project()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               DVC_NO_ANALYTICS="1")  # dvc.yaml's stage commands call `python`: this environment's
    if not args.skip_features:
        code = subprocess.call([str(Path(sys.executable).with_name("dvc")), "repro", "preprocess"], cwd=root, env=env)
        if code:
            return code
    return subprocess.call([sys.executable, "-m", "stages.tune"], cwd=root, env=env)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mmpipe", description=__doc__.split("\n\n")[0],
                                  epilog="The pipeline itself: `dvc repro` (or `make repro`). README.md: Quick start.")
    top.add_argument("--version", action="version", version=f"mmpipe {importlib.metadata.version('mmpipe')}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("doctor", help="check this machine and project: versions, CUDA, disk, params, MLflow, DVC remote")
    p.add_argument("--offline", action="store_true", help="skip the DVC remote check")
    p = sub.add_parser("predict", help="the bundle's predictor: mmpipe predict --image x.png --text '...' (see --help)",
                       add_help=False)
    p.add_argument("--bundle", help="the bundle folder (default: artifacts/deploy of this project)")
    p = sub.add_parser("ui", help="MLflow's UI on the project's store, opened on the pipeline's runs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--url-only", action="store_true", help="print the address, start nothing")
    p = sub.add_parser("tune", help="hyperparameter search (params.yaml: tune): features, study, best as an experiment")
    p.add_argument("--skip-features", action="store_true", help="do not run `dvc repro preprocess` first")
    return top


def main(argv: list[str] | None = None) -> None:
    args, rest = parser().parse_known_args(argv)
    if rest and args.command != "predict":
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    commands = {"doctor": doctor, "ui": ui, "tune": tune}
    code = 0

    def run() -> None:
        nonlocal code
        code = predict(args, rest) if args.command == "predict" else commands[args.command](args)

    run_stage(run)
    sys.exit(code)


if __name__ == "__main__":
    main()
