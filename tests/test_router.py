"""The routed public name (`iris`) over real MLServer: split by weight, sticky keys, shadows, hot reload."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from statistics import NormalDist

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import Server, mlops, scrape

ROW = np.array([[5.9, 3.0, 5.1, 1.8]])
Z_999 = NormalDist().inv_cdf(1 - 0.001 / 2)  # two-sided 99.9% bound: a correct split fails one run in 1,000
WRONG_BY = 0.10  # a split this far off its weights must fail, e.g. 70/30 or 90/10 for 80/20


def requests_to_tell_apart(p: float, off_by: float) -> int:
    """Fewest requests for which a share `off_by` away from p falls outside p's 99.9% bound 99.9% of the time."""
    sd = lambda q: math.sqrt(q * (1 - q))  # noqa: E731
    return max(math.ceil((Z_999 * (sd(p) + sd(q)) / off_by) ** 2) for q in (p - off_by, p + off_by) if 0 < q < 1)


def rest_infer(client, model="iris", key=None):
    inp = httpclient.InferInput("input-0", [1, 4], "FP64")
    inp.set_data_from_numpy(ROW, binary_data=False)
    out = [httpclient.InferRequestedOutput("predict", binary_data=False)]
    result = client.infer(model, [inp], outputs=out, parameters={"routing_key": key} if key else None)
    return result.get_response()


def grpc_infer(client, model="iris", key=None):
    inp = grpcclient.InferInput("input-0", [1, 4], "FP64")
    inp.set_data_from_numpy(ROW)
    result = client.infer(model, [inp], parameters={"routing_key": key} if key else None)
    return result.get_response(as_json=True)


def variant_of(response: dict) -> str:
    params = response["parameters"]
    value = params["variant"]
    return value["string_param"] if isinstance(value, dict) else value


def metric(samples, name, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_response_says_which_variant_answered(server):
    response = rest_infer(httpclient.InferenceServerClient(server.url))
    settings = json.loads((server.project / "model-settings/iris/model-settings.json").read_text())
    versions = {v["name"]: v["version"] for v in settings["parameters"]["extra"]["variants"]}
    assert response["model_name"] == "iris"
    assert response["model_version"] == versions[variant_of(response)]
    for name in versions:  # the variants stay callable by their own names
        assert rest_infer(httpclient.InferenceServerClient(server.url), model=f"iris-{name}")["model_name"] == f"iris-{name}"


def test_requests_split_by_weight_within_binomial_interval(server):
    """As many requests as it takes to tell the weights from a split 10 points off (about 800 for 80/20)."""
    settings = json.loads((server.project / "model-settings/iris/model-settings.json").read_text())
    weights = {v["name"]: v["weight"] for v in settings["parameters"]["extra"]["variants"] if not v.get("shadow")}
    p = weights["champion"] / sum(weights.values())
    n = requests_to_tell_apart(p, WRONG_BY)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    with ThreadPoolExecutor(8) as pool:
        variants = Counter(pool.map(lambda _: variant_of(grpc_infer(client)), range(n)))
    assert set(variants) == set(weights)
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(variants["champion"] - n * p) <= Z_999 * sigma, (variants, n, p)


def test_same_key_same_variant(server):
    client = httpclient.InferenceServerClient(server.url)
    for key in (f"user-{i}" for i in range(50)):
        seen = {variant_of(rest_infer(client, key=key)) for _ in range(3)}
        assert len(seen) == 1, key


@pytest.fixture(scope="module")
def private(trained, tmp_path_factory):
    """A server of our own, with a shadow on iris that fails on every request (it expects 10 features)."""
    import shutil

    project = tmp_path_factory.mktemp("router") / "project"
    shutil.copytree(trained, project, symlinks=True)
    path = project / "model-settings/iris/model-settings.json"
    settings = json.loads(path.read_text())
    diabetes = json.loads((project / "model-settings/diabetes-champion/model-settings.json").read_text())
    settings["parameters"]["extra"]["variants"].append(
        {"name": "broken-shadow", "shadow": True, "uri": diabetes["parameters"]["uri"], "version": diabetes["parameters"]["version"], "weight": 0}
    )
    path.write_text(json.dumps(settings))
    srv = Server(project)
    try:
        srv.wait_ready()
        yield project, srv
    finally:
        srv.stop()


def test_failing_shadow_never_fails_a_request(private):
    _, srv = private
    client = httpclient.InferenceServerClient(srv.url)
    before = scrape(srv, "mlops_router_")
    answers = [rest_infer(client) for _ in range(200)]
    assert all(a["outputs"][0]["data"] for a in answers)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = scrape(srv, "mlops_router_")
        errors = metric(after, "mlops_router_requests_total", model="iris", variant="broken-shadow", role="shadow", outcome="error")
        errors -= metric(before, "mlops_router_requests_total", model="iris", variant="broken-shadow", role="shadow", outcome="error")
        if errors == 200:
            break
        time.sleep(0.2)
    assert errors == 200, "every shadow copy failed and was counted"
    live_errors = metric(after, "mlops_router_requests_total", model="iris", role="live", outcome="error")
    assert live_errors == 0


def test_weight_change_under_load_loses_no_request_and_moves_only_the_moved_share(private):
    project, srv = private
    keys = [f"customer-{i}" for i in range(1000)]
    rest = httpclient.InferenceServerClient(srv.url, concurrency=4)
    before = {k: variant_of(rest_infer(rest, key=k)) for k in keys}

    failures, done, stop = [], Counter(), threading.Event()

    def load(kind):
        client = httpclient.InferenceServerClient(srv.url) if kind == "rest" else grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc}")
        call = rest_infer if kind == "rest" else grpc_infer
        while not stop.is_set():
            try:
                call(client)
                done[kind] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                failures.append(f"{kind}: {exc}")

    threads = [threading.Thread(target=load, args=(k,)) for k in ("rest", "rest", "grpc", "grpc")]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        spec = project / "deployments.yaml"
        spec.write_text(
            spec.read_text()
            .replace("champion:   {alias: champion, weight: 80}", "champion:   {alias: champion, weight: 60}")
            .replace("challenger: {alias: challenger, weight: 20}", "challenger: {alias: challenger, weight: 40}")
        )
        proc = mlops(project, "sync", "--reload", f"http://{srv.url}", check=True)
        assert "reloaded iris" in proc.stdout
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, f"{len(failures)} failed requests during the weight change, e.g. {failures[:3]}"
    assert done["rest"] > 50 and done["grpc"] > 50, done

    samples = scrape(srv, "mlops_router_")
    assert metric(samples, "mlops_router_variant_weight", model="iris", variant="champion") == 60
    assert metric(samples, "mlops_router_variant_weight", model="iris", variant="challenger") == 40

    after = {k: variant_of(rest_infer(rest, key=k)) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "champion" and after[k] == "challenger" for k in moved), "only champion keys may move"
    champions = sum(v == "champion" for v in before.values())
    # 20 of champion's 80 points moved: a quarter of its keys, within a 99.9% binomial interval.
    sigma = (champions * 0.25 * 0.75) ** 0.5
    assert abs(len(moved) - champions * 0.25) <= Z_999 * sigma, (len(moved), champions)
