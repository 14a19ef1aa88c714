"""`make ui`: MLflow's UI on the project's store, and the address that opens it on the pipeline's runs.

MLflow 3 opens an experiment on its GenAI overview (traces, tokens) unless the page is told the
workflow is model training: the experiment carries ``mlflow.experimentKind`` (mmpipe.tracking sets
it), but the UI's GenAI / Model training switch wins over that tag and defaults to GenAI, so the
address printed here carries ``workflowType=machine_learning``.

    python tools/mlflow_ui.py [--port 5000] [--url-only]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmpipe import tracking  # noqa: E402
from mmpipe.errors import redact  # noqa: E402
from mmpipe.stage import run_stage  # noqa: E402


def address(base: str) -> str:
    _, experiment_id = tracking._open_store()  # creates the experiment (kind tag included) on a fresh store
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--url-only", action="store_true", help="print the address, start nothing")
    args = parser.parse_args()
    uri = tracking.tracking_uri()
    if not uri.startswith("sqlite:"):  # MLFLOW_TRACKING_URI names a server: its own UI
        print(f"MLflow UI of your tracking server, the pipeline's runs: {redact(address(uri))}")
        return
    print(f"MLflow UI, the pipeline's runs: {address(f'http://{args.host}:{args.port}')}", flush=True)
    if not args.url_only:
        os.execvp("mlflow", ["mlflow", "ui", "--backend-store-uri", uri,
                             "--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    run_stage(main)
