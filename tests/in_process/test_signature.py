"""Requests decoded against a column-based MLflow signature: what each column accepts and refuses."""

from __future__ import annotations

import numpy as np
import pytest
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest

from runtimes.signature import Column, ColumnDecoder, column_metadata, parse_columns

SIGNATURE = {
    "signature": {
        "inputs": '[{"type": "double", "name": "a", "required": true}, {"type": "long", "name": "n", "required": true},'
        ' {"type": "boolean", "name": "flag", "required": true}, {"type": "datetime", "name": "at", "required": true},'
        ' {"type": "string", "name": "s", "required": false}]'
    }
}
GOOD = {"a": ("a", "FP64", [1], [1.0]), "n": ("n", "INT64", [1], [1]), "flag": ("flag", "BOOL", [1], [True]), "at": ("at", "BYTES", [1], ["2026-01-01"])}


def request(*inputs) -> InferenceRequest:
    return InferenceRequest.model_validate({"inputs": [dict(zip(("name", "datatype", "shape", "data"), i, strict=True)) for i in inputs]})


@pytest.fixture
def decoder() -> ColumnDecoder:
    return ColumnDecoder(parse_columns(SIGNATURE), max_values=100)


def test_columns_map_to_v2_datatypes_as_mlserver_mlflow_does():
    meta = column_metadata(parse_columns(SIGNATURE))
    assert [(m.name, m.datatype, m.shape) for m in meta] == [
        ("a", "FP64", [-1, 1]), ("n", "INT64", [-1, 1]), ("flag", "BOOL", [-1, 1]), ("at", "BYTES", [-1, 1]), ("s", "BYTES", [-1, 1])
    ]  # fmt: skip
    assert parse_columns({"signature": {"inputs": '[{"type": "tensor", "tensor-spec": {"dtype": "float64", "shape": [-1, 4]}}]'}}) is None


def test_each_column_becomes_a_typed_array_and_the_frame_keeps_signature_order(decoder):
    cols = decoder.decode(request(
        ("s", "BYTES", [2], ["x", "y"]), ("at", "BYTES", [2], ["2026-01-01T00:00:00", "2026-06-01T12:00:00"]),
        ("flag", "BOOL", [2, 1], [True, False]), ("n", "INT64", [2], [1, 2]), ("a", "INT32", [2], [1, 2]),
    ))  # fmt: skip
    frame = decoder.frame(cols)
    assert list(frame.columns) == ["a", "n", "flag", "at", "s"]
    assert [str(t) for t in frame.dtypes][:4] == ["float64", "int64", "bool", "datetime64[ns]"]
    assert str(frame.dtypes.iloc[4]) in ("object", "str")  # pandas 3 gives strings their own dtype
    assert frame["s"].tolist() == ["x", "y"] and frame["a"].tolist() == [1.0, 2.0]


def test_optional_column_may_be_left_out(decoder):
    assert "s" not in decoder.decode(request(*GOOD.values()))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n": None, "flag": None}, "missing input(s) 'n' INT64 (long), 'flag' BOOL (boolean)"),
        ({"n": ("n", "FP64", [1], [1.5])}, "input 'n' has datatype FP64; the model expects INT64 (long), whole numbers"),
        ({"at": ("at", "BYTES", [1], ["yesterday"])}, "input 'at'"),
        ({"a": ("a", "FP64", [1, 2], [1.0, 2.0])}, "input 'a' has shape [1, 2]; a column is [rows] or [rows, 1]"),
        ({"a": ("a", "FP64", [1], [None])}, "input 'a' contains NaN"),
        ({"z": ("z", "FP64", [1], [1.0])}, "unknown input(s) 'z'"),
    ],
    ids=["missing", "float-for-long", "bad-datetime", "wide-column", "null", "extra"],
)
def test_bad_columns_name_the_input(decoder, changes, message):
    inputs = {**GOOD, **changes}
    with pytest.raises(InferenceError) as err:
        decoder.decode(request(*(i for i in inputs.values() if i is not None)))
    assert message in str(err.value)


def test_one_row_major_tensor_when_every_column_is_numeric():
    decoder = ColumnDecoder([Column("x", "double"), Column("y", "float"), Column("k", "long")], max_values=100)
    cols = decoder.decode(request(("input-0", "FP64", [2, 3], [1, 2, 3, 4, 5, 6])))
    assert cols["x"].tolist() == [1.0, 4.0] and cols["y"].dtype == np.float32 and cols["k"].tolist() == [3, 6]
    with pytest.raises(InferenceError, match="has 2 values per row; the model takes 3 columns"):
        decoder.decode(request(("input-0", "FP64", [1, 2], [1, 2])))
