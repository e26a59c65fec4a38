"""REST inference on the fast path answers as MLServer's full stack does, request for request."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import in_registry
from echo import Echo
from mlserver.handlers import ModelRepositoryHandlers
from mlserver.repository import SchemalessModelRepository
from mlserver.rest.app import create_app
from mlserver.settings import ModelParameters, ModelSettings, Settings
from prometheus_client import REGISTRY

from runtimes import rest
from runtimes.registry_sklearn import RegistrySKLearnRuntime

IRIS_ROW = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}
JSON = [(b"content-type", b"application/json")]
SERVER_SETTINGS = Path(__file__).parents[2] / "model-settings" / "settings.json"  # as served


def call(app, path, body: bytes, headers=JSON, method="POST", raw_body=False):
    """One ASGI request, the way uvicorn makes it: (status, headers without date/ids, JSON or text body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent, chunks = (
        [],
        [
            {"type": "http.request", "body": body[: len(body) // 2], "more_body": True},
            {"type": "http.request", "body": body[len(body) // 2 :], "more_body": False},
        ],
    )

    async def receive():
        return chunks.pop(0) if chunks else await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    async def run():
        try:
            await app(scope, receive, send)
        except RuntimeError as exc:  # uvicorn answers 500 for an exception that escapes the app
            return 500, {}, str(exc)
        start = next(m for m in sent if m["type"] == "http.response.start")
        raw = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        hdrs = {k.decode(): v.decode() for k, v in start["headers"] if k not in (b"ce-id", b"ce-requestid")}
        if raw_body:
            return start["status"], hdrs, raw
        try:
            content = json.loads(raw)
            content.pop("id", None)
        except ValueError:
            content = raw.decode()
        return start["status"], hdrs, content

    return asyncio.run(run())


@pytest.fixture(scope="module")
def apps(trained, mlserver_data_plane):
    """Two MLServer REST apps over one data plane: the fast path on, and off."""
    uri = in_registry(trained, "print(client.get_model_version_download_uri('iris', '1'))")
    settings, data_plane, registry = mlserver_data_plane

    async def load():
        await registry.load(ModelSettings(name="echo", implementation=Echo))
        await registry.load(ModelSettings(name="iris", implementation=RegistrySKLearnRuntime, parameters=ModelParameters(uri=uri, version="1")))

    asyncio.run(load())
    handlers = ModelRepositoryHandlers(repository=SchemalessModelRepository(""), model_registry=registry)
    full = create_app(settings, data_plane, handlers)  # MLServer's app, as `mlserver start` serves it
    fast = rest.Edge(create_app(settings, data_plane, handlers))  # as runtimes/server.py serves it
    assert fast.fast
    return full, fast


CASES = {
    "prediction": ("/v2/models/iris/infer", json.dumps(IRIS_ROW).encode(), JSON),
    "versioned path": ("/v2/models/iris/versions/1/infer", json.dumps(IRIS_ROW).encode(), JSON),
    "probabilities, own id": ("/v2/models/iris/infer", json.dumps({**IRIS_ROW, "id": "abc", "outputs": [{"name": "predict_proba"}]}).encode(), JSON),
    "headers both ways": ("/v2/models/echo/infer", json.dumps(IRIS_ROW).encode(), [*JSON, (b"x-test", b"first"), (b"x-test", b"second")]),
    "no content type": ("/v2/models/iris/infer", json.dumps(IRIS_ROW).encode(), []),
    "+json content type": ("/v2/models/iris/infer", json.dumps(IRIS_ROW).encode(), [(b"content-type", b"application/vnd.v2+json; charset=utf-8")]),
    "unknown model": ("/v2/models/nope/infer", json.dumps(IRIS_ROW).encode(), JSON),
    "unknown version": ("/v2/models/iris/versions/9/infer", json.dumps(IRIS_ROW).encode(), JSON),
    "bad tensor": ("/v2/models/iris/infer", json.dumps({"inputs": [{**IRIS_ROW["inputs"][0], "data": [1, 2, 3]}]}).encode(), JSON),
    "model refuses": ("/v2/models/echo/infer", json.dumps(IRIS_ROW).encode(), [*JSON, (b"x-fail", b"why")]),
    "malformed JSON": ("/v2/models/iris/infer", b'{"inputs": [', JSON),
    "NaN, not JSON": ("/v2/models/iris/infer", json.dumps(IRIS_ROW).replace("5.1", "NaN").encode(), JSON),
    "1e999": ("/v2/models/iris/infer", json.dumps(IRIS_ROW).replace("5.1", "1e999").encode(), JSON),
    "not a request": ("/v2/models/iris/infer", b'{"inputs": 3}', JSON),
    "empty body": ("/v2/models/iris/infer", b"", JSON),
    "text+json content type": ("/v2/models/iris/infer", json.dumps(IRIS_ROW).encode(), [(b"content-type", b"text/x+json")]),
}


def rest_requests() -> dict[tuple, float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for metric in REGISTRY.collect()
        if metric.name == "rest_server_requests"
        for s in metric.samples
        if s.name == "rest_server_requests_total"
    }


def delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


@pytest.mark.parametrize("case", CASES)
def test_fast_path_answers_and_counts_as_mlserver_does(apps, case, monkeypatch):
    full, fast = apps
    taken = []
    monkeypatch.setattr(rest.Counted, "observe", lambda self, *a, _o=rest.Counted.observe: (taken.append(a), _o(self, *a)))
    path, body, headers = CASES[case]

    before = rest_requests()
    expected = call(full, path, body, headers)
    counted_full = delta(before, rest_requests())
    before = rest_requests()
    got = call(fast, path, body, headers)
    counted_fast = delta(before, rest_requests())

    assert got == expected
    assert counted_fast == counted_full and sum(counted_fast.values()) == 1
    fast_path_answers = case not in ("malformed JSON", "NaN, not JSON", "1e999", "not a request", "empty body", "text+json content type")
    assert bool(taken) == fast_path_answers, "the fast path must answer what it can parse and hand the rest to MLServer"


def test_a_bug_in_a_model_is_a_500_counted_as_one(apps):
    full, fast = apps
    for app in (full, fast):
        before = rest_requests()
        status, _, _ = call(app, "/v2/models/echo/infer", json.dumps(IRIS_ROW).encode(), [*JSON, (b"x-crash", b"1")])
        assert status == 500
        assert [(dict(k)["status_code"], v) for k, v in delta(before, rest_requests()).items()] == [("500", 1)]


def test_middleware_the_fast_path_does_not_reproduce_keeps_the_full_stack(apps, monkeypatch):
    """MLServer's defaults turn GZip on: then every request takes MLServer's own road, and so it does when switched off."""
    _, fast = apps
    gzipped = rest.Edge(create_app(Settings(gzip_enabled=True), fast._data_plane, None))
    monkeypatch.setenv(rest.SWITCH, "0")
    switched_off = rest.Edge(create_app(Settings(), fast._data_plane, None))
    for app in (gzipped, switched_off):
        assert not app.fast
        status, _, content = call(app, "/v2/models/iris/infer", json.dumps(IRIS_ROW).encode())
        assert status == 200 and content["outputs"][0]["data"] == [0]


def test_the_edge_is_the_app_for_everything_but_inference(apps):
    """MLServer adds custom handlers' routes to the app instance it built: through the Edge they reach it."""
    _, fast = apps
    assert fast.routes is fast.app.routes and fast.router is fast.app.router
    assert call(fast, "/v2/health/ready", b"", method="GET")[0] == 200


FORM = [(b"content-type", b"application/x-www-form-urlencoded")]  # curl -d without -H 'Content-Type: application/json'


def test_json_sent_as_a_form_is_read_as_json_or_refused_with_the_header_to_set(apps):
    """MLServer alone answers FastAPI's 422 about dictionaries; V2 JSON is what such a body always is."""
    full, fast = apps
    assert call(fast, "/v2/models/iris/infer", json.dumps(IRIS_ROW).encode(), FORM) == call(full, "/v2/models/iris/infer", json.dumps(IRIS_ROW).encode())
    status, _, content = call(fast, "/v2/models/iris/infer", b"inputs=5.1,3.5", FORM)
    assert status == 400 and "send it with Content-Type: application/json" in content["error"]
    assert call(full, "/v2/models/iris/infer", b"inputs=5.1,3.5", FORM)[0] == 422


def _binary(inputs, outputs=None, request_id=""):
    """A request body as tritonclient builds it with its defaults (binary inputs and outputs)."""
    from tritonclient.http._utils import _get_inference_request

    body, json_size = _get_inference_request(inputs, request_id, outputs, 0, False, False, 0, None, None)
    return body, [(b"inference-header-content-length", str(json_size).encode())] if json_size else []


def test_binary_tensor_data_in_and_out(apps):
    """tritonclient's defaults: binary inputs, binary outputs unless an output says otherwise, the id echoed."""
    import numpy as np
    import tritonclient.http as httpclient

    _, fast = apps
    inp = httpclient.InferInput("input-0", [2, 4], "FP64")
    inp.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]))
    outputs = [httpclient.InferRequestedOutput("predict"), httpclient.InferRequestedOutput("predict_proba", binary_data=False)]
    body, headers = _binary([inp], outputs, "r-1")
    assert headers, "tritonclient sends binary inputs by default"
    status, got_headers, raw = call(fast, "/v2/models/iris/infer", body, headers, raw_body=True)
    assert status == 200, raw
    length = int(got_headers["inference-header-content-length"])
    head = json.loads(raw[:length])
    predict, proba = head["outputs"]
    assert head["id"] == "r-1" and "data" not in predict and predict["parameters"]["binary_data_size"] == 16
    assert np.frombuffer(raw[length:], dtype="<i8").tolist() == [0, 2]
    assert len(proba["data"]) == 6 and len(raw) == length + 16  # 2 rows x 3 classes, in JSON


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (lambda b, n: (b[:-3], n), "does not fit"),
        (lambda b, n: (b + b"xx", n), "2 bytes after the last binary input"),
        (lambda b, n: (b, b"9999"), "the body has"),
    ],
    ids=["short", "trailing", "header past the end"],
)
def test_binary_data_that_does_not_add_up_is_a_400_saying_where(apps, cut, message):
    import numpy as np
    import tritonclient.http as httpclient

    _, fast = apps
    inp = httpclient.InferInput("input-0", [1, 4], "FP64")
    inp.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]]))
    body, ((key, length),) = _binary([inp])
    body, length = cut(body, length)
    status, _, content = call(fast, "/v2/models/iris/infer", body, [(key, length)])
    assert status == 400 and message in content["error"], content


def test_binary_and_form_requests_reach_mlservers_own_stack_as_json(apps):
    """With the short road off (GZip configured), the edge still reads what MLServer cannot and hands it the JSON request."""
    import numpy as np
    import tritonclient.http as httpclient

    full, fast = apps
    slow = rest.Edge(create_app(Settings(gzip_enabled=True), fast._data_plane, None))
    assert not slow.fast
    inp = httpclient.InferInput("input-0", [2, 4], "FP64")
    inp.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]))
    body, headers = _binary([inp], [httpclient.InferRequestedOutput("predict")], "r-2")
    status, got_headers, content = call(slow, "/v2/models/iris/infer", body, headers)
    assert status == 200 and "inference-header-content-length" not in got_headers, content
    assert content["outputs"][0]["data"] == [0, 2]  # in JSON, which tritonclient reads too
    row = json.dumps(IRIS_ROW).encode()
    assert call(slow, "/v2/models/iris/infer", row, FORM) == call(full, "/v2/models/iris/infer", row)
    status, _, content = call(slow, "/v2/models/iris/infer", body[:-3], headers)
    assert status == 400 and "does not fit" in content["error"], content
