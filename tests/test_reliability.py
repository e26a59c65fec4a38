"""Bad input and faults against real MLServer processes: every failure is the client's 4xx or a model
that says it is not ready, never a server that stops answering the others.

- bad requests, REST and gRPC, to the routed name (`iris`, runtimes/router.py) and a variant served
  directly (`iris-champion`): each gets a 4xx / INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED
  naming the problem, and the next correct request gets the right prediction;
- hypothesis fuzzes the request body (any JSON, and V2-shaped tensors of random datatypes, shapes
  and data): never a 5xx, the server stays ready;
- a corrupt or deleted artifact for one variant: that model is not ready with a log line naming the
  file, the routed name falls back to the other variants only when the spec says `fallback: true`,
  every other model keeps serving;
- the inference worker killed under load: MLServer restarts it and requests succeed again.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import signal
import sqlite3
import struct
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import Server, children, in_registry, mlops, mlserver_process, scrape
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3], [5.9, 3.0, 5.1, 1.8]])
ROUTED, DIRECT = "iris", "iris-champion"
MODELS = (ROUTED, DIRECT)
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
CLIENT_STATUS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


# --- clients -------------------------------------------------------------------------------------


def post(srv: Server, path: str, body, timeout: float = 120) -> tuple[int, str]:
    """Raw HTTP, so a body can be anything; dicts are sent as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", srv.http, timeout=timeout)
    with closing(conn):
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")


def get_status(srv: Server, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http, timeout=10)
    with closing(conn):
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status


def tensor(X, **overrides) -> dict:
    X = np.asarray(X, dtype=np.float64)
    return {"inputs": [{"name": "input-0", "shape": list(X.shape), "datatype": "FP64", "data": X.reshape(-1).tolist(), **overrides}]}


_stubs: dict[int, pb_grpc.GRPCInferenceServiceStub] = {}


def stub(srv: Server) -> pb_grpc.GRPCInferenceServiceStub:
    """Raw gRPC, so a request can be anything; one channel per server."""
    if srv.grpc not in _stubs:
        _stubs[srv.grpc] = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{srv.grpc}", options=UNLIMITED))
    return _stubs[srv.grpc]


def grpc_request(model: str, X=ROWS, datatype="FP64", shape=None, version="", raw: bytes | None = None, **contents):
    X = np.asarray(X, dtype=np.float64)
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    t = req.inputs.add(name="input-0", datatype=datatype)
    t.shape.extend(list(X.shape) if shape is None else shape)
    if raw is not None:
        req.raw_input_contents.append(raw)
    elif contents:
        for field, values in contents.items():
            getattr(t.contents, field).extend(values)
    else:
        t.contents.fp64_contents.extend(X.reshape(-1).tolist())
    return req


def grpc_call(srv: Server, req) -> tuple[grpc.StatusCode, str]:
    try:
        stub(srv).ModelInfer(req, timeout=120)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


# --- the right answers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expected(trained) -> dict[str, list[int]]:
    """Labels the registered iris models give ROWS, by variant name, computed by scikit-learn here."""
    variants = json.loads((trained / "model-settings/iris/model-settings.json").read_text())["parameters"]["extra"]["variants"]
    code = (
        "import json, mlflow.sklearn, numpy as np\n"
        f"rows = np.array({ROWS.tolist()})\n"
        f"print(json.dumps({{v: mlflow.sklearn.load_model(client.get_model_version_download_uri('iris', n)).predict(rows).tolist() "
        f"for v, n in {[(v['name'], v['version']) for v in variants]}}}))"
    )
    return json.loads(in_registry(trained, code))


def labels_rest(srv: Server, model: str) -> tuple[str | None, list[int]]:
    status, text = post(srv, f"/v2/models/{model}/infer", tensor(ROWS))
    assert status == 200, f"{model}: {status} {text}"
    body = json.loads(text)
    return (body.get("parameters") or {}).get("variant"), body["outputs"][0]["data"]


def assert_serves(srv: Server, expected: dict, protocol: str = "rest") -> None:
    """Ready, and both names answer a correct request with the right labels."""
    assert get_status(srv, "/v2/health/ready") == 200
    if protocol == "rest":
        variant, got = labels_rest(srv, ROUTED)
        assert got == expected[variant]
        assert labels_rest(srv, DIRECT)[1] == expected["champion"]
        return
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc}")
    for model in MODELS:
        inp = grpcclient.InferInput("input-0", list(ROWS.shape), "FP64")
        inp.set_data_from_numpy(ROWS)
        result = client.infer(model, [inp])
        params = result.get_response(as_json=True).get("parameters", {})
        variant = params["variant"]["string_param"] if model == ROUTED else "champion"
        assert result.as_numpy("predict").reshape(-1).tolist() == expected[variant], model


# --- bad input -----------------------------------------------------------------------------------

GOOD = json.dumps(tensor(ROWS[:1]))
BAD_REST = {
    # case: (body, status, what the message must say)
    "malformed JSON": (b'{"inputs": [', 422, "JSON decode error"),
    "a JSON list, not an object": (b"[1, 2, 3]", 422, "valid dictionary"),
    "no inputs field": ({}, 422, '"loc":["body","inputs"],"msg":"Field required"'),
    "no input tensor": ({"inputs": []}, 400, "expected exactly one input tensor of rows x features, got 0"),
    "two input tensors": ({"inputs": tensor(ROWS)["inputs"] * 2}, 400, "expected exactly one input tensor of rows x features, got 2"),
    "missing data": ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64"}]}, 422, '"loc":["body","inputs",0,"data"],"msg":"Field required"'),
    "unknown datatype": (tensor(ROWS, datatype="FP99"), 422, "Input should be 'BOOL'"),
    "strings": (tensor(ROWS[:1], datatype="BYTES", data=["a", "b", "c", "d"]), 400, "has datatype 'BYTES'; this model takes numbers"),
    "strings as FP64": (tensor(ROWS[:1], data=["a", "b", "c", "d"]), 400, "could not convert string to float"),
    "3 features": (tensor(ROWS[:, :3]), 400, "has 3 features per row, the model expects 4"),
    "3-d shape": (tensor(ROWS[:1], shape=[1, 2, 2]), 400, "must have shape [rows, features], got [1, 2, 2]"),
    "shape and data disagree": (tensor(ROWS[:1], shape=[2, 4]), 400, "cannot reshape array of size 4 into shape (2,4)"),
    "negative dimension": (tensor(ROWS[:1], shape=[-1, 4]), 400, "negative dimension in shape [-1, 4]"),
    "no rows": (tensor(np.zeros((0, 4))), 400, "has no rows"),
    "NaN (not JSON)": (GOOD.replace("5.1", "NaN").encode(), 422, "JSON decode error"),
    "Infinity (not JSON)": (GOOD.replace("5.1", "-Infinity").encode(), 422, "JSON decode error"),
    "1e999": (GOOD.replace("5.1", "1e999").encode(), 422, "number is infinity"),
    "null": (tensor(ROWS, data=[None, *ROWS.reshape(-1)[1:]]), 400, "contains NaN or Inf (null over REST), first in row 0"),
    "beyond float32": (tensor([[1e300, 1, 1, 1]]), 400, "has a value beyond ±3.403e+38"),
    "unknown output": ({**tensor(ROWS), "outputs": [{"name": "proba"}]}, 400, "unknown output 'proba'; this model offers predict, predict_proba"),
}


@pytest.mark.parametrize("model", MODELS)
def test_bad_rest_requests_get_4xx_naming_the_problem_and_the_server_keeps_answering(server, expected, model):
    for case, (body, status, message) in BAD_REST.items():
        got, text = post(server, f"/v2/models/{model}/infer", body)
        assert (got, message in text) == (status, True), f"{case}: {got} {text}"
        assert_serves(server, expected)


BAD_GRPC = {
    "NaN": (grpc_request("m", [[math.nan, 1, 2, 3]]), "contains NaN or Inf"),
    "Inf": (grpc_request("m", [[1, 2, 3, -math.inf]]), "contains NaN or Inf"),
    "strings": (grpc_request("m", datatype="BYTES", shape=[1, 4], bytes_contents=[b"a", b"b", b"c", b"d"]), "has datatype 'BYTES'"),
    "unknown datatype": (grpc_request("m", datatype="FP99"), "has datatype 'FP99'"),
    "3 features": (grpc_request("m", ROWS[:, :3]), "has 3 features per row, the model expects 4"),
    "shape and data disagree": (grpc_request("m", ROWS[:1], shape=[2, 4]), "cannot reshape array of size 4 into shape (2,4)"),
    "raw contents too short": (grpc_request("m", shape=[1, 4], raw=struct.pack("<3d", 1, 2, 3)), "malformed tensor contents"),
    "raw contents of an unknown datatype": (grpc_request("m", datatype="FP99", shape=[1, 4], raw=bytes(32)), "malformed tensor contents"),
    "no rows": (grpc_request("m", np.zeros((0, 4))), "has no rows"),
}


@pytest.mark.parametrize("model", MODELS)
def test_bad_grpc_requests_get_invalid_argument_naming_the_problem(server, expected, model):
    for case, (req, message) in BAD_GRPC.items():
        req.model_name = model
        code, details = grpc_call(server, req)
        assert (code, message in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), f"{case}: {code} {details}"
        assert_serves(server, expected, "grpc")


def test_unknown_model_version_or_variant_is_not_found(server, expected):
    for path, message in [
        ("/v2/models/nosuch/infer", "Model nosuch not found"),
        ("/v2/models/iris-nosuch/infer", "Model iris-nosuch not found"),  # a variant the spec does not have
        ("/v2/models/iris-champion/versions/999/infer", "Model iris-champion with version 999 not found"),
        ("/v2/models/iris/versions/1/infer", "Model iris with version 1 not found"),  # the routed name has no version
    ]:
        assert post(server, path, tensor(ROWS)) == (404, json.dumps({"error": message}, separators=(",", ":")))
    for model, version in [("nosuch", ""), ("iris-nosuch", ""), ("iris-champion", "999")]:
        code, details = grpc_call(server, grpc_request(model, version=version))
        assert code == grpc.StatusCode.NOT_FOUND and f"Model {model}" in details and "not found" in details
    assert_serves(server, expected)


@pytest.mark.parametrize("model", MODELS)
def test_50_mb_payload_is_refused_as_too_large(server, expected, model):
    """Limits: 1,000,000 values per request in the runtime (REST: 413), 16 MiB per gRPC message."""
    X = np.random.default_rng(0).uniform(0, 8, (650_000, 4))
    body = json.dumps(tensor(X)).encode()
    assert len(body) > 50e6
    status, text = post(server, f"/v2/models/{model}/infer", body)
    assert status == 413, text
    assert "request too large: input 'input-0' has shape [650000, 4], 2,600,000 values" in text
    assert "at most 1,000,000 values per request" in text
    assert_serves(server, expected)

    X = np.tile(X, (3, 1))
    req = grpc_request(model, shape=list(X.shape), raw=X.tobytes())
    assert req.ByteSize() > 50e6
    code, details = grpc_call(server, req)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Received message larger than max" in details, details
    # Under the message limit but over the runtime's: the same status, the runtime's reason.
    code, details = grpc_call(server, grpc_request(model, shape=[300_000, 4], raw=X[:300_000].tobytes()))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "request too large" in details, details
    assert_serves(server, expected, "grpc")


# --- fuzz ----------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "fp64", ""]
dims = st.integers(-2, 6) | st.sampled_from([0, 10**6, 2**31, 2**63 - 1])
numbers = st.integers(-(2**70), 2**70) | st.floats(width=64) | st.booleans() | st.none() | st.text(max_size=4)
tensors = st.fixed_dictionaries(
    {
        "name": st.text(max_size=8),
        "shape": st.lists(dims, max_size=4),
        "datatype": st.sampled_from(DATATYPES),
        "data": st.recursive(numbers, lambda c: st.lists(c, max_size=6), max_leaves=24),
    },
    optional={"parameters": st.dictionaries(st.sampled_from(["content_type", "x"]), st.sampled_from(["np", "pd", "str", "base64", 1, None]))},
)
v2_bodies = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3)},
    optional={
        "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["predict", "predict_proba", "", "x"])}), max_size=3),
        "parameters": st.dictionaries(st.sampled_from(["routing_key", "content_type", "headers"]), json_values, max_size=2),
        "id": json_values,
    },
)


@st.composite
def near_valid(draw) -> dict:
    """Near misses of a valid request: 0 to 3 rows of 3 to 5 numbers (the models take 4), any numeric datatype, any float."""
    rows, features = draw(st.integers(0, 3)), draw(st.sampled_from([4, 4, 3, 5]))
    numbers = st.floats(-1e6, 1e6) if draw(st.booleans()) else st.floats(-1e6, 1e6) | st.floats()
    data = draw(st.lists(numbers, min_size=rows * features, max_size=rows * features))
    tensor = {"name": "input-0", "shape": [rows, features], "datatype": draw(st.sampled_from(DATATYPES[:12])), "data": data}
    return {"inputs": [tensor], "outputs": [{"name": o} for o in draw(st.lists(st.sampled_from(["predict", "predict_proba"]), max_size=2))]}


FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(model=st.sampled_from(MODELS), body=st.one_of(json_values, v2_bodies, near_valid(), near_valid()))
def test_fuzzed_rest_body_is_never_a_server_error(server, model, body):
    status, text = post(server, f"/v2/models/{model}/infer", json.dumps(body, allow_nan=True).encode())
    event(f"HTTP {status}")  # pytest --hypothesis-show-statistics shows the spread
    assert status < 500, f"{status} {text}"
    assert get_status(server, "/v2/health/ready") == 200


@FUZZ
@given(
    model=st.sampled_from(MODELS),
    datatype=st.sampled_from(DATATYPES),
    shape=st.lists(dims, max_size=3) | st.sampled_from([[1, 4], [3, 4], [2, 2], [4]]),
    contents=st.sampled_from(["fp64_contents", "fp32_contents", "int64_contents", "int_contents", "uint_contents", "bool_contents", "raw"]),
    floats=st.lists(st.floats(-100, 100, width=32) | st.floats(width=32), min_size=4, max_size=12),
    ints=st.lists(st.integers(0, 2**31 - 1), min_size=4, max_size=12),
    raw=st.binary(max_size=64),
)
def test_fuzzed_grpc_tensor_is_never_a_server_error(server, model, datatype, shape, contents, floats, ints, raw):
    req = pb.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="input-0", datatype=datatype)
    t.shape.extend(shape)
    if contents == "raw":
        req.raw_input_contents.append(raw)
    elif contents.startswith("fp"):
        getattr(t.contents, contents).extend(floats)
    else:
        getattr(t.contents, contents).extend([bool(i % 2) for i in ints] if contents == "bool_contents" else ints)
    code, details = grpc_call(server, req)
    event(code.name)
    assert code == grpc.StatusCode.OK or code in CLIENT_STATUS, f"{code} {details}"
    assert stub(server).ServerReady(pb.ServerReadyRequest(), timeout=10).ready


@pytest.mark.parametrize("model", MODELS)
def test_half_precision_near_its_limit_is_answered(server, model):
    """Found by the fuzzing: FP16 input that scikit-learn computed in, and overflowed (500)."""
    status, text = post(server, f"/v2/models/{model}/infer", tensor([[0, 0, 0, 50257]], datatype="FP16"))
    assert status == 200, text


def test_server_answers_correctly_after_the_fuzzing(server, expected):
    assert_serves(server, expected)
    assert_serves(server, expected, "grpc")


# --- faults: a broken artifact -------------------------------------------------------------------


def own_artifact(project: Path, trained: Path, model: str, version: str) -> Path:
    """Point the private registry copy's model version at the project's own copy of its artifact.

    The copied registry still names the shared trained project's artifact files; breaking those
    would break every other test, so the test breaks its own copy instead.
    """
    with closing(sqlite3.connect(project / ".mlops/mlflow.db")) as con, con:
        (location,) = con.execute("SELECT storage_location FROM model_versions WHERE name=? AND version=?", (model, int(version))).fetchone()
        own = location.replace(trained.resolve().as_uri(), project.resolve().as_uri())
        assert own != location, location
        con.execute("UPDATE model_versions SET storage_location=? WHERE name=? AND version=?", (own, model, int(version)))
    return Path(url2pathname(urlparse(own).path)) / "model.skops"


def sample(samples, name, **labels) -> float | None:
    want = set(labels.items())
    values = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    return sum(values) if values else None


def wait_loaded(srv: Server, ready: set[str], broken: set[str], timeout: float = 180) -> None:
    """Until every model in `ready` is ready and every one in `broken` has failed its load."""

    def loaded() -> bool:
        try:
            samples = scrape(srv)
            return all(get_status(srv, f"/v2/models/{m}/ready") == 200 for m in ready) and all(
                sample(samples, "mlops_model_loads_total", model=m, outcome="error") for m in broken
            )
        except OSError:
            return False

    srv.wait_until(loaded, timeout, f"models not loaded after {timeout}s")


@pytest.fixture(scope="module", params=[0, 1], ids=["models-in-main-process", "parallel-worker"])
def broken(trained, tmp_path_factory, request):
    """A server whose iris and diabetes challengers have broken artifacts: iris's skops file is
    truncated, diabetes's deleted; the spec sets `fallback: true` on diabetes only. Once with the
    models in MLServer's main process, once in a parallel worker, where readiness is reported differently."""
    import shutil

    project = tmp_path_factory.mktemp("broken") / "project"
    shutil.copytree(trained, project, symlinks=True)
    spec = project / "deployments.yaml"
    spec.write_text(spec.read_text().replace("  diabetes:\n", "  diabetes:\n    fallback: true\n"))
    mlops(project, "sync", check=True)
    path = project / "model-settings/settings.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "parallel_workers": request.param}))
    settings = lambda name: json.loads((project / "model-settings" / name / "model-settings.json").read_text())  # noqa: E731
    assert settings("diabetes")["parameters"]["extra"]["fallback"] is True
    assert "fallback" not in settings("iris")["parameters"]["extra"]
    versions = {m: settings(f"{m}-challenger")["parameters"]["version"] for m in ("iris", "diabetes")}
    truncated = own_artifact(project, trained, "iris", versions["iris"])
    truncated.write_bytes(truncated.read_bytes()[:100])
    deleted = own_artifact(project, trained, "diabetes", versions["diabetes"])
    deleted.unlink()
    srv = Server(project)
    try:
        wait_loaded(
            srv,
            ready={"diabetes", "diabetes-champion", "iris-champion", "wine", "wine-champion", "wine-challenger"},
            broken={"iris", "iris-challenger", "diabetes-challenger"},
        )
        yield srv, versions, truncated, deleted
    finally:
        srv.stop()


def test_broken_variant_is_not_ready_and_every_other_model_keeps_serving(broken, expected):
    srv, versions, truncated, _ = broken
    uri = f"models:/iris/{versions['iris']}"
    for model in ("iris", "iris-challenger", "diabetes-challenger"):
        assert get_status(srv, f"/v2/models/{model}/ready") == 400, model
        assert stub(srv).ModelReady(pb.ModelReadyRequest(name=model), timeout=10).ready is False
        status, text = post(srv, f"/v2/models/{model}/infer", tensor(ROWS))
        assert (status, f"Model {model} is not ready" in text) == (400, True), text
    assert get_status(srv, "/v2/health/live") == 200
    assert get_status(srv, "/v2/health/ready") == 400, "the server is ready only when all its models are"
    assert stub(srv).ServerReady(pb.ServerReadyRequest(), timeout=10).ready is False

    assert labels_rest(srv, "iris-champion")[1] == expected["champion"]
    for model, n in (("wine", 13), ("wine-champion", 13), ("diabetes-champion", 10)):
        status, text = post(srv, f"/v2/models/{model}/infer", tensor(np.ones((2, n))))
        assert status == 200, f"{model}: {text}"

    log = srv.output()
    # The bytes differ from the sha256 recorded at registration, so the runtime refuses them before skops reads them.
    changed = f"refusing a model whose files changed since registration: {truncated}: sha256 "
    assert re.search(
        rf"ERROR - model 'iris' failed to load and stays not ready: router 'iris': live variant 'challenger' \({uri}\) "
        rf"failed to load: {re.escape(changed)}[0-9a-f]{{64}} differs from the [0-9a-f]{{64}} recorded at registration",
        log,
    ), log
    assert f"ERROR - model 'iris-challenger' failed to load and stays not ready: {changed}" in log
    samples = scrape(srv)
    assert sample(samples, "mlops_model_ready", model="iris") == 0
    assert sample(samples, "mlops_model_ready", model="iris-champion") == 1
    assert sample(samples, "mlops_router_variant_available", model="iris", variant="challenger") == 0


def test_fallback_serves_from_the_remaining_variants_and_says_so(broken):
    srv, versions, _, deleted = broken
    uri = f"models:/diabetes/{versions['diabetes']}"
    X = np.random.default_rng(1).normal(0, 0.05, (3, 10))
    reference = json.loads(post(srv, "/v2/models/diabetes-champion/infer", tensor(X))[1])["outputs"][0]["data"]
    for key in (f"user-{i}" for i in range(40)):  # keys spread over all buckets, the challenger's too
        status, text = post(srv, "/v2/models/diabetes/infer", {**tensor(X), "parameters": {"routing_key": key}})
        body = json.loads(text)
        assert status == 200 and body["parameters"]["variant"] == "champion", text
        np.testing.assert_allclose(body["outputs"][0]["data"], reference, rtol=1e-12)

    log = srv.output()
    assert (
        f"router diabetes: live variant challenger ({uri}) not loaded, its weight goes to the other live variants (fallback): "
        f"refusing a model whose files changed since registration: {deleted}: missing (recorded sha256 "
    ) in log
    assert "router diabetes: serving from champion=100% only, challenger failed to load (fallback)" in log
    samples = scrape(srv)
    assert sample(samples, "mlops_router_variant_available", model="diabetes", variant="challenger") == 0
    assert sample(samples, "mlops_router_variant_available", model="diabetes", variant="champion") == 1
    assert sample(samples, "mlops_router_variant_weight", model="diabetes", variant="champion") == 100
    assert sample(samples, "mlops_router_variant_weight", model="diabetes", variant="challenger") == 0
    assert sample(samples, "mlops_router_requests_total", model="diabetes", variant="challenger", role="live", outcome="load_error") == 1
    assert sample(samples, "mlops_model_ready", model="diabetes") == 1


def test_repaired_artifact_is_served_after_a_reload(broken, trained, expected):
    """Loading the model again (what `mlops sync --reload` does) once its artifact is fixed makes it ready."""
    srv, versions, truncated, _ = broken
    shared = Path(str(truncated).replace(str(srv.project.resolve()), str(trained.resolve()), 1))
    truncated.write_bytes(shared.read_bytes())
    for model in ("iris-challenger", "iris"):
        assert post(srv, f"/v2/repository/models/{model}/load", b"") == (200, "")
        assert get_status(srv, f"/v2/models/{model}/ready") == 200
    assert labels_rest(srv, "iris-challenger")[1] == expected["challenger"]
    variant, labels = labels_rest(srv, "iris")
    assert labels == expected[variant]
    samples = scrape(srv)
    assert sample(samples, "mlops_router_variant_available", model="iris", variant="challenger") == 1


# --- faults: the inference worker killed ---------------------------------------------------------


def inference_workers(srv: Server) -> list[int]:
    mlserver = mlserver_process(srv)
    return [pid for pid, cmd in children(mlserver) if "multiprocessing.spawn" in cmd]


@pytest.fixture
def iris_only(project):
    """A server of iris alone (router and variants), so a restarted worker has little to reload;
    parallel_workers 1 whatever sync writes, so there is a worker process to kill."""
    import shutil

    settings_dir = project / "model-settings"
    for d in settings_dir.iterdir():
        if d.is_dir() and not d.name.startswith("iris"):
            shutil.rmtree(d)
    path = settings_dir / "settings.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "parallel_workers": 1}))
    srv = Server(project)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_killed_worker_is_restarted_and_requests_succeed_again(iris_only, expected):
    srv = iris_only
    (worker,) = inference_workers(srv)
    outcomes: list[tuple[float, str]] = []  # (time, "ok" or the error)
    stop = threading.Event()

    def rest():
        while not stop.is_set():
            try:
                status, text = post(srv, "/v2/models/iris/infer", tensor(ROWS[:1]), timeout=30)
                outcome = "ok" if status == 200 else f"REST {status} {text}"
            except OSError as exc:
                outcome = f"REST {exc!r}"
            outcomes.append((time.monotonic(), outcome))
            if outcome != "ok":
                time.sleep(0.02)  # a failing client keeps trying, without starving the server of CPU

    def grpc_load():
        client = stub(srv)
        while not stop.is_set():
            try:
                client.ModelInfer(grpc_request("iris", ROWS[:1]), timeout=30)
                outcomes.append((time.monotonic(), "ok"))
            except grpc.RpcError as exc:
                outcomes.append((time.monotonic(), f"gRPC {exc.code().name} {exc.details()}"))
                time.sleep(0.02)

    threads = [threading.Thread(target=f) for f in (rest, rest, grpc_load, grpc_load)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        killed_at = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        deadline = killed_at + 120
        recovered_at = None
        while recovered_at is None and time.monotonic() < deadline:
            time.sleep(0.2)
            after = [(t, o) for t, o in outcomes if t > killed_at]
            failed = [t for t, o in after if o != "ok"]
            if failed and any(o == "ok" and t > failed[-1] for t, o in after):
                recovered_at = next(t for t, o in after if o == "ok" and t > failed[-1])
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    errors = Counter(re.sub(r"exit code -?\d+", "exit code N", o)[:160] for t, o in outcomes if o != "ok")
    failed_at = [t for t, o in outcomes if o != "ok"]
    print(
        f"\nworker {worker} killed under load: {len(failed_at)} of {len(outcomes)} requests failed"
        + (f" over {failed_at[-1] - failed_at[0]:.1f} s" if failed_at else "")
        + (f"; requests succeed again {recovered_at - killed_at:.1f} s after the kill" if recovered_at else "; no recovery")
    )
    for error, n in errors.most_common():
        print(f"  {n:6d}  {error}")
    assert recovered_at is not None, f"no successful request within 120 s of the kill:\n{srv.output()[-3000:]}"
    assert [o for t, o in outcomes if t > recovered_at + 0.5 and o != "ok"] == [], "requests failed after the recovery"
    assert inference_workers(srv) not in ([], [worker])
    assert_serves(srv, expected)
    assert_serves(srv, expected, "grpc")
    # Requests the dead worker held fail as such; the rest of the outage says a worker is restarting.
    allowed = (
        'REST 500 {"error":"Worker process stopped unexpectedly with exit code N."}',
        "gRPC INTERNAL Worker process stopped unexpectedly with exit code N.",
        'REST 503 {"error":"no inference worker is available: MLServer is restarting a worker that stopped',
        "gRPC UNAVAILABLE no inference worker is available: MLServer is restarting a worker that stopped",
    )
    assert all(e.startswith(allowed) for e in errors), errors
