"""A model's V2 interface from the MLflow signature it was logged with: metadata, and requests decoded to it.

Column-based signatures (a model logged from a DataFrame) become one V2 input per column, named and
typed as MLServer's MLflow runtime names and types them (mlserver_mlflow/metadata.py): double FP64,
float FP32, long INT64, integer INT32, boolean BOOL, string/binary/datetime BYTES, shape [-1, 1].
A request sends one input per column (shape [rows] or [rows, 1]), or, when every column is numeric,
one row-major tensor [rows, columns]; the model gets a DataFrame of the signature's columns in order,
as `mlflow.sklearn.load_model(...).predict(df)` would. Tensor signatures (a model logged from an
array) keep the single `input-0` tensor. Every mismatch is an InferenceError (400) naming the input
and what was expected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, MetadataTensor, Parameters

# MLflow column type -> (V2 datatype, numpy dtype the DataFrame column gets)
COLUMN_TYPES: dict[str, tuple[str, type | str]] = {
    "double": ("FP64", np.float64),
    "float": ("FP32", np.float32),
    "long": ("INT64", np.int64),
    "integer": ("INT32", np.int32),
    "boolean": ("BOOL", np.bool_),
    "string": ("BYTES", object),
    "binary": ("BYTES", object),
    "datetime": ("BYTES", "datetime64[ns]"),
}
NUMERIC = {"double", "float", "long", "integer", "boolean"}
FLOATS = {"FP64", "FP32", "FP16"}
INPUT_PREFIX = "input-"
# scikit-learn trees predict in float32: larger magnitudes become Inf there, and overflow scalers elsewhere.
MAX_MAGNITUDE = float(np.finfo(np.float32).max)


class RequestTooLarge(InferenceError):
    """A client error (413 over REST, RESOURCE_EXHAUSTED over gRPC) that the router counts as one."""

    def __init__(self, msg: str):
        super().__init__(msg)
        self.status_code = 413


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # MLflow's: double, string, ...
    required: bool = True

    @property
    def datatype(self) -> str:
        return COLUMN_TYPES[self.type][0]

    def describe(self) -> str:
        return f"{self.datatype} ({self.type})"


def _check_finite(name: str, values: np.ndarray) -> None:
    if values.dtype.kind == "f" and values.size and not np.abs(values).max() <= MAX_MAGNITUDE:  # one pass: NaN compares false
        raise InferenceError(f"input {name!r} contains NaN, Inf (null over REST) or a value beyond ±{MAX_MAGNITUDE:.4g}; the model needs finite numbers")


def datatype_of(tensor) -> str:
    """A tensor's datatype name: an enum over REST, a plain string over gRPC."""
    return getattr(tensor.datatype, "value", tensor.datatype)


def parse_columns(mlmodel: dict) -> list[Column] | None:
    """The columns of a column-based signature; None for a tensor signature or none at all."""
    inputs = (mlmodel.get("signature") or {}).get("inputs")
    if not inputs:
        return None
    specs = json.loads(inputs) if isinstance(inputs, str) else inputs
    if not specs or any(s.get("type") == "tensor" or s.get("type") not in COLUMN_TYPES or not s.get("name") for s in specs):
        return None
    return [Column(s["name"], s["type"], s.get("required", True)) for s in specs]


def tensor_metadata(mlmodel: dict) -> list[MetadataTensor]:
    """A tensor signature's one input, as `input-0` (what requests to it send)."""
    inputs = (mlmodel.get("signature") or {}).get("inputs")
    specs = json.loads(inputs) if isinstance(inputs, str) else (inputs or [])
    out = []
    for i, s in enumerate(specs):
        spec = s.get("tensor-spec") or {}
        if s.get("type") != "tensor" or "dtype" not in spec:
            return []
        datatype = NumpyCodec.encode_output("x", np.zeros(1, dtype=spec["dtype"])).datatype
        out.append(MetadataTensor(name=s.get("name") or f"{INPUT_PREFIX}{i}", datatype=datatype, shape=list(spec.get("shape") or [-1])))
    return out


def output_metadata(mlmodel: dict, has_proba: bool, classes=None) -> list[MetadataTensor]:
    """`predict` typed from the signature's output (labels INT64 when integers), and `predict_proba`."""
    outputs = (mlmodel.get("signature") or {}).get("outputs")
    specs = json.loads(outputs) if isinstance(outputs, str) else (outputs or [])
    kind = specs[0].get("tensor-spec", {}).get("dtype") if specs and specs[0].get("type") == "tensor" else (specs[0].get("type") if specs else None)
    datatype = {
        "long": "INT64",
        "integer": "INT64",
        "int64": "INT64",
        "int32": "INT64",
        "string": "BYTES",
        "object": "BYTES",
        "boolean": "BOOL",
        "bool": "BOOL",
    }.get(kind or "", "FP64")
    out = [MetadataTensor(name="predict", datatype=datatype, shape=[-1, 1])]
    if has_proba:
        out.append(MetadataTensor(name="predict_proba", datatype="FP64", shape=[-1, len(classes) if classes is not None else -1]))
    return out


def column_metadata(columns: list[Column]) -> list[MetadataTensor]:
    return [
        MetadataTensor(name=c.name, datatype=c.datatype, shape=[-1, 1], parameters=Parameters(content_type="np" if c.type in NUMERIC else "str"))
        for c in columns
    ]


class ColumnDecoder:
    """V2 inputs -> {column: 1-D array}, checked against the signature."""

    def __init__(self, columns: list[Column], max_values: int):
        self.columns = columns
        self.by_name = {c.name: c for c in columns}
        self.numeric = all(c.type in NUMERIC for c in columns)
        self.max_values = max_values

    def expected(self) -> str:
        return ", ".join(f"{c.name} {c.describe()}" for c in self.columns)

    def decode(self, payload: InferenceRequest) -> dict[str, np.ndarray]:
        inputs = payload.inputs
        size = sum(math.prod(i.shape) for i in inputs)
        if size > self.max_values:
            raise RequestTooLarge(
                f"request too large: {size:,} values; this model takes at most {self.max_values:,} values per request "
                "(parameters.extra.max_request_values): send smaller batches"
            )
        if len(inputs) == 1 and inputs[0].name not in self.by_name and self.numeric and len(inputs[0].shape) == 2:
            return self._row_major(inputs[0])
        names = [i.name for i in inputs]
        extra = [n for n in names if n not in self.by_name]
        if extra:
            raise InferenceError(f"unknown input(s) {', '.join(map(repr, extra))}; this model takes one input per column: {self.expected()}")
        if len(set(names)) != len(names):
            raise InferenceError(f"input {next(n for n in names if names.count(n) > 1)!r} is sent more than once")
        missing = [c for c in self.columns if c.name not in names and c.required]
        if missing:
            raise InferenceError(f"missing input(s) {', '.join(f'{c.name!r} {c.describe()}' for c in missing)}; this model takes {self.expected()}")
        out, rows = {}, None
        for inp in inputs:
            column = self.by_name[inp.name]
            values = self._column(column, inp)
            if rows is None:
                rows = len(values)
            elif len(values) != rows:
                raise InferenceError(f"input {inp.name!r} has {len(values)} rows, input {inputs[0].name!r} has {rows}; every column needs one value per row")
            out[inp.name] = values
        if not rows:
            raise InferenceError("the request has no rows")
        return out

    def _column(self, column: Column, inp) -> np.ndarray:
        datatype = datatype_of(inp)
        if len(inp.shape) > 2 or (len(inp.shape) == 2 and inp.shape[1] != 1) or any(d < 0 for d in inp.shape):
            raise InferenceError(f"input {inp.name!r} has shape {list(inp.shape)}; a column is [rows] or [rows, 1]")
        if column.type in NUMERIC:
            if datatype == "BYTES":
                raise InferenceError(f"input {inp.name!r} has datatype BYTES; the model expects {column.describe()}")
            if column.type not in ("double", "float") and datatype in FLOATS:
                raise InferenceError(f"input {inp.name!r} has datatype {datatype}; the model expects {column.describe()}, whole numbers")
            try:
                values = np.asarray(NumpyCodec.decode_input(inp)).reshape(-1)
            except Exception as exc:  # noqa: BLE001 - codec errors are the client's
                raise InferenceError(f"cannot decode input {inp.name!r}: {exc}") from None
            _check_finite(inp.name, values)
            return values.astype(COLUMN_TYPES[column.type][1], copy=False)
        if datatype != "BYTES":
            raise InferenceError(f"input {inp.name!r} has datatype {datatype}; the model expects {column.describe()}")
        try:
            values = StringCodec.decode_input(inp)
        except Exception as exc:  # noqa: BLE001
            raise InferenceError(f"cannot decode input {inp.name!r} as UTF-8 strings: {exc}") from None
        array = np.empty(len(values), dtype=object)
        array[:] = values
        if column.type == "datetime":
            try:
                return array.astype("datetime64[ns]")
            except ValueError as exc:
                raise InferenceError(f"input {inp.name!r}: {exc}; the model expects ISO 8601 datetimes") from None
        return array

    def _row_major(self, inp) -> dict[str, np.ndarray]:
        datatype = datatype_of(inp)
        if datatype == "BYTES":
            raise InferenceError(f"input {inp.name!r} has datatype BYTES; send one input per column: {self.expected()}")
        rows, width = inp.shape
        if width != len(self.columns):
            raise InferenceError(f"input {inp.name!r} has {width} values per row; the model takes {len(self.columns)} columns: {self.expected()}")
        try:
            X = np.asarray(NumpyCodec.decode_input(inp)).reshape(rows, width)
        except Exception as exc:  # noqa: BLE001
            raise InferenceError(f"cannot decode input {inp.name!r}: {exc}") from None
        _check_finite(inp.name, X)
        if not rows:
            raise InferenceError("the request has no rows")
        return {c.name: X[:, i].astype(COLUMN_TYPES[c.type][1], copy=False) for i, c in enumerate(self.columns)}

    def frame(self, columns: dict[str, np.ndarray]):
        """The DataFrame the model predicts on: the signature's columns, in order."""
        import pandas as pd

        return pd.DataFrame({c.name: columns[c.name] for c in self.columns if c.name in columns})
