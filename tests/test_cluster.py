"""The cluster path as Seldon Core 1.18.2 and Istio run it: clients call the public name through the ingress.

The pods are real MLServer processes started exactly as the operator leaves the generated containers
(tests/cluster_pods.py), behind a stand-in for Istio's ingress gateway and Seldon's executor
(tests/cluster_standin.py); everything is derived from the committed manifests of the dev
environment. Clients are tritonclient, as a client developer would call the cluster.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from cluster_pods import feedback_inputs
from conftest import REPO
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from mlops.check import cluster as model
from mlops.domain.spec import load_spec
from runtimes.contract import FEEDBACK

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


def test_tritonclient_needs_json_tensors_through_the_executor(cluster):
    """The executor parses every REST body as JSON before forwarding it (api/rest/kfserving.go 16-20), so
    tritonclient's default binary tensor data gets its 500 (SeldonIO/seldon-core#3969); JSON tensors pass, and
    outputs come back as JSON whatever the request asks, since the executor would drop the binary header."""
    client = httpclient.InferenceServerClient(cluster.rest_url("iris"))
    rows = np.array([ROW["iris"], [6.7, 3.0, 5.2, 2.3]])
    outputs = [httpclient.InferRequestedOutput("predict"), httpclient.InferRequestedOutput("predict_proba")]  # binary_data=True
    binary = httpclient.InferInput("input-0", [2, 4], "FP64")
    binary.set_data_from_numpy(rows)  # binary_data=True, tritonclient's default
    with pytest.raises(InferenceServerException, match="after top-level value") as err:
        client.infer("iris", [binary], outputs=outputs)
    assert err.value.status() == "500"
    inp = httpclient.InferInput("input-0", [2, 4], "FP64")
    inp.set_data_from_numpy(rows, binary_data=False)
    result = client.infer("iris", [inp], outputs=outputs)
    assert result.as_numpy("predict").reshape(-1).tolist() == [0, 2]
    assert result.as_numpy("predict_proba").shape == (2, 3)


# --- feedback: ground truth for a variant's predictions, through the executor ----------------------


def _feedback_counts(pod) -> Counter:
    """mlops_feedback_total of one pod by (variant, outcome), as the pod exposes it."""
    port, path = model.served_metrics(pod.container, {}, model.server_settings(REPO))
    with urllib.request.urlopen(f"http://{pod.ip}:{port}{path}", timeout=10) as r:
        text = r.read().decode()
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{FEEDBACK}_total":
                counts[sample.labels["variant"], sample.labels["outcome"]] += sample.value
    return counts


def _send_feedback(cluster, name: str, variant: str, prediction: list, truth: list, grpc: bool) -> int:
    """Feedback as an inference request to the public name through the ingress; the number the pod recorded."""
    if grpc:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{cluster.grpc}")
        inputs = feedback_inputs(grpcclient, variant, prediction, truth)
        answer = client.infer(name, inputs, parameters={"feedback": True}, headers=cluster.grpc_headers(name))
    else:
        client = httpclient.InferenceServerClient(cluster.rest_url(name))
        answer = client.infer(name, feedback_inputs(httpclient, variant, prediction, truth), parameters={"feedback": True})
    return int(answer.as_numpy("recorded").reshape(-1)[0])


def _outcomes(variant: str, prediction: list, truth: list) -> Counter:
    correct = sum(p == t for p, t in zip(prediction, truth, strict=True))
    return Counter({(variant, "correct"): correct, (variant, "incorrect"): len(truth) - correct})


def test_feedback_through_the_executor_is_recorded_for_the_variant_it_names(cluster):
    """Over REST and gRPC, whichever pod Istio picks records the outcomes under the variant the feedback names:
    the pods' counts together grow by exactly what was sent (the request parameter `feedback` passes the executor)."""
    pods = cluster.pods_of("iris")
    before = {p.predictor.name: _feedback_counts(p) for p in pods}
    rng = np.random.default_rng(7)
    sent: Counter = Counter()
    for i in range(48):
        variant = ("champion", "challenger")[i % 2]
        prediction = rng.integers(0, 3, 5).tolist()
        truth = [t if rng.random() < 0.7 else (t + 1) % 3 for t in prediction]
        assert _send_feedback(cluster, "iris", variant, prediction, truth, grpc=i % 4 >= 2) == 5
        sent += _outcomes(variant, prediction, truth)
    grown = {p.predictor.name: _feedback_counts(p) - before[p.predictor.name] for p in pods}
    assert sum(grown.values(), Counter()) == sent
    assert any(v != pod for pod, got in grown.items() for v, _ in got), "some pod recorded feedback for another pod's variant"


def test_shadow_pod_records_no_mirrored_feedback(cluster):
    """Istio mirrors feedback to the shadow's pod too: it answers the copy (recorded 0) and counts nothing."""
    (shadow,) = [p for p in cluster.pods_of("wine") if p.predictor.shadow]
    (live,) = [p for p in cluster.pods_of("wine") if not p.predictor.shadow]
    before = _feedback_counts(shadow), _feedback_counts(live), _metric(shadow, "model_infer_request_success_total")
    sent: Counter = Counter()
    for i in range(20):
        prediction, truth = [0, 1, 2, 1], [0, 1, 1, i % 3]
        assert _send_feedback(cluster, "wine", "champion", prediction, truth, grpc=bool(i % 2)) == 4
        sent += _outcomes("champion", prediction, truth)
    deadline = time.monotonic() + 30
    while _metric(shadow, "model_infer_request_success_total") - before[2] < 20 and time.monotonic() < deadline:
        time.sleep(0.1)  # the mirrored copies land after the live answers
    assert _metric(shadow, "model_infer_request_success_total") - before[2] == 20, "the shadow answered every mirrored copy"
    assert _feedback_counts(shadow) == before[0]
    assert _feedback_counts(live) - before[1] == sent


def test_feedback_for_an_unknown_variant_is_refused_naming_the_variant(cluster):
    pods = cluster.pods_of("iris")
    before = [_feedback_counts(p) for p in pods]
    with pytest.raises(InferenceServerException, match="variant: 'nope' is not a live variant of model 'iris'") as rest:
        _send_feedback(cluster, "iris", "nope", [0], [0], grpc=False)
    assert rest.value.status() == "404"
    with pytest.raises(InferenceServerException, match="variant: 'nope'") as grpc:
        _send_feedback(cluster, "iris", "nope", [0], [0], grpc=True)
    assert grpc.value.status() == "StatusCode.NOT_FOUND"
    assert [_feedback_counts(p) for p in pods] == before


def test_the_feedback_path_is_not_forwarded_by_the_executor(cluster):
    """`POST /v2/models/iris/feedback` is no route of the executor (api/rest/server.go 184-191): gorilla mux's 404,
    though each pod answers it; in a cluster feedback goes as an inference request."""
    body = json.dumps({"variant": "champion", "prediction": [0, 1], "truth": [0, 2]}).encode()
    through = urllib.request.Request(f"http://{cluster.rest_url('iris')}/v2/models/iris/feedback", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(through, timeout=10)
    assert (err.value.code, err.value.read()) == (404, b"404 page not found\n")
    pod = cluster.pods_of("iris")[0]
    direct = urllib.request.Request(f"http://{pod.address('http')}/v2/models/iris/feedback", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(direct, timeout=10) as r:
        assert json.loads(r.read()) == {"recorded": 2}
    # tritonclient's default binary tensors do not pass the executor either
    client = httpclient.InferenceServerClient(cluster.rest_url("iris"))
    inputs = feedback_inputs(httpclient, "champion", [0, 1], [0, 2])
    inputs[1].set_data_from_numpy(np.array([0, 1], dtype=np.int64))  # binary_data=True
    with pytest.raises(InferenceServerException, match="after top-level value"):
        client.infer("iris", inputs, parameters={"feedback": True})


# --- who may call: the ingress's JWT and allow-list policies (stage's, as rendered) ----------------


class Issuer:
    """The identity provider the spec names: a key pair whose public half is the JWKS the gateway gets."""

    def __init__(self, issuer: str, kid: str = "k1"):
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.issuer, self.kid = issuer, kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @property
    def jwks(self) -> dict:
        import jwt

        return {"keys": [{**jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True), "kid": self.kid, "alg": "RS256", "use": "sig"}]}

    def token(self, audience: str, lifetime: float = 300, issuer: str | None = None) -> str:
        import jwt

        now = int(time.time())
        claims = {"iss": issuer or self.issuer, "sub": "client-app", "aud": audience, "iat": now, "exp": now + int(lifetime)}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})


def _denied(call) -> str:
    with pytest.raises(InferenceServerException) as err:
        call()
    return str(err.value)


@pytest.fixture(scope="module")
def stage_ingress(cluster):
    """The pods behind stage's gateway policies; the issuer's keys as istiod would fetch them."""
    from mlops.check.validate import rendered_environments

    jwt_spec = load_spec(REPO / "deployments.yaml").environments["stage"].auth.jwt
    issuer = Issuer(jwt_spec.issuer)
    ingress = cluster.start_standin(rendered_environments(REPO)["stage"], {jwt_spec.issuer: issuer.jwks})
    return ingress, issuer, jwt_spec.audiences[0]


def test_inference_needs_a_token_of_the_issuer_and_health_does_not(cluster, stage_ingress):
    ingress, issuer, audience = stage_ingress
    rest = httpclient.InferenceServerClient(cluster.rest_url("iris", ingress))
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{ingress.grpc}")
    seldon_headers = cluster.grpc_headers("iris")
    inp = httpclient.InferInput("input-0", [1, 4], "FP64")
    inp.set_data_from_numpy(np.array([ROW["iris"]]), binary_data=False)  # the executor takes JSON tensors only
    ginp = grpcclient.InferInput("input-0", [1, 4], "FP64")
    ginp.set_data_from_numpy(np.array([ROW["iris"]]))

    def bearer(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}  # lower-case: gRPC refuses upper-case metadata keys

    # Health and readiness: open, for load balancers and uptime checks.
    assert rest.is_server_ready() and rest.is_model_ready("iris")
    assert grpc.is_model_ready("iris", headers=seldon_headers)
    # No token: the ingress refuses (RBAC), over both transports; so is metadata.
    assert "RBAC: access denied" in _denied(lambda: rest.infer("iris", [inp]))
    assert "RBAC: access denied" in _denied(lambda: rest.get_model_metadata("iris"))
    assert "StatusCode.PERMISSION_DENIED" in _denied(lambda: grpc.infer("iris", [ginp], headers=seldon_headers))
    # A token that fails verification: 401 / UNAUTHENTICATED, whatever the reason.
    stranger = Issuer(issuer.issuer)  # same issuer name, a key the JWKS does not hold
    for token, reason in [
        (issuer.token("another-audience"), "Audiences in Jwt are not allowed"),
        (issuer.token(audience, lifetime=-60), "Jwt is expired"),
        (stranger.token(audience), "Jwt verification fails"),
        (issuer.token(audience, issuer="https://elsewhere.example/"), "Jwt issuer is not configured"),
    ]:
        assert reason in _denied(lambda token=token: rest.infer("iris", [inp], headers=bearer(token))), reason
        assert "StatusCode.UNAUTHENTICATED" in _denied(lambda token=token: grpc.infer("iris", [ginp], headers={**seldon_headers, **bearer(token)}))
    # The issuer's token: answered by a variant, as without the policy.
    good = issuer.token(audience)  # (tritonclient's HTTP client adds its own headers to the dict it is given)
    answer = rest.infer("iris", [inp], headers=bearer(good)).get_response()
    assert answer["model_name"] == "iris" and answer["parameters"]["variant"] in _weights("iris")
    assert grpc.infer("iris", [ginp], headers={**seldon_headers, **bearer(good)}).get_response().model_name == "iris"
    assert rest.get_model_metadata("iris", headers=bearer(good))["name"] == "iris"


def test_allow_list_refuses_a_valid_token_from_elsewhere(cluster, stage_ingress):
    """With `allow_ips`, a token is not enough from an address outside the list; health stays open."""
    from mlops.domain.spec import Auth
    from mlops.render import seldon

    _, issuer, audience = stage_ingress
    stage = load_spec(REPO / "deployments.yaml").environments["stage"]
    jwks = {issuer.issuer: issuer.jwks}
    token = issuer.token(audience)
    inp = httpclient.InferInput("input-0", [1, 4], "FP64")
    inp.set_data_from_numpy(np.array([ROW["iris"]]), binary_data=False)  # the executor takes JSON tensors only
    for allowed, passes in (("198.51.100.0/24", False), ("127.0.0.0/8", True)):
        env = stage.model_copy(update={"auth": Auth(jwt=stage.auth.jwt, allow_ips=[allowed])})
        ingress = cluster.start_standin(seldon.access_objects(sorted(cluster.deployments), env) + cluster.objects, jwks)
        rest = httpclient.InferenceServerClient(cluster.rest_url("iris", ingress))
        assert rest.is_model_ready("iris")
        if passes:
            assert rest.infer("iris", [inp], headers={"Authorization": f"Bearer {token}"}).get_response()["model_name"] == "iris"
        else:
            assert "RBAC: access denied" in _denied(lambda rest=rest: rest.infer("iris", [inp], headers={"Authorization": f"Bearer {token}"}))
