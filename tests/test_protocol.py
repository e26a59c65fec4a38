"""Open Inference Protocol conformance, as a client developer meets it: tritonclient with its defaults.

Against every served name (routed and variants), over REST with binary tensor data on (tritonclient's
default) and off, and over gRPC: metadata that a request can be built from, readiness, inference
with a request id, requested outputs, and errors.
"""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import REPO
from tritonclient.utils import InferenceServerException

MODELS = ["iris", "iris-champion", "iris-challenger", "wine", "wine-champion", "diabetes", "diabetes-champion"]


def _rows(meta_inputs, rows: int = 2) -> np.ndarray:
    (inp,) = meta_inputs
    width = inp["shape"][-1] if isinstance(inp, dict) else inp.shape[-1]
    return np.random.default_rng(0).random((rows, width))


@pytest.mark.parametrize("name", MODELS)
def test_metadata_describes_what_a_request_needs(server, name):
    rest = httpclient.InferenceServerClient(server.url)
    meta = rest.get_model_metadata(name)
    (inp,) = meta["inputs"]
    assert inp["name"] == "input-0" and inp["datatype"] == "FP64" and inp["shape"][0] == -1 and inp["shape"][1] > 0
    assert meta["outputs"][0]["name"] == "predict"
    assert meta["platform"] == "sklearn" and meta["versions"]
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    gmeta = grpc.get_model_metadata(name)
    assert [(i.name, i.datatype, list(i.shape)) for i in gmeta.inputs] == [(inp["name"], inp["datatype"], inp["shape"])]
    assert [o.name for o in gmeta.outputs] == [o["name"] for o in meta["outputs"]]


def test_routed_name_lists_its_variants_with_weights(server):
    params = httpclient.InferenceServerClient(server.url).get_model_metadata("iris")["parameters"]
    spec = (REPO / "deployments.yaml").read_text()
    assert params["variants"] == "champion,challenger" and "champion:   {alias: champion, weight: 80}" in spec
    assert (params["weight.champion"], params["weight.challenger"]) == (80, 20)
    assert params["version.champion"] != params["version.challenger"]


def test_server_metadata_advertises_binary_tensor_data(server):
    with urllib.request.urlopen(f"http://{server.url}/v2", timeout=10) as r:
        assert "binary_tensor_data" in json.load(r)["extensions"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("name", MODELS)
def test_rest_inference_with_tritonclient(server, name, binary):
    client = httpclient.InferenceServerClient(server.url)
    meta = client.get_model_metadata(name)
    assert client.is_model_ready(name)
    X = _rows(meta["inputs"])
    inp = httpclient.InferInput("input-0", list(X.shape), "FP64")
    inp.set_data_from_numpy(X, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(o["name"], binary_data=binary) for o in meta["outputs"]]
    sticky = {"x-routing-key": "client-1"}  # a routed name answers both calls from the same variant
    result = client.infer(name, [inp], outputs=outputs, request_id=f"{name}-{binary}", headers=sticky)
    assert result.get_response()["id"] == f"{name}-{binary}"
    for out in meta["outputs"]:
        assert result.as_numpy(out["name"]).shape[0] == 2, out
    default = client.infer(name, [inp], headers=sticky)  # no outputs named: tritonclient asks for every output in binary
    assert default.as_numpy("predict").reshape(-1).tolist() == result.as_numpy("predict").reshape(-1).tolist()


@pytest.mark.parametrize("name", MODELS)
def test_grpc_inference_with_tritonclient(server, name):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    meta = client.get_model_metadata(name)
    assert client.is_model_ready(name)
    X = np.random.default_rng(0).random((2, meta.inputs[0].shape[-1]))
    inp = grpcclient.InferInput("input-0", list(X.shape), "FP64")
    inp.set_data_from_numpy(X)
    result = client.infer(name, [inp], outputs=[grpcclient.InferRequestedOutput(o.name) for o in meta.outputs], request_id=f"{name}-grpc")
    assert result.get_response().id == f"{name}-grpc"
    assert result.as_numpy("predict").shape[0] == 2


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_errors_are_client_errors_saying_what_is_wrong(server, binary):
    rest = httpclient.InferenceServerClient(server.url)
    inp = httpclient.InferInput("input-0", [1, 3], "FP64")
    inp.set_data_from_numpy(np.zeros((1, 3)), binary_data=binary)
    with pytest.raises(InferenceServerException) as err:
        rest.infer("iris", [inp])
    assert err.value.status() == "400" and "3 features per row, the model expects 4" in err.value.message()
    with pytest.raises(InferenceServerException, match="predict_proba"):
        ok = httpclient.InferInput("input-0", [1, 10], "FP64")
        ok.set_data_from_numpy(np.zeros((1, 10)), binary_data=binary)
        rest.infer("diabetes", [ok], outputs=[httpclient.InferRequestedOutput("predict_proba", binary_data=binary)])
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    ginp = grpcclient.InferInput("input-0", [1, 3], "FP64")
    ginp.set_data_from_numpy(np.zeros((1, 3)))
    with pytest.raises(InferenceServerException) as err:
        grpc.infer("iris", [ginp])
    assert "INVALID_ARGUMENT" in str(err.value.status()) and "features per row" in err.value.message()


def test_json_without_content_type_is_read_as_json(server):
    """curl -d without -H 'Content-Type: application/json' sends a form type."""
    body = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
    req = urllib.request.Request(f"http://{server.url}/v2/models/iris/infer", data=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.load(r)["outputs"][0]["name"] == "predict"
