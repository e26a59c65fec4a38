"""Every served model answers over V2 REST and gRPC exactly as its scikit-learn model does."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.sklearn
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from mlops.domain.registry import default_registry
from mlops.supervise.processes import wait_until
from training.catalog import JOBS


def served(project):
    """The variants; routers (tests/test_router.py) answer with one of them."""
    settings = [json.loads(p.read_text()) for p in sorted((project / "model-settings").glob("*/model-settings.json"))]
    return [s for s in settings if "variants" not in (s.get("parameters") or {}).get("extra", {})]


def reference(project, settings):
    """The registered model itself, loaded by MLflow in this process, and rows from its data set."""
    extra = settings["parameters"]["extra"]
    client = default_registry(project).client()
    model = mlflow.sklearn.load_model(client.get_model_version_download_uri(extra["registered_model"], settings["parameters"]["version"]))
    X, _ = JOBS[extra["registered_model"]].load(return_X_y=True)
    return model, np.asarray(X[::7][:20], dtype=np.float64)


def infer(client, mod, name, X, outputs):
    """MLServer speaks plain V2 JSON over REST, not Triton's binary-tensor extension: binary_data=False."""
    inp = mod.InferInput("input-0", list(X.shape), "FP64")
    if mod is httpclient:
        inp.set_data_from_numpy(X, binary_data=False)
        requested = [mod.InferRequestedOutput(o, binary_data=False) for o in outputs]
    else:
        inp.set_data_from_numpy(X)
        requested = [mod.InferRequestedOutput(o) for o in outputs]
    result = client.infer(name, [inp], outputs=requested)
    return result, {o: result.as_numpy(o) for o in outputs}


PROTOCOLS = {
    "rest": (httpclient, lambda srv: httpclient.InferenceServerClient(srv.url)),
    "grpc": (grpcclient, lambda srv: grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc}")),
}


def test_every_variant_of_the_spec_is_served(server, trained):
    names = {s["name"] for s in served(trained)}
    assert names == {"iris-champion", "iris-challenger", "wine-champion", "wine-challenger", "diabetes-champion", "diabetes-challenger"}
    client = httpclient.InferenceServerClient(server.url)
    for name in names:
        assert client.is_model_ready(name)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_answers_equal_the_sklearn_model(server, trained, protocol):
    mod, make = PROTOCOLS[protocol]
    client = make(server)
    for settings in served(trained):
        model, X = reference(trained, settings)
        classifier = hasattr(model, "predict_proba")
        outputs = ["predict", "predict_proba"] if classifier else ["predict"]
        result, got = infer(client, mod, settings["name"], X, outputs)
        np.testing.assert_array_equal(got["predict"].reshape(-1), model.predict(X))
        if classifier:
            np.testing.assert_allclose(got["predict_proba"], model.predict_proba(X), rtol=0, atol=1e-12)
        response = result.get_response()
        version = response["model_version"] if isinstance(response, dict) else response.model_version
        assert version == settings["parameters"]["version"]


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_bad_request_is_a_client_error_naming_the_problem(server, protocol):
    mod, make = PROTOCOLS[protocol]
    client = make(server)
    with pytest.raises(InferenceServerException) as exc:
        infer(client, mod, "iris-champion", np.zeros((1, 3)), ["predict"])
    assert "3 features per row, the model expects 4" in str(exc.value)
    with pytest.raises(InferenceServerException) as exc:
        infer(client, mod, "diabetes-champion", np.zeros((1, 10)), ["predict_proba"])
    assert "predict_proba" in str(exc.value) and "regressor" in str(exc.value)


def _listening(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at `port`, from /proc/net/tcp{,6} (hex, as the kernel writes them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                found.add(address)
    return found


def test_mlops_serve_listens_on_loopback_only_unless_told(server):
    """A laptop on a shared network serves nobody else by default; the banner says so."""
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1 and ::ffff:127.0.0.1 (gRPC's), as the kernel writes them
    for port in (server.http, server.grpc, server.metrics):
        assert _listening(port) and _listening(port) <= loopback, (port, _listening(port))
    # The banner follows readiness: it first reads each model's input example.
    wait_until(lambda: "MLServer is ready" in server.output(), 60, [server.proc], interval=0.2)
    assert "Listening on 127.0.0.1 only" in server.output(), server.output()[-2000:]


def test_inference_takes_the_short_roads_to_mlservers_data_plane(server):
    """The serving entry point (runtimes/server.py) puts both edges in front of MLServer; each says so at start-up.
    That they answer as MLServer does is tests/in_process/test_rest_fast_path.py's and test_grpc_fast_path.py's."""
    log = server.output()
    assert "REST inference fast path on for POST /v2/models/*/infer" in log, log[-2000:]
    assert "gRPC inference fast path on for inference.GRPCInferenceService/ModelInfer" in log, log[-2000:]
