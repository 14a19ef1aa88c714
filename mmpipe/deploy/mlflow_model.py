"""The deployment bundle as an MLflow pyfunc model ("models from code": MLflow loads this file).

Input: a DataFrame with any of the bundle predictor's request columns (``Predictor.request_columns``):
one per file modality (image, audio: the file bytes, base64-encoded, so that a JSON request can carry
them), one per text modality (the text), one per field of a record modality (tabular: its columns);
an empty or missing cell means that input is missing. Output: one row per input row with ``label``, ``probabilities`` (a JSON object as text)
and ``error``: either the first two are set and ``error`` is empty, or the reverse.

Serving is bounded: at most ``serving.max_rows_per_request`` rows per request (manifest.json; a
larger request gets that error on every row), at most ``serving.max_item_bytes`` per file, every
input checked by the bundle's predictor under clean's rules, rows predicted a batch at a time. A
bad row never fails the request.

    mlflow models serve -m "models:/<name>@<alias>" --env-manager local
    curl -X POST localhost:5000/invocations -H 'Content-Type: application/json' \
         -d '{"dataframe_records": [{"text": "seven", "image": "<base64 PNG>"}]}'
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

OUTPUT = ["label", "probabilities", "error"]


class BundleModel(PythonModel):
    def load_context(self, context) -> None:
        folder = Path(context.artifacts["bundle"])
        spec = importlib.util.spec_from_file_location("bundle_predict", folder / "predict.py")
        self.predict_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.predict_module)
        self.predictor = self.predict_module.Predictor(folder)

    def _inputs(self, record: dict[str, Any]) -> dict:
        """One request row -> the predictor's raw inputs; InputError for a cell that cannot be one."""
        InputError = self.predict_module.InputError
        max_bytes = self.predictor.serving["max_item_bytes"]
        given: dict[str, Any] = {}
        for column, (modality, kind) in self.predictor.request_columns().items():
            value = record.get(column)
            if value is None or (isinstance(value, float) and pd.isna(value)) or value == "":
                continue
            if kind == "string":
                given[modality] = str(value)
            elif kind == "record":
                given.setdefault(modality, {})[column] = value
            else:
                if not isinstance(value, str):
                    raise InputError(f"{column} must be base64 text, got {type(value).__name__}")
                if len(value) > 4 * (max_bytes // 3 + 1):  # judged before decoding
                    raise InputError(f"{column} is larger than the bundle's limit of {max_bytes:,} bytes per input")
                try:
                    given[modality] = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise InputError(f"{column} is not valid base64") from None
        return given

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        limit = self.predictor.serving["max_rows_per_request"]
        if len(model_input) > limit:  # answered per row: an exception would echo the whole request back
            error = f"request has {len(model_input):,} rows > {limit:,} per request (export.max_rows_per_request); send it in parts"
            return pd.DataFrame({"label": "", "probabilities": "", "error": [error] * len(model_input)}, columns=OUTPUT)

        def rows() -> Iterator[dict | Exception]:
            for record in model_input.to_dict(orient="records"):
                try:
                    yield self._inputs(record)
                except self.predict_module.InputError as exc:
                    yield exc

        out = [{"label": "", "probabilities": "", "error": result["error"]} if "error" in result else
               {"label": result["label"], "probabilities": json.dumps(result["probabilities"]), "error": ""}
               for result in self.predictor.predict_rows(rows())]
        return pd.DataFrame(out, columns=OUTPUT)


mlflow.models.set_model(BundleModel())
