"""Every dashboard query and alert expression against a real Prometheus scraping a real MLServer under load.

A query that parses but matches nothing would be a blank panel in Grafana, so each panel must
return data here. The server is set up so that every panel can: adaptive batching on one model,
a shadow variant (wine), failed requests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import Server, free_port
from mlops import dashboards

LOAD_S = 15  # seconds of load; with a 1 s scrape that is enough samples for every rate()
BATCHED = "diabetes-champion"
VARIABLES = {"$namespace": ".*", "$model": ".*", "$variant": ".*", "$__rate_interval": "1m"}
FEATURES = {"iris": 4, "wine": 13, "diabetes": 10}


class Prometheus:
    def __init__(self, workdir: Path, target: str):
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.fail("prometheus not found on PATH; install it with `apt-get install prometheus`")
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "mlserver", "static_configs": [{"targets": [target]}]}],
        }))  # fmt: skip
        self.log = open(workdir / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def query(self, expr: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as exc:
            return json.load(exc)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        self.log.seek(0)
        raise AssertionError(f"Prometheus not ready:\n{self.log.read()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.log.close()


def _load(srv: Server, stop: threading.Event, failures: list) -> None:
    """REST and gRPC to routed and direct models; one call in ten has the wrong feature count."""
    rest = httpclient.InferenceServerClient(srv.url)
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc}")
    targets = ["iris", "wine", "diabetes", "iris-champion", BATCHED]
    n = 0
    while not stop.is_set():
        n += 1
        model = targets[n % len(targets)]
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
                grpc.infer(model, [inp])
        except Exception as exc:  # noqa: BLE001 - wrong widths fail on purpose
            if n % 10:
                failures.append(f"{model}: {exc}")


@pytest.fixture(scope="module")
def scraped(trained, tmp_path_factory):
    """A private server with adaptive batching on one model, under load, scraped every second."""
    work = tmp_path_factory.mktemp("observability")
    project = work / "project"
    shutil.copytree(trained, project, symlinks=True)
    path = project / "model-settings" / BATCHED / "model-settings.json"
    settings = json.loads(path.read_text())
    settings.update(max_batch_size=4, max_batch_time=0.005)
    path.write_text(json.dumps(settings))
    srv = Server(project)
    prom = None
    try:
        srv.wait_ready()
        prom = Prometheus(work, f"127.0.0.1:{srv.metrics}")
        prom.wait_ready()
        stop, failures = threading.Event(), []
        threads = [threading.Thread(target=_load, args=(srv, stop, failures)) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(LOAD_S)
        stop.set()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        time.sleep(2)  # the last scrape after the load
        yield prom
    finally:
        if prom is not None:
            prom.stop()
        srv.stop()


def _substitute(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


@pytest.mark.parametrize("name", sorted(dashboards.DASHBOARDS))
def test_every_panel_query_returns_data(scraped, name):
    problems = []
    for title, expr in dashboards.panel_queries(dashboards.DASHBOARDS[name]()):
        answer = scraped.query(_substitute(expr))
        if answer.get("status") != "success":
            problems.append(f"{title}: {answer.get('error')}\n  {expr}")
        elif not answer["data"]["result"]:
            problems.append(f"{title}: no data\n  {expr}")
    assert not problems, "\n".join(problems)


def test_every_alert_expression_evaluates(scraped):
    problems = []
    for rule in dashboards.alert_rules():
        answer = scraped.query(rule["expr"])
        if answer.get("status") != "success":
            problems.append(f"{rule['alert']}: {answer.get('error')}")
    assert not problems, "\n".join(problems)


def test_process_and_lifecycle_metrics_are_exported(scraped):
    """MLServer exports neither; the runtimes do, for the main process and each worker."""
    processes = {r["metric"]["process"] for r in scraped.query("mlops_process_resident_memory_bytes")["data"]["result"]}
    assert processes == {"main", "worker"}
    ready = {r["metric"]["model"]: r["value"][1] for r in scraped.query("mlops_model_ready")["data"]["result"]}
    assert ready and set(ready.values()) == {"1"}, ready
    assert {"iris", "wine", "diabetes", BATCHED} <= set(ready)
