"""Feedback: outcomes per variant, through both forms, counted exactly and refused with the field named."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from conftest import in_registry
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.rest.app import create_app
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest, Parameters
from prometheus_client import REGISTRY
from test_rest_fast_path import JSON, call

from runtimes import contract, rest
from runtimes.registry_sklearn import RegistrySKLearnRuntime
from runtimes.router import RouterRuntime


def settings_of(trained, name: str) -> ModelSettings:
    """A served model's generated settings, its registry URIs made local, served as `fb-<name>` (the data plane is shared)."""
    data = json.loads((trained / "model-settings" / name / "model-settings.json").read_text())
    params = data["parameters"]
    for v in params.get("extra", {}).get("variants", []):
        v["uri"] = in_registry(trained, f"print(client.get_model_version_download_uri('{name}', '{v['version']}'))")
    if "uri" in params:
        model, version = params["uri"].removeprefix("models:/").split("/")
        params["uri"] = in_registry(trained, f"print(client.get_model_version_download_uri('{model}', '{version}'))")
    cls = RouterRuntime if data["implementation"] == contract.ROUTER else RegistrySKLearnRuntime
    return ModelSettings(name=f"fb-{name}", implementation=cls, parameters=ModelParameters(**params))


@pytest.fixture(scope="module")
def edge(trained, mlserver_data_plane):
    """The REST edge over a data plane serving the routed iris and diabetes, and wine's shadow variant (as fb-<name>)."""
    settings, data_plane, registry = mlserver_data_plane

    async def load():
        for name in ("iris", "diabetes", "wine-challenger"):
            await registry.load(settings_of(trained, name))

    asyncio.run(load())
    return rest.Edge(create_app(settings, data_plane, None)), registry


def feedback_series() -> dict[tuple, float]:
    names = {f"{contract.FEEDBACK}_total", f"{contract.FEEDBACK_ABS_ERROR}_sum", f"{contract.FEEDBACK_SQUARED_ERROR}_sum"}
    return {(s.name, *sorted(s.labels.items())): s.value for metric in REGISTRY.collect() for s in metric.samples if s.name in names}


def delta(before: dict) -> dict:
    after = feedback_series()
    return {k: round(v - before.get(k, 0), 9) for k, v in after.items() if v != before.get(k, 0)}


def post(app, model: str, body) -> tuple[int, dict]:
    status, _, raw = call(app, f"/v2/models/{model}/feedback", body if isinstance(body, bytes) else json.dumps(body).encode(), JSON, raw_body=True)
    return status, json.loads(raw)


def test_a_classifiers_outcomes_are_counted_for_the_variant_named(edge):
    app, _ = edge
    before = feedback_series()
    status, content = post(app, "fb-iris", {"variant": "challenger", "prediction": [0, 1, 2, 2], "truth": [0, 1, 1, 2], "id": "req-7"})
    assert (status, content) == (200, {"recorded": 4, "id": "req-7"})
    total = f"{contract.FEEDBACK}_total"
    assert delta(before) == {
        (total, ("model", "fb-iris"), ("outcome", "correct"), ("variant", "challenger")): 3,
        (total, ("model", "fb-iris"), ("outcome", "incorrect"), ("variant", "challenger")): 1,
    }


def test_a_regressors_errors_are_summed(edge):
    app, _ = edge
    before = feedback_series()
    status, content = post(app, "fb-diabetes", {"variant": "champion", "prediction": [100.0, 150.5], "truth": [110, 150]})
    assert (status, content) == (200, {"recorded": 2})
    labels = (("model", "fb-diabetes"), ("variant", "champion"))
    assert delta(before) == {
        (f"{contract.FEEDBACK}_total", ("model", "fb-diabetes"), ("outcome", "scored"), ("variant", "champion")): 2,
        (f"{contract.FEEDBACK_ABS_ERROR}_sum", *labels): 10.5,
        (f"{contract.FEEDBACK_SQUARED_ERROR}_sum", *labels): 100.25,
    }


@pytest.mark.parametrize(
    ("model", "body", "status", "message"),
    [
        ("nope", {"variant": "champion", "prediction": [1], "truth": [1]}, 404, "Model nope not found"),
        (
            "fb-iris",
            {"variant": "blue", "prediction": [1], "truth": [1]},
            404,
            "variant: 'blue' is not a live variant of model 'fb-iris' (live: champion, challenger)",
        ),
        ("fb-iris", {"variant": "champion", "prediction": [1, 2], "truth": [1]}, 400, "equal length (got 2 and 1)"),
        (
            "fb-iris",
            {"variant": "champion", "prediction": [1, 7], "truth": [1, 1]},
            400,
            "prediction[1]: 7 is not a class of model 'fb-iris' (classes: 0, 1, 2)",
        ),
        ("fb-iris", {"variant": "champion", "prediction": [1], "truth": [True]}, 400, "truth[0]: True is not a number or a class label"),
        ("fb-iris", {"variant": "champion", "prediction": [], "truth": []}, 400, "prediction: List should have at least 1 item"),
        ("fb-iris", {"variant": "champion", "prediction": [1], "truth": [1], "weight": 3}, 400, "weight: Extra inputs are not permitted"),
        ("fb-iris", {"prediction": [1], "truth": [1]}, 400, "variant: Field required"),
        ("fb-iris", b"variant=champion", 400, "the body is not JSON"),
        ("fb-diabetes", {"variant": "champion", "prediction": ["x"], "truth": [1.0]}, 400, "prediction[0]: 'x' is not a finite number"),
        ("fb-wine-challenger", {"variant": "challenger", "prediction": [1], "truth": [1]}, 404, "is a shadow"),
    ],
    ids=[
        "unknown model",
        "unknown variant",
        "lengths",
        "not a class",
        "a bool",
        "empty",
        "unknown field",
        "no variant",
        "not JSON",
        "not a number",
        "a shadow",
    ],
)
def test_bad_feedback_is_refused_naming_the_field_and_records_nothing(edge, model, body, status, message):
    app, _ = edge
    before = feedback_series()
    got, content = post(app, model, body)
    assert got == status and message in content["error"], content
    assert delta(before) == {}


def inference_form(variant: str, prediction, truth, **parameters) -> InferenceRequest:
    return InferenceRequest(
        id="fb-1",
        parameters=Parameters(feedback=True, **parameters),
        inputs=[
            StringCodec.encode_input("variant", [variant]),
            NumpyCodec.encode_input("prediction", np.asarray(prediction)),
            NumpyCodec.encode_input("truth", np.asarray(truth)),
        ],
    )


def test_the_inference_form_records_the_same_and_routes_nothing(edge):
    """The form Seldon's executor passes: no variant answers it, no router metric moves."""
    _, registry = edge
    iris = asyncio.run(registry.get_model("fb-iris"))
    before, routed = feedback_series(), [s.value for m in REGISTRY.collect() if m.name == contract.ROUTER_REQUESTS for s in m.samples]
    answer = asyncio.run(iris.predict(inference_form("champion", [0, 1, 2], [0, 1, 2])))
    assert answer.id == "fb-1" and answer.outputs[0].name == "recorded" and answer.outputs[0].data.root == [3]
    assert delta(before) == {(f"{contract.FEEDBACK}_total", ("model", "fb-iris"), ("outcome", "correct"), ("variant", "champion")): 3}
    assert [s.value for m in REGISTRY.collect() if m.name == contract.ROUTER_REQUESTS for s in m.samples] == routed
    with pytest.raises(Exception, match="variant: 'blue' is not a live variant"):
        asyncio.run(iris.predict(inference_form("blue", [0], [0])))


def test_a_shadow_answers_a_mirrored_copy_and_counts_nothing(edge):
    """Istio mirrors every request to a shadow's pod: feedback must not be counted twice."""
    _, registry = edge
    shadow = asyncio.run(registry.get_model("fb-wine-challenger"))
    before = feedback_series()
    answer = asyncio.run(shadow.predict(inference_form("champion", [0], [0])))
    assert answer.outputs[0].data.root == [0] and delta(before) == {}
