"""A local Prometheus beside a local MLServer: its configuration, its rule files and its process.

`mlops up --with-prometheus` runs one that scrapes the server's metrics port and loads the alert
rules, the spec.groups of the PrometheusRule that `mlops dashboards` writes to
`clusters/base/monitoring/prometheus-rules.yaml`, so the dashboards' queries and the alerts can be
tried on a laptop. The tests use the same class to
evaluate every panel query and alert expression against real servers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from runtimes.contract import LOOPBACK

from .processes import stop_process, wait_for

MISSING = "prometheus not found on PATH; install it with `apt-get install prometheus`"


class PrometheusError(Exception):
    pass


def binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusError(MISSING)
    return path


def rule_file(prometheus_rule: dict) -> dict:
    """A PrometheusRule custom resource as a Prometheus rules file: its spec.groups."""
    return {"groups": prometheus_rule["spec"]["groups"]}


def scrape_job(name: str, targets: list[str], labels: dict[str, str] | None = None, relabel_configs: list[dict] | None = None) -> dict:
    job = {"job_name": name, "static_configs": [{"targets": targets, **({"labels": labels} if labels else {})}]}
    if relabel_configs:
        job["relabel_configs"] = relabel_configs
    return job


class Prometheus:
    """Prometheus on 127.0.0.1:`port`, configuration and data in `workdir`.

    rules: {file name: rules file} written beside the configuration and loaded by it.
    """

    def __init__(self, workdir: Path, port: int, scrape_configs: list[dict], rules: dict[str, dict] | None = None, interval: str = "5s"):
        exe = binary()
        workdir.mkdir(parents=True, exist_ok=True)
        rule_files = []
        for name, content in sorted((rules or {}).items()):
            path = workdir / name
            path.write_text(yaml.safe_dump(content, sort_keys=False))
            rule_files.append(str(path))
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": rule_files,
            "scrape_configs": scrape_configs,
        }, indent=2))  # fmt: skip
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(workdir / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params, doseq=True)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as exc:
            return json.load(exc)

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 30) -> None:
        if not wait_for(f"{self.url}/-/ready", self.proc, timeout, interval=0.3):
            raise PrometheusError(f"Prometheus did not start on {self.url}:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def beside_server(workdir: Path, port: int, metrics_port: int, metrics_host: str = LOOPBACK) -> Prometheus:
    """Scrape the local MLServer's metrics port every 5 s and evaluate the serving alerts, ready to query."""
    from ..render.dashboards import prometheus_rule

    prom = Prometheus(workdir, port, [scrape_job("mlserver", [f"{metrics_host}:{metrics_port}"])], {"mlops-serving.yaml": rule_file(prometheus_rule())})
    try:
        prom.wait_ready()
    except PrometheusError:
        prom.stop()
        raise
    return prom
