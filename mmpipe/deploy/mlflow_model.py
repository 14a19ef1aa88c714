"""The deployment bundle as an MLflow pyfunc model ("models from code": MLflow loads this file).

Input: a DataFrame with any of the columns ``image`` and ``audio`` (the file bytes, base64-encoded,
so that a JSON request can carry them) and ``text``; an empty or missing cell means the modality is
missing. Output: one row per input row with ``label``, ``probabilities`` (a JSON object as text)
and ``error``: either the first two are set and ``error`` is empty, or the reverse.

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

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

COLUMNS = ("image", "audio", "text")


class BundleModel(PythonModel):
    def load_context(self, context) -> None:
        folder = Path(context.artifacts["bundle"])
        spec = importlib.util.spec_from_file_location("bundle_predict", folder / "predict.py")
        self.predict_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.predict_module)
        self.predictor = self.predict_module.Predictor(folder)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows, ready = [], []
        for i, record in enumerate(model_input.to_dict(orient="records")):
            try:
                given = {}
                for column in COLUMNS:
                    value = record.get(column)
                    if value is None or (isinstance(value, float) and pd.isna(value)) or value == "":
                        continue
                    if column == "text":
                        given[column] = str(value)
                    else:
                        try:
                            given[column] = base64.b64decode(value, validate=True)
                        except (binascii.Error, ValueError, TypeError):
                            raise self.predict_module.InputError(f"{column} is not valid base64") from None
                ready.append((i, self.predictor.features(**given)))
                rows.append({"label": "", "probabilities": "", "error": ""})
            except self.predict_module.InputError as exc:
                rows.append({"label": "", "probabilities": "", "error": str(exc)})
        if ready:
            for (i, _), prediction in zip(ready, self.predictor.predict([f for _, f in ready])):
                rows[i] = {"label": prediction["label"], "probabilities": json.dumps(prediction["probabilities"]),
                           "error": ""}
        return pd.DataFrame(rows, columns=["label", "probabilities", "error"])


mlflow.models.set_model(BundleModel())
