"""The deployment bundle as an MLflow pyfunc model ("models from code": MLflow loads this file).

Input: a DataFrame with any of the bundle predictor's request columns (``Predictor.request_columns``):
one per file modality (image, audio: the file bytes, base64-encoded, so that a JSON request can carry
them), one per text modality (the text), one per field of a record modality (tabular: its columns);
an empty or missing cell means that input is missing. Output: one row per input row, its columns by the
model's target (``OUTPUTS``): a class ``label`` + ``probabilities`` (a JSON object as text) + its conformal
``prediction_set`` (a JSON list as text); a number ``value`` (in the training data's units) +
``interval_low``/``interval_high`` (its conformal interval, null where unbounded); a tag set ``tags`` (a JSON
list as text) + ``scores`` (a JSON object as text) + ``prediction_set``; and ``error``: either the answer is
set and ``error`` is empty, or the reverse. (Sets and intervals hold the truth with probability >= 1 - alpha:
manifest.json, models.shipped.calibration.) A row with none of the request columns (``{}``, only unknown keys) gets
its error like any other bad row: no input row ever goes unanswered.

Serving is bounded (manifest.json ``serving``; docs/deployment.md "Serving limits"). MLflow's
scoring server turns a request body into a DataFrame before any model code runs, and a few KB can
hold a million rows (Parquet's run-length encoding, CSV's newlines) or nest 100,000 deep (JSON). So
``load_context`` puts a guard in front of the scoring server's parsing (``guard_scoring_server``):
a body over ``max_request_bytes`` is refused with HTTP 413, a body over ``max_rows_per_request`` rows
or ``max_request_columns`` columns — counted from the Parquet footer, the CSV lines, the JSON
structure — or that does not parse (absurd nesting included) with one HTTP 400 error for the
request: an answer of a few hundred bytes, whatever the request. Then at most ``max_item_bytes``
per file, every input checked by the bundle's predictor under clean's rules, rows predicted a batch
at a time. A bad row never fails the request.

    mlflow models serve -m "models:/<name>@<alias>" --env-manager local
    curl -X POST localhost:5000/invocations -H 'Content-Type: application/json' \
         -d '{"dataframe_records": [{"text": "seven", "image": "<base64 PNG>"}]}'
"""

from __future__ import annotations

import base64
import binascii
import csv
import importlib.util
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

OUTPUTS = {"category": ["label", "probabilities", "prediction_set", "error"],
           "number": ["value", "interval_low", "interval_high", "error"],
           "set": ["tags", "scores", "prediction_set", "error"]}
OUTPUT = OUTPUTS["category"]
NUMERIC_OUTPUTS = {"value", "interval_low", "interval_high"}  # doubles (null when absent); the others are text


def target_type(manifest: dict) -> str:
    return (manifest.get("target") or {"type": "category"})["type"]


def output_row(result: dict, kind: str) -> dict[str, Any]:
    """One predictor result as a row of the output frame (``OUTPUTS[kind]`` columns)."""
    if "error" in result:
        return {c: (None if c in NUMERIC_OUTPUTS else "") for c in OUTPUTS[kind][:-1]} | {"error": result["error"]}
    if kind == "number":
        low, high = result.get("interval", (None, None))  # null: unbounded (or a bundle without calibration)
        return {"value": result["value"], "interval_low": low, "interval_high": high, "error": ""}
    # the conformal set (a JSON list as text; "" from a bundle without calibration)
    conformal = json.dumps(result["prediction_set"]) if "prediction_set" in result else ""
    if kind == "set":
        return {"tags": json.dumps(result["tags"]), "scores": json.dumps(result["scores"]), "prediction_set": conformal,
                "error": ""}
    return {"label": result["label"], "probabilities": json.dumps(result["probabilities"]), "prediction_set": conformal,
            "error": ""}
CSV, JSON, PARQUET = "text/csv", "application/json", "application/vnd.apache.parquet"
EXTRA_COLUMNS = 64  # columns a request may carry beyond the model's (ids, the caller's own)
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class RequestRefused(Exception):
    """A whole request over the serving limits: one answer for it, with this HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _outside_strings(data: bytes, *tokens: bytes) -> int:
    """How many of ``tokens`` a JSON text holds outside its strings (cheap count first: exact only
    when the cheap one is over, for text cells full of brackets)."""
    return sum(_JSON_STRING.sub(b'""', data).count(t) for t in tokens)


def _as_text(value: Any) -> Any:
    """A JSON scalar of a request cell as the text a CSV row or a form sends (the signature's string
    columns): booleans as true/false, integral numbers as integers; nested values stay nested
    (bad cells of a record, exactly as at clean)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):  # (at most 4,000 digits: longer ones were parsed as infinite floats)
        return str(value)
    if isinstance(value, float):
        return json.dumps(value) if not math.isfinite(value) or not value.is_integer() else str(int(value))
    return value


class Limits:
    """The serving limits of the bundle (manifest.json ``serving``) and the request columns."""

    def __init__(self, serving: dict, columns: list[str], parse_int: Callable[[str], int | float] = int):
        self.parse_int = parse_int  # the bundle's portable.json_int: a 5,000-digit integer is a number, not a 500
        self.max_bytes = int(serving.get("max_request_bytes", 100_000_000))  # (bundles before the limit: 100 MB)
        self.max_rows = int(serving["max_rows_per_request"])
        self.columns = columns
        self.max_columns = len(columns) + EXTRA_COLUMNS

    def _rows(self, rows: int) -> None:
        if rows > self.max_rows:
            raise RequestRefused(400, f"request has {rows:,} rows > {self.max_rows:,} per request "
                                      "(export.max_rows_per_request); send it in parts")

    def check(self, data: bytes | str, mime: str) -> tuple[Any, int | None]:
        """The body, checked (RequestRefused when over a limit), and None; or, for a table none of
        whose columns is a request column, its number of rows: MLflow would drop the unknown columns
        and with them every row, so those rows are answered here, each with its error. A JSON body
        comes back parsed, its cells as text (the scoring server takes a parsed body as it is)."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        if len(data) > self.max_bytes:
            raise RequestRefused(413, f"request body is {len(data):,} bytes > {self.max_bytes:,} "
                                      "(export.max_request_mb); send it in parts")
        if mime == PARQUET:
            return self._parquet(data)
        if mime == CSV:
            return self._csv(data)
        if mime == JSON:
            return self._json(data)
        return data, None  # other types: the scoring server answers 415 without parsing

    def _known(self, columns) -> bool:
        return any(c in self.columns for c in columns)

    def no_input(self) -> str:
        shown = ", ".join(self.columns[:12]) + (", ..." if len(self.columns) > 12 else "")
        return f"no input: the row has none of the request columns ({shown})"

    def _parquet(self, data: bytes) -> tuple[bytes, int | None]:
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(io.BytesIO(data))
            meta = file.metadata
        except Exception as exc:  # pyarrow raises several types for a file it cannot read
            raise RequestRefused(400, f"request body is not a readable Parquet file ({type(exc).__name__})") from None
        if meta.num_columns > self.max_columns:
            raise RequestRefused(400, f"request has {meta.num_columns:,} columns > {self.max_columns:,}")
        self._rows(meta.num_rows)
        expanded = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        if expanded > self.max_bytes:  # a small compressed body that decodes into a huge one
            raise RequestRefused(400, f"request decodes to {expanded:,} bytes > {self.max_bytes:,} "
                                      "(export.max_request_mb)")
        return data, None if self._known(file.schema_arrow.names) else meta.num_rows

    def _csv(self, data: bytes) -> tuple[bytes, int | None]:
        first = data.split(b"\n", 1)[0]
        if first.count(b",") >= self.max_columns:
            raise RequestRefused(400, f"request has {first.count(b',') + 1:,} columns > {self.max_columns:,}")
        header = next(csv.reader([first.decode("utf-8", "replace")]), [])
        if data.count(b"\n") <= self.max_rows and self._known(header):
            return data, None
        # quoted newlines make the line count an upper bound: count the records
        csv.field_size_limit(2**31 - 1)  # a base64 cell is one field; its size is judged per item later
        rows = -1  # the header is not a row
        try:
            for rows, _ in enumerate(csv.reader(io.TextIOWrapper(io.BytesIO(data), "utf-8", "replace", newline="")), -1):
                if rows >= self.max_rows:
                    raise RequestRefused(400, f"request has more than {self.max_rows:,} rows "
                                              "(export.max_rows_per_request); send it in parts")
        except csv.Error as exc:
            raise RequestRefused(400, f"request body is not valid CSV ({exc})") from None
        return data, None if self._known(header) else rows + 1

    def _json(self, data: bytes) -> tuple[dict, int | None]:
        # parsed, a JSON object, array or key costs ~30x its bytes in the body: their number is bounded
        # before parsing (a few bytes each, a 100 MB body would hold millions)
        bound = self.max_rows * (self.max_columns + 2) + 16
        cheap = data.count(b"{") + data.count(b"[") + data.count(b":")
        if cheap > bound and _outside_strings(data, b"{", b"[", b":") > bound:
            raise RequestRefused(400, f"request has more than {bound:,} JSON objects, arrays and keys "
                                      f"(at most {self.max_rows:,} rows of {self.max_columns:,} columns)")
        try:
            body = json.loads(data, parse_int=self.parse_int)
        except RecursionError:
            raise RequestRefused(400, "request body is nested too deeply to be a request") from None
        except ValueError as exc:  # JSONDecodeError, invalid UTF-8
            raise RequestRefused(400, f"request body is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
        if not isinstance(body, dict):
            raise RequestRefused(400, f"request body must be a JSON object with dataframe_records, dataframe_split, "
                                      f"instances or inputs (got {type(body).__name__})")
        records, split = body.get("dataframe_records"), body.get("dataframe_split")
        if isinstance(records, list):
            self._rows(len(records))
            body["dataframe_records"] = [{k: _as_text(v) for k, v in row.items()} if isinstance(row, dict) else row
                                         for row in records]
            if records and all(isinstance(row, dict) and not self._known(row) for row in records):
                return body, len(records)
        elif isinstance(split, dict) and isinstance(split.get("data"), list):
            self._rows(len(split["data"]))
            columns = split.get("columns") or []
            if len(columns) > self.max_columns:
                raise RequestRefused(400, f"request has {len(columns):,} columns > {self.max_columns:,}")
            split["data"] = [[_as_text(v) for v in row] if isinstance(row, list) else row for row in split["data"]]
            if split["data"] and isinstance(columns, list) and not self._known(columns):
                return body, len(split["data"])
        else:
            for key in ("instances", "inputs"):
                value = body.get(key)
                if isinstance(value, list):
                    self._rows(len(value))
                elif isinstance(value, dict):
                    self._rows(max((len(v) for v in value.values() if isinstance(v, list)), default=1))
        return body, None


def guard_scoring_server(limits: Limits, kind: str = "category") -> None:
    """Put ``limits`` in front of the request parsing of MLflow's scoring server (the process
    ``mlflow models serve`` starts, which loads this model before it serves): its request handler
    calls ``scoring_server.invocations`` by name, so the guard takes that name. A refused request gets
    one JSON error ({"error_code", "message"}) and its status; the rest goes on to MLflow's own
    parsing, a JSON body already parsed (MLflow takes a parsed body as it is: parsed once)."""
    from mlflow.pyfunc import scoring_server

    parse: Callable = getattr(scoring_server.invocations, "unguarded", scoring_server.invocations)

    def invocations(data, content_type, model, input_schema):
        mime = (content_type or "").split(";")[0].strip().lower()
        try:
            data, unknown_rows = limits.check(data, mime)
        except RequestRefused as refused:
            code = "REQUEST_LIMIT_EXCEEDED" if refused.status == 413 else "BAD_REQUEST"
            return scoring_server.InvocationsResponse(json.dumps({"error_code": code, "message": str(refused)}),
                                                      refused.status, "application/json")
        if unknown_rows is not None:  # every row answered with its error (MLflow would answer no row)
            row = output_row({"error": limits.no_input()}, kind)
            return scoring_server.InvocationsResponse(json.dumps({"predictions": [row] * unknown_rows}), 200,
                                                      "application/json")
        return parse(data, content_type, model, input_schema)

    invocations.unguarded = parse
    scoring_server.invocations = invocations


class BundleModel(PythonModel):
    def load_context(self, context) -> None:
        folder = Path(context.artifacts["bundle"])
        spec = importlib.util.spec_from_file_location("bundle_predict", folder / "predict.py")
        self.predict_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.predict_module)
        self.predictor = self.predict_module.Predictor(folder)
        self.limits = Limits(self.predictor.serving, list(self.predictor.request_columns()),
                             self.predict_module.portable.json_int)
        self.kind = target_type(self.predictor.manifest)
        guard_scoring_server(self.limits, self.kind)

    def _inputs(self, record: dict[str, Any]) -> dict:
        """One request row -> the predictor's raw inputs; InputError for a cell that cannot be one."""
        InputError = self.predict_module.InputError
        max_bytes = self.predictor.serving["max_item_bytes"]
        given: dict[str, Any] = {}
        for column, (modality, kind) in self.predictor.request_columns().items():
            value = record.get(column)
            if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA or \
                    (isinstance(value, str) and value == ""):
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
        n = len(model_input)
        if n > self.limits.max_rows:  # in-process callers; the scoring server's guard refused it before parsing
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                f"request has {n:,} rows > {self.limits.max_rows:,} per request (export.max_rows_per_request); send it in parts")

        def rows() -> Iterator[dict | Exception]:
            known = [c for c in model_input.columns if c in self.limits.columns]
            # row by row over the known columns: a frame with none of them (rows of {} or of unknown
            # keys) still has its n rows, each answered with its error
            for values in model_input[known].itertuples(index=False, name=None) if known else ([()] * n):
                try:
                    yield self._inputs(dict(zip(known, values)))
                except self.predict_module.InputError as exc:
                    yield exc

        out = [output_row(result, self.kind) for result in self.predictor.predict_rows(rows())]
        # object columns: an unanswered row's value stays None (JSON null), not a float NaN (invalid JSON)
        return pd.DataFrame(out, columns=OUTPUTS[self.kind], dtype=object)


mlflow.models.set_model(BundleModel())
