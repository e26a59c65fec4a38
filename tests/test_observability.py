"""Every dashboard query and alert expression against a real Prometheus scraping real MLServers under load.

A query that parses but matches nothing would be a blank panel in Grafana, so each panel must
return data here, in both places the platform runs:

- locally: `mlops serve` with the shipped settings, whose router splits each public name in-process;
  the load gives every panel data: concurrent clients (coalescing), a shadow variant (wine), failed
  requests;
- in a cluster: the dev environment's iris pods (tests/cluster_pods.py: real MLServers run as the
  operator leaves the generated containers), scraped as prometheus-operator scrapes the PodMonitor
  (its port name looked up in each pod, its path, its relabelings on the pod's labels), with the
  generated overlay's weight rule loaded. The load calls the public name through the ingress and
  executor stand-in, which splits it between the pods by the overlay's weights, as Istio does.

Both loads send feedback (runtimes/feedback.py) for every live variant: locally as inference requests over
REST and gRPC and on the REST feedback path, through the ingress as inference requests (the executor
forwards no other path), which any variant's pod records under the variant named.

Local series carry no namespace label, the pods' carry `namespace="models"` (as prometheus-operator
adds), so one Prometheus holds both and each form is checked on its own series.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from cluster_pods import feedback_inputs
from conftest import REPO, Server, free_port
from prometheus_client.parser import text_string_to_metric_families

from mlops.check import cluster as cluster_model
from mlops.domain.spec import load_spec
from mlops.render import dashboards, seldon
from mlops.supervise.prometheus import Prometheus, rule_file, scrape_job
from runtimes.contract import FEEDBACK, INFER_SUCCESS, VARIANT_WEIGHT

LOAD_S = 15  # seconds of load; with a 1 s scrape that is enough samples for every rate()
DIRECT = "diabetes-champion"
FEATURES = {"iris": 4, "wine": 13, "diabetes": 10}
LOCAL = {"$namespace": "", "$model": ".*", "$variant": ".*", "$__rate_interval": "1m", "$__range": "1h"}  # "" matches only series without the label
CLUSTER = {**LOCAL, "$namespace": seldon.NAMESPACE}
POD_MODEL, POD_ENV = "iris", "dev"  # the variant pods: iris's live variants with the dev overlay's weights
PODMONITOR = REPO / "clusters/base/monitoring/podmonitor-mlserver.yaml"
TESTED = ("iris", "diabetes")  # the models whose variants get feedback locally: a classifier and a regressor
POD_SKIPPED = {dashboards.SHADOW_AGREEMENT, dashboards.MAE}  # no pod form here: router only; no regressor pods


def _call(rest, grpc, model: str, n: int, headers: dict | None = None) -> None:
    """One inference call, REST or gRPC by turn; one call in ten has the wrong feature count and fails."""
    width = FEATURES[model.split("-")[0]] - (n % 10 == 0)
    row = np.random.default_rng(n).random((1, width))
    try:
        if n % 2:
            inp = httpclient.InferInput("input-0", [1, width], "FP64")
            inp.set_data_from_numpy(row, binary_data=False)
            rest.infer(model, [inp])
        else:
            inp = grpcclient.InferInput("input-0", [1, width], "FP64")
            inp.set_data_from_numpy(row)
            grpc.infer(model, [inp], headers=headers)
    except Exception as exc:  # noqa: BLE001 - wrong widths fail on purpose
        if n % 10:
            raise AssertionError(f"{model}: {exc}") from None


def _feedback(rest, grpc, model: str, n: int, headers: dict | None = None, url: str | None = None) -> None:
    """Feedback for one of the model's live variants, 20 outcomes: REST or gRPC by turn, and with `url`
    (locally) every third one on the REST feedback path."""
    variant = ("champion", "challenger")[n % 2] if model in TESTED else "champion"
    rng = np.random.default_rng(n)
    if model == "diabetes":
        truth = rng.normal(150, 50, 20).round(1)
        prediction = (truth + rng.normal(0, 40, 20)).round(1)
    else:
        truth = rng.integers(0, 3, 20)
        prediction = np.where(rng.random(20) < 0.8, truth, (truth + 1) % 3)
    if url is not None and n % 3 == 0:
        body = json.dumps({"variant": variant, "prediction": prediction.tolist(), "truth": truth.tolist()}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v2/models/{model}/feedback", body, {"Content-Type": "application/json"}), timeout=10) as r:
            recorded = json.loads(r.read())["recorded"]
    elif n % 2:
        recorded = rest.infer(model, feedback_inputs(httpclient, variant, prediction, truth), parameters={"feedback": True}).as_numpy("recorded")[0]
    else:
        answer = grpc.infer(model, feedback_inputs(grpcclient, variant, prediction, truth), parameters={"feedback": True}, headers=headers)
        recorded = answer.as_numpy("recorded")[0]
    if recorded != 20:
        raise AssertionError(f"{model} feedback for {variant}: recorded {recorded} of 20")


def _load(srv: Server, stop: threading.Event, failures: list) -> None:
    """REST and gRPC to routed and direct models; feedback for the A/B models' variants."""
    rest = httpclient.InferenceServerClient(srv.url)
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc}")
    targets = ["iris", "wine", "diabetes", "iris-champion", DIRECT, "feedback iris", "feedback diabetes"]
    n = 0
    while not stop.is_set():
        n += 1
        target = targets[n % len(targets)]
        try:
            if target.startswith("feedback "):
                _feedback(rest, grpc, target.split()[1], n // len(targets), url=f"http://{srv.url}")
            else:
                _call(rest, grpc, target, n)
        except AssertionError as exc:
            failures.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - feedback must not fail
            failures.append(f"{target}: {exc}")


def _split(cluster, stop: threading.Event, failures: list) -> None:
    """The public name's traffic through the cluster's ingress, which splits it between the variant pods."""
    rest = httpclient.InferenceServerClient(cluster.rest_url(POD_MODEL))
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{cluster.grpc}")
    n = 0
    while not stop.is_set():
        n += 1
        try:
            if n % 4 == 0:
                _feedback(rest, grpc, POD_MODEL, n // 4, cluster.grpc_headers(POD_MODEL))
            else:
                _call(rest, grpc, POD_MODEL, n, cluster.grpc_headers(POD_MODEL))
        except AssertionError as exc:
            failures.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - feedback must not fail
            failures.append(f"feedback {POD_MODEL}: {exc}")


@dataclass
class Scraped:
    prom: Prometheus
    weights: dict[str, int]  # the pods' configured weights by variant


@pytest.fixture(scope="module")
def scraped(trained, cluster, tmp_path_factory):
    """A private local server with the shipped settings, and iris's live variants as pods, all under load and
    scraped every second."""
    work = tmp_path_factory.mktemp("observability")
    project = work / "project"
    shutil.copytree(trained, project, symlinks=True)

    weights = load_spec(project / "deployments.yaml").models[POD_MODEL].weights(POD_ENV)
    weight_rule = yaml.safe_load((project / "seldon/overlays" / POD_ENV / seldon.WEIGHTS_FILE).read_text())
    podmonitor = yaml.safe_load(PODMONITOR.read_text())

    srv = Server(project)
    pods = cluster.pods_of(POD_MODEL)
    prom = None
    try:
        assert pods and {p.labels["mlops/variant"] for p in pods} == set(weights)
        srv.wait_ready()
        prom = Prometheus(
            work / "prometheus", free_port(),
            [scrape_job("mlserver", [f"127.0.0.1:{srv.metrics}"]), *(p.scrape_job(podmonitor) for p in pods)],
            {"mlops-serving.yaml": rule_file(dashboards.prometheus_rule()), "variant-weights.yaml": rule_file(weight_rule)},
            interval="1s",
        )  # fmt: skip
        prom.wait_ready()
        stop, failures = threading.Event(), []
        threads = [threading.Thread(target=_load, args=(srv, stop, failures)) for _ in range(3)]
        threads += [threading.Thread(target=_split, args=(cluster, stop, failures)) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(LOAD_S)
        stop.set()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        time.sleep(2)  # the last scrape and rule evaluation after the load
        yield Scraped(prom, weights)
    finally:
        if prom is not None:
            prom.stop()
        srv.stop()


def _substitute(expr: str, variables: dict[str, str]) -> str:
    for var, value in variables.items():
        expr = expr.replace(var, value)
    return expr


def _empty_panels(prom: Prometheus, dashboard: dict, variables: dict[str, str], skip=()) -> list[str]:
    queries = [(title, expr) for title, expr in dashboards.panel_queries(dashboard) if title not in skip]
    problems = [] if queries else [f"{dashboard['title']}: no panel query to check"]
    for title, expr in queries:
        answer = prom.query(_substitute(expr, variables))
        if answer.get("status") != "success":
            problems.append(f"{title}: {answer.get('error')}\n  {expr}")
        elif not answer["data"]["result"]:
            problems.append(f"{title}: no data\n  {expr}")
    return problems


def _series(prom: Prometheus, expr: str) -> list[dict]:
    answer = prom.query(expr)
    assert answer.get("status") == "success", f"{answer.get('error')}\n  {expr}"
    return [r["metric"] for r in answer["data"]["result"]]


@pytest.mark.parametrize("name", sorted(dashboards.DASHBOARDS))
def test_every_panel_query_returns_data_locally(scraped, name):
    problems = _empty_panels(scraped.prom, dashboards.DASHBOARDS[name](), LOCAL)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["overview", "ab"])
def test_every_traffic_panel_returns_data_for_variant_pods(scraped, name):
    """In a cluster, from the pods' own series; shadow agreement is the router's alone (Seldon compares nothing).
    The pods here serve iris, a classifier: the MAE panel reads the same feedback series as the accuracy panel,
    which the pods fill, and gets its data from the regressor locally."""
    problems = _empty_panels(scraped.prom, dashboards.DASHBOARDS[name](), CLUSTER, skip=POD_SKIPPED)
    assert not problems, "\n".join(problems)


def test_per_variant_panels_show_each_variant_pod(scraped):
    """Every A/B query whose legend names the variant has one series per variant pod with weight, none without
    the label. (The weight rule also covers the models that have no pods here.)"""
    weighted = {v for v, w in scraped.weights.items() if w > 0}
    per_variant = [
        (p["title"], t["expr"]) for p in dashboards.ab()["panels"] for t in p.get("targets", [])
        if "{{variant}}" in t["legendFormat"] and p["title"] not in POD_SKIPPED
    ]  # fmt: skip
    assert weighted and per_variant
    problems = []
    for title, expr in per_variant:
        got = [m.get("variant") for m in _series(scraped.prom, _substitute(expr, CLUSTER)) if m.get("model") == POD_MODEL]
        if sorted(got, key=str) != sorted(weighted):
            problems.append(f"{title}: variants {got}\n  {expr}")
    assert not problems, "\n".join(problems)


def test_overlay_rule_records_the_configured_weights(scraped):
    answer = scraped.prom.query(f'{VARIANT_WEIGHT}{{model="{POD_MODEL}"}}')["data"]["result"]
    recorded = {r["metric"]["variant"]: int(r["value"][1]) for r in answer}
    assert recorded == scraped.weights
    assert {r["metric"]["namespace"] for r in answer} == {seldon.NAMESPACE}


def test_variable_queries_list_models_and_variants(scraped):
    """Grafana fills the variables with label_values(selector, label): the label's values on matching series."""
    queries = {v["name"]: v["query"] for v in dashboards.ab()["templating"]["list"] if v["type"] == "query"}

    def values(name: str, variables: dict[str, str]) -> set[str]:
        selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", queries[name]).groups()
        answer = scraped.prom.api(f"label/{label}/values", **{"match[]": _substitute(selector, variables)})
        return set(answer["data"])

    assert {"iris", "iris-champion", "wine", DIRECT} <= values("model", LOCAL)
    assert {"champion", "challenger"} == values("variant", LOCAL)
    assert values("model", CLUSTER) == {POD_MODEL}, "in a cluster the model is the pods' model label"
    assert values("variant", CLUSTER) == set(scraped.weights)


def test_every_alert_expression_evaluates(scraped):
    problems = []
    for rule in dashboards.alert_rules():
        answer = scraped.prom.query(rule["expr"])
        if answer.get("status") != "success":
            problems.append(f"{rule['alert']}: {answer.get('error')}")
    assert not problems, "\n".join(problems)


def test_every_alert_sees_its_series_locally_and_in_variant_pods(scraped):
    """What each alert compares with its threshold returns series of both forms: the alert can fire in both; in a
    cluster, an alert whose summary names the variant has a series per variant pod."""
    rules = {r["alert"]: r for r in dashboards.alert_rules()}
    problems = []
    for alert, signal in dashboards.alert_signals().items():
        found = _series(scraped.prom, signal)
        local = [m for m in found if "namespace" not in m]
        cluster = [m for m in found if m.get("namespace") == seldon.NAMESPACE and m.get("model") == POD_MODEL]
        if not local or not cluster:
            problems.append(f"{alert}: {len(local)} local and {len(cluster)} pod series\n  {signal}")
        compared = set(scraped.weights) - ({dashboards.CHAMPION} if alert == dashboards.QUALITY_ALERT else set())  # others vs the champion
        if "$labels.variant" in rules[alert]["annotations"]["summary"] and {m.get("variant") for m in cluster} != compared:
            problems.append(f"{alert}: pod variants {[m.get('variant') for m in cluster]}")
    assert not problems, "\n".join(problems)


def test_no_traffic_alert_watches_only_what_should_get_traffic(scraped):
    """Locally the routed public names, not the variants served beside them; in a cluster the weighted variant pods."""
    candidates = _series(scraped.prom, dashboards.alert_signals()["MLOpsModelNoTraffic"])
    assert {m["model"] for m in candidates if "namespace" not in m} == {"iris", "wine", "diabetes"}
    assert {(m["model"], m["variant"]) for m in candidates if "namespace" in m} == {(POD_MODEL, v) for v, w in scraped.weights.items() if w > 0}
    (rule,) = [r for r in dashboards.alert_rules() if r["alert"] == "MLOpsModelNoTraffic"]
    assert _series(scraped.prom, rule["expr"]) == [], "everything that should get traffic got some"


def test_pod_latency_histograms_add_up(scraped):
    """The pod form adds MLServer's REST and gRPC latency histograms: that needs the same buckets."""
    buckets = [
        {m["le"] for m in _series(scraped.prom, f'count by (le) ({metric}{{variant!=""}})')}
        for metric in ("rest_server_request_duration_seconds_bucket", "grpc_server_handling_seconds_bucket")
    ]
    assert buckets[0] and buckets[0] == buckets[1]


def test_process_and_lifecycle_metrics_are_exported(scraped):
    """MLServer exports neither; the runtimes do, for the main process (and each worker, where there are
    parallel workers; the shipped settings have none)."""
    local = '{namespace=""}'
    processes = {r["process"] for r in _series(scraped.prom, f"mlops_process_resident_memory_bytes{local}")}
    assert processes == {"main"}
    ready = {r["metric"]["model"]: r["value"][1] for r in scraped.prom.query(f"mlops_model_ready{local}")["data"]["result"]}
    assert ready and set(ready.values()) == {"1"}, ready
    assert {"iris", "wine", "diabetes", DIRECT} <= set(ready)


def test_pod_series_are_stored_as_the_scrape_model_says(scraped, cluster):
    """What Prometheus stored of each pod's MLServer and feedback series is what mlops.check.cluster predicts
    (`mlops validate` checks with it): MLServer's under the pod's model and variant, feedback under the variant
    it names, whichever pod recorded it, and nothing left as exported_variant."""
    podmonitor = yaml.safe_load(PODMONITOR.read_text())
    scrape = cluster_model.scrape_config(podmonitor)
    names = (INFER_SUCCESS, f"{FEEDBACK}_total")
    recorded_for = set()
    for pod in cluster.pods_of(POD_MODEL):
        meta = pod.meta(podmonitor)
        port, path = cluster_model.served_metrics(pod.container, {}, cluster_model.server_settings(REPO))
        with urllib.request.urlopen(f"http://{pod.ip}:{port}{path}", timeout=10) as r:
            exposed = [{"__name__": s.name, **s.labels} for f in text_string_to_metric_families(r.read().decode()) for s in f.samples if s.name in names]
        predicted = sorted(sorted(cluster_model.stored_series(scrape, meta, e).items()) for e in exposed)
        selector = f'{{__name__=~"{"|".join(names)}", pod="{meta["__meta_kubernetes_pod_name"]}"}}'
        stored = sorted(sorted(m.items()) for m in _series(scraped.prom, selector))
        assert stored == predicted, pod.predictor.name
        recorded_for |= {dict(m)["variant"] for m in stored if dict(m)["__name__"] == f"{FEEDBACK}_total"}
        assert {dict(m)["variant"] for m in stored if dict(m)["__name__"] == INFER_SUCCESS} == {pod.labels["mlops/variant"]}
    assert recorded_for == set(scraped.weights)
    assert _series(scraped.prom, '{exported_variant!=""}') == []
