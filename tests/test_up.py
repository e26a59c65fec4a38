"""`mlops up`, the main job: an empty registry gets trained, synced and served, and the printed request works."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.parse
import urllib.request

from conftest import MLOPS, free_port, mlops, new_project

from mlops.render import dashboards
from mlops.supervise.processes import answers, wait_until


def _query(url: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10) as r:
        return json.load(r)["data"]["result"]


def test_up_on_an_empty_embedded_registry_serves_and_prints_a_working_request(tmp_path):
    """With --with-prometheus, also a Prometheus scraping the server, with the alert rules, gone with the server."""
    project = new_project(tmp_path / "project")
    ports = [str(free_port()) for _ in range(4)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLOPS_PROJECT_DIR"] = str(project)
    log = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen(
        [MLOPS, "up", "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--with-prometheus", "--prometheus-port", ports[3]],
        cwd=project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def printed() -> str:
            log.seek(0)
            return log.read()

        started = wait_until(lambda: "Ctrl-C stops the server" in printed(), 300, [proc], interval=1)
        text = printed()
        assert started or proc.poll() is None, f"mlops up exited {proc.returncode}:\n{text}"
        assert started, text[-3000:]
        assert (project / ".mlops" / "mlflow.db").is_file(), "the embedded registry lives in the project"
        assert (project / "model-settings" / "iris" / "model-settings.json").is_file()
        for url in (f"http://127.0.0.1:{ports[0]}/v2/models/<name>/infer", f"127.0.0.1:{ports[1]}", f"http://127.0.0.1:{ports[2]}/metrics"):
            assert url in text

        curl = re.search(r"curl -s (\S+) -H 'Content-Type: application/json' -d '(.+)'", text)
        assert curl, text[-3000:]
        req = urllib.request.Request(curl.group(1), data=curl.group(2).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
        assert answer["outputs"][0]["data"], answer
        assert answer["model_name"] == "iris" and answer["parameters"]["variant"] in ("champion", "challenger"), answer

        prometheus = re.search(r"Prometheus (http://\S+)", text)
        assert prometheus and prometheus.group(1) == f"http://127.0.0.1:{ports[3]}", text[-3000:]
        url, model = prometheus.group(1), curl.group(1).split("/")[-2]
        counted = f'model_infer_request_success_total{{model="{model}"}} > 0'  # after the next scrape
        assert wait_until(lambda: bool(_query(url, counted)), 60, interval=1), f"{url} has no requests of {model}"
        with urllib.request.urlopen(f"{url}/api/v1/rules?type=alert", timeout=10) as r:
            loaded = {rule["name"] for group in json.load(r)["data"]["groups"] for rule in group["rules"]}
        assert loaded == {rule["alert"] for rule in dashboards.alert_rules()}

        proc.send_signal(signal.SIGTERM)  # to `mlops up` alone: it forwards it to MLServer, which drains, then stops Prometheus
        assert proc.wait(timeout=120) == 0, "MLServer's exit code, 0 after a drain"
        assert not answers(f"{url}/-/ready"), "Prometheus outlived the server"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        log.close()


def test_up_with_prometheus_names_the_package_when_it_is_missing(tmp_path):
    project = new_project(tmp_path / "project")
    (tmp_path / "bin").mkdir()
    proc = mlops(project, "up", "--with-prometheus", env={"PATH": str(tmp_path / "bin")})
    assert proc.returncode == 1
    assert "prometheus not found on PATH" in proc.stderr and "apt-get install prometheus" in proc.stderr
    assert not (project / ".mlops" / "mlflow.db").exists(), "it fails before training anything"
