"""The monolith baseline: one FastAPI process, one scikit-learn model loaded from disk, V2-shaped JSON.

What a team writes when it skips a model server; the benchmark measures the
served system against it. `MODEL_DIR` is an MLflow model folder (MLmodel + skops file).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import skops.io as sio
import yaml
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class InferRequest(BaseModel):
    inputs: list[Tensor]


def load(model_dir: Path):
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["sklearn"]
    return sio.load(model_dir / flavor["pickled_model"], trusted=flavor.get("skops_trusted_types") or [])


app = FastAPI()
model = load(Path(os.environ["MODEL_DIR"]))


@app.post("/v2/models/{name}/infer")
def infer(name: str, request: InferRequest) -> dict:
    tensor = request.inputs[0]
    try:
        X = np.asarray(tensor.data, dtype=np.float64).reshape(tensor.shape)
    except ValueError as exc:
        raise HTTPException(400, f"input '{tensor.name}': {exc}") from None
    y = model.predict(X)
    return {
        "model_name": name,
        "outputs": [{"name": "predict", "shape": list(y.shape), "datatype": "INT64", "data": y.tolist()}],
    }
