"""The cluster path as Seldon Core 1.18.2 and Istio run it: clients call the public name through the ingress.

The pods are real MLServer processes started exactly as the operator leaves the generated containers
(tests/cluster_pods.py), behind a stand-in for Istio's ingress gateway and Seldon's executor
(tests/cluster_standin.py); everything is derived from the committed manifests of the dev
environment. Clients are tritonclient, as a client developer would call the cluster.
"""

from __future__ import annotations

import math
import re
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from mlops import cluster as model
from mlops.spec import load_spec
from conftest import REPO

Z_999 = 3.2905  # two-sided 99.9% normal quantile
ROW = {"iris": [5.1, 3.5, 1.4, 0.2], "wine": [13.2, 1.78, 2.14, 11.2, 100.0, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050.0]}


def _weights(name: str) -> dict[str, int]:
    return load_spec(REPO / "deployments.yaml").models[name].weights("dev")


def _versions(cluster, name: str) -> dict[str, str]:
    return {p.predictor.name: p.labels["mlops/model-version"] for p in cluster.pods_of(name)}


def _rest_infer(url: str, name: str) -> dict:
    client = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("input-0", [1, len(ROW[name])], "FP64")
    inp.set_data_from_numpy(np.array([ROW[name]]), binary_data=False)
    return client.infer(name, [inp]).get_response()


def _grpc_infer(cluster, name: str):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{cluster.grpc}")
    inp = grpcclient.InferInput("input-0", [1, len(ROW[name])], "FP64")
    inp.set_data_from_numpy(np.array([ROW[name]]))
    return client.infer(name, [inp], headers=cluster.grpc_headers(name)).get_response()


def _within_bound(counts: Counter, weights: dict[str, int]) -> list[str]:
    n = sum(counts.values())
    problems = []
    for variant, w in weights.items():
        p = w / 100
        if abs(counts[variant] - n * p) > Z_999 * math.sqrt(n * p * (1 - p)):
            problems.append(f"{variant}: {counts[variant]} of {n}, expected {n * p:.0f} ± {Z_999 * math.sqrt(n * p * (1 - p)):.0f}")
    return problems


def test_public_name_over_rest_is_answered_by_every_variant_by_weight(cluster):
    """Every request for `iris` through the ingress is answered, naming its variant and registry version."""
    versions = _versions(cluster, "iris")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _rest_infer(cluster.rest_url("iris"), "iris"), range(1200)))
    counts = Counter(a["parameters"]["variant"] for a in answers)
    assert set(counts) <= set(versions), counts
    assert all(a["model_name"] == "iris" and a["model_version"] == versions[a["parameters"]["variant"]] for a in answers)
    assert not _within_bound(counts, _weights("iris"))


def test_public_name_over_grpc_is_answered_by_every_variant_by_weight(cluster):
    versions = _versions(cluster, "iris")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _grpc_infer(cluster, "iris"), range(800)))
    counts = Counter(a.parameters["variant"].string_param for a in answers)
    assert set(counts) <= set(versions), counts
    assert all(a.model_name == "iris" and a.model_version == versions[a.parameters["variant"].string_param] for a in answers)
    assert not _within_bound(counts, _weights("iris"))


def _metric(pod, name: str) -> float:
    port, path = model.served_metrics(pod.container, {}, model.server_settings(REPO))
    with urllib.request.urlopen(f"http://{pod.ip}:{port}{path}", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf'^{name}\{{[^}}]*model="{pod.deployment}"[^}}]*\}} (\S+)$', text, re.M))


def test_shadow_pod_receives_a_copy_of_every_request(cluster):
    (shadow,) = [p for p in cluster.pods_of("wine") if p.predictor.shadow]
    (live,) = [p for p in cluster.pods_of("wine") if not p.predictor.shadow]
    before = _metric(shadow, "model_infer_request_success_total"), _metric(live, "model_infer_request_success_total")
    answers = [_rest_infer(cluster.rest_url("wine"), "wine") for _ in range(30)]
    answers += [_grpc_infer(cluster, "wine") for _ in range(30)]
    assert {a["parameters"]["variant"] for a in answers[:30]} | {a.parameters["variant"].string_param for a in answers[30:]} == {live.predictor.name}
    deadline = time.monotonic() + 30
    while True:  # Istio sends the mirrored copy without waiting for it: it may land after the live answer
        after = _metric(shadow, "model_infer_request_success_total"), _metric(live, "model_infer_request_success_total")
        if after[0] - before[0] >= 60 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (after[0] - before[0], after[1] - before[1]) == (60, 60)


def test_readiness_and_metadata_answer_for_the_public_name(cluster):
    base = f"http://{cluster.rest_url('iris')}"
    for path in ("/v2/models/iris/ready", "/v2/health/ready"):
        with urllib.request.urlopen(base + path, timeout=10) as r:
            assert r.status == 200, path
    rest = httpclient.InferenceServerClient(cluster.rest_url("iris"))
    assert rest.is_model_ready("iris")
    assert rest.get_model_metadata("iris")["name"] == "iris"
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{cluster.grpc}")
    headers = cluster.grpc_headers("iris")
    assert grpc.is_model_ready("iris", headers=headers)
    assert grpc.get_model_metadata("iris", headers=headers).name == "iris"


def test_only_the_public_name_is_served_in_the_cluster(cluster):
    """A variant's local name is no model in any pod: the executor finds no such graph node, MLServer no such model."""
    rest = httpclient.InferenceServerClient(cluster.rest_url("iris"))
    with pytest.raises(InferenceServerException, match="Failed to find model iris-champion"):
        rest.get_model_metadata("iris-champion")
    inp = httpclient.InferInput("input-0", [1, 4], "FP64")
    inp.set_data_from_numpy(np.array([ROW["iris"]]), binary_data=False)
    with pytest.raises(InferenceServerException, match="iris-champion"):
        rest.infer("iris-champion", [inp])


def test_pods_serve_metrics_where_the_podmonitor_scrapes(cluster):
    """The port the PodMonitor names, looked up in each pod, is where that pod's MLServer serves metrics."""
    (endpoint,) = yaml.safe_load((REPO / "clusters/base/monitoring/podmonitor-mlserver.yaml").read_text())["spec"]["podMetricsEndpoints"]
    for pod in cluster.pods:
        port = pod.container.ports[endpoint["port"]]
        with urllib.request.urlopen(f"http://{pod.ip}:{port}{endpoint['path']}", timeout=10) as r:
            assert "model_infer_request_success_total" in r.read().decode(), pod.predictor.name


def test_pods_serve_the_public_name_with_the_env_the_operator_leaves(cluster):
    """The operator's MLSERVER_METRICS_ENDPOINT says /prometheus; the image's settings.json wins with /metrics."""
    for pod in cluster.pods:
        env = pod.container.environment({})
        assert env["MLSERVER_MODEL_NAME"] == pod.deployment
        assert env["MLSERVER_METRICS_ENDPOINT"] == "/prometheus"
        with urllib.request.urlopen(f"http://{pod.address('http')}/v2/models/{pod.deployment}", timeout=10) as r:
            assert r.status == 200


def test_tritonclient_defaults_work_through_the_executor(cluster):
    """Binary inputs pass the executor as they are; outputs come back as JSON, since it would drop the binary header."""
    client = httpclient.InferenceServerClient(cluster.rest_url("iris"))
    inp = httpclient.InferInput("input-0", [2, 4], "FP64")
    inp.set_data_from_numpy(np.array([ROW["iris"], [6.7, 3.0, 5.2, 2.3]]))  # binary_data=True, tritonclient's default
    result = client.infer("iris", [inp], outputs=[httpclient.InferRequestedOutput("predict"), httpclient.InferRequestedOutput("predict_proba")])
    assert result.as_numpy("predict").reshape(-1).tolist() == [0, 2]
    assert result.as_numpy("predict_proba").shape == (2, 3)
