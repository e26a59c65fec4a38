"""The registry-native runtime against MLServer's stock runtimes, and the router's bucket arithmetic."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import joblib
import numpy as np
import pytest
from conftest import in_registry
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest, Parameters, RequestInput, RequestOutput
from mlserver_mlflow import MLflowRuntime
from mlserver_sklearn import SKLearnModel

from runtimes.registry_sklearn import RegistrySKLearnRuntime
from runtimes.router import BUCKETS, RouterRuntime, Variant, routing_table
from training.catalog import JOBS


def load(cls, uri, **extra):
    runtime = cls(ModelSettings(name="m", implementation=cls, parameters=ModelParameters(uri=uri, extra=extra)))
    asyncio.run(runtime.load())
    return runtime


def request(X, outputs=()):
    return InferenceRequest(
        inputs=[RequestInput(name="input-0", shape=list(X.shape), datatype="FP64", data=X.reshape(-1).tolist())],
        outputs=[RequestOutput(name=o) for o in outputs] or None,
    )


def output(response, name=None):
    out = response.outputs[0] if name is None else next(o for o in response.outputs if o.name == name)
    return np.asarray(out.data.root).reshape(out.shape)


@pytest.mark.parametrize("model", ["iris", "diabetes"])
def test_predictions_equal_the_stock_runtimes(trained, tmp_path, model):
    """Same rows, same answers as mlserver_mlflow (pyfunc) and, for probabilities, mlserver_sklearn."""
    artifact = in_registry(trained, f"print(client.get_model_version_download_uri('{model}', '1'))")
    X = np.asarray(JOBS[model].load(return_X_y=True)[0][::5], dtype=np.float64)

    fast = load(RegistrySKLearnRuntime, artifact)
    stock = load(MLflowRuntime, artifact)
    ours = asyncio.run(fast.predict(request(X)))
    theirs = asyncio.run(stock.predict(request(X)))
    np.testing.assert_array_equal(output(ours).reshape(-1), output(theirs).reshape(-1))
    assert output(ours).dtype.kind == ("i" if model == "iris" else "f")

    if JOBS[model].task == "classification":
        joblib.dump(fast._model, tmp_path / "model.joblib")
        sk = load(SKLearnModel, str(tmp_path / "model.joblib"))
        ours = asyncio.run(fast.predict(request(X, ["predict", "predict_proba"])))
        theirs = asyncio.run(sk.predict(request(X, ["predict", "predict_proba"])))
        for name in ("predict", "predict_proba"):
            np.testing.assert_array_equal(output(ours, name), output(theirs, name))
        assert output(ours, "predict_proba").shape == (len(X), 3)


def router(weights: dict[str, int]) -> RouterRuntime:
    """A router over live variants that loaded with these weights: the table `load` builds, without models."""
    r = RouterRuntime(ModelSettings(name="r", implementation=RouterRuntime, parameters=ModelParameters(extra={})))
    r._table = routing_table([Variant(name, "1", w, False, model=None) for name, w in weights.items()])
    return r


def test_moving_weight_moves_only_the_moved_keys():
    keys = [f"k{i}" for i in range(20_000)]
    old, new = router({"a": 80, "b": 20}), router({"a": 70, "b": 30})
    before = {k: old.choose(k).name for k in keys}
    after = {k: new.choose(k).name for k in keys}
    moved = Counter((before[k], after[k]) for k in keys if before[k] != after[k])
    assert set(moved) == {("a", "b")}
    assert abs(moved[("a", "b")] / len(keys) - 0.10) < 0.01
    assert abs(sum(v == "a" for v in before.values()) / len(keys) - 0.80) < 0.01


def test_a_failed_variants_weight_goes_to_the_others_in_proportion():
    """With fallback, a live variant that failed to load is left out of the table (here b, weight 30 of 100):
    every bucket still belongs to a variant, in spec order, and a and c split them 50:20."""
    r = router({"a": 50, "c": 20})
    assert [v.name for _, v in r._table] == ["a", "c"] and r._table[-1][0] == BUCKETS
    n = 20_000
    chosen = Counter(r.choose(f"k{i}").name for i in range(n))
    assert abs(chosen["a"] / n - 50 / 70) < 0.01 and abs(chosen["c"] / n - 20 / 70) < 0.01, chosen


def test_router_answers_with_the_variant_and_its_version(trained):
    settings = json.loads((trained / "model-settings/iris/model-settings.json").read_text())
    for v in settings["parameters"]["extra"]["variants"]:
        v["uri"] = in_registry(trained, f"print(client.get_model_version_download_uri('iris', '{v['version']}'))")
    r = RouterRuntime(ModelSettings(name="iris", implementation=RouterRuntime, parameters=ModelParameters(**settings["parameters"])))
    asyncio.run(r.load())
    X = np.array([[5.9, 3.0, 5.1, 1.8]])
    req = request(X)
    req.parameters = Parameters(routing_key="user-42")
    first = asyncio.run(r.predict(req))
    versions = {v["name"]: v["version"] for v in settings["parameters"]["extra"]["variants"]}
    assert first.model_name == "iris"
    assert first.model_version == versions[first.parameters.variant]
    assert all(asyncio.run(r.predict(req)).parameters.variant == first.parameters.variant for _ in range(10))
