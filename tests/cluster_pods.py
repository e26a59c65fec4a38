"""One environment of the cluster, run here: real MLServer pods as Seldon's operator makes them, behind
the ingress + executor stand-in (cluster_standin.py), all derived from the rendered manifests.

A pod is the model container of one predictor: the image's CMD (`python -m runtimes.server start`) on a folder holding only the image's
settings.json (the Dockerfile copies model-settings/settings.json to /app/server), with the image's
ENV, then the `mlflow-credentials` secret (envFrom), then the container's env as the operator leaves
it (mlops.check.cluster.derive): so MLServer picks its model name, ports, metrics port and path exactly
as in the cluster. Two things differ, because pods here share one machine: each binds its own
loopback address (MLSERVER_HOST; in Kubernetes it binds 0.0.0.0 in a network namespace of its own,
with the same ports) and gets its own metrics folder (the image's /tmp is the pod's own). The
registry is the test's (the secret's MLFLOW_TRACKING_URI). The uid is not reproduced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conftest import REPO, free_port, stop_group

from mlops.check import cluster
from mlops.check.validate import rendered_environments
from mlops.render import seldon
from mlops.supervise.processes import wait_for, wait_until
from mlops.supervise.prometheus import scrape_job
from mlops.supervise.serve import mlserver_command

POD_NET = "127.0.77."  # pod i gets POD_NET + (i + 1)
STANDIN = Path(__file__).with_name("cluster_standin.py")


@dataclass
class Pod:
    deployment: str
    predictor: cluster.Predictor
    ip: str
    proc: subprocess.Popen
    log: Path

    @property
    def container(self) -> cluster.Container:
        return self.predictor.container

    @property
    def labels(self) -> dict[str, str]:
        return self.predictor.labels

    def address(self, port_name: str) -> str:
        return f"{self.ip}:{self.container.ports[port_name]}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def meta(self, podmonitor: dict) -> dict[str, str]:
        """The service discovery's labels of this pod's metrics port (what the PodMonitor's relabelings read)."""
        (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
        port = self.container.ports.get(endpoint["port"])
        assert port is not None, f"PodMonitor port {endpoint['port']!r} is not a port of {self.deployment}/{self.predictor.name}"
        return cluster.pod_meta(seldon.NAMESPACE, self.deployment, self.predictor, endpoint["port"], f"{self.ip}:{port}")

    def scrape_job(self, podmonitor: dict) -> dict:
        """What prometheus-operator makes of the PodMonitor for this pod (mlops.check.cluster.scrape_config): the
        endpoint's port name looked up in the pod's container ports, its path, the pod's labels as meta labels,
        the target relabelings, honor_labels and the metricRelabelings."""
        (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
        meta = self.meta(podmonitor)
        address = meta.pop("__address__")
        scrape = cluster.scrape_config(podmonitor)
        job = scrape_job(f"{self.deployment}-{self.predictor.name}", [address], meta, scrape["relabel_configs"])
        job["metrics_path"] = endpoint.get("path", "/metrics")
        job["honor_labels"] = scrape["honor_labels"]
        if "metric_relabel_configs" in scrape:
            job["metric_relabel_configs"] = scrape["metric_relabel_configs"]
        return job


def feedback_inputs(client, variant: str, prediction, truth) -> list:
    """Feedback as an inference request's inputs (runtimes/feedback.py), for tritonclient's http or grpc module
    (`client`); send them with `parameters={"feedback": True}`. JSON tensors: Seldon's executor parses every
    REST body as JSON, so binary tensor data would not pass it."""
    inputs = []
    for name, values in (("variant", np.array([variant.encode()], dtype=np.object_)), ("prediction", np.asarray(prediction)), ("truth", np.asarray(truth))):
        datatype = "BYTES" if values.dtype == np.object_ else "INT64" if values.dtype.kind == "i" else "FP64"
        inp = client.InferInput(name, list(values.shape), datatype)
        if client.__name__.endswith("http"):
            inp.set_data_from_numpy(values.astype(np.int64) if datatype == "INT64" else values, binary_data=False)
        else:
            inp.set_data_from_numpy(values.astype(np.int64) if datatype == "INT64" else values)
        inputs.append(inp)
    return inputs


@dataclass
class Ingress:
    """One stand-in process: the ingress gateway's REST and gRPC ports."""

    http: int
    grpc: int
    proc: subprocess.Popen
    log: Path


class Cluster:
    """The pods of `models` in environment `env` and the stand-in in front of them."""

    def __init__(self, workdir: Path, tracking_uri: str, env: str = "dev", models: tuple[str, ...] = ("iris", "wine")):
        self.workdir = workdir
        self.objects = rendered_environments(REPO)[env]
        self.chart = cluster.Chart.of(self.objects)
        self.image_env, _ = cluster.image_config(REPO)
        sdeps = [o for o in self.objects if o.get("kind") == "SeldonDeployment" and o["metadata"]["name"] in models]
        self.deployments = {s["metadata"]["name"]: cluster.derive(s, self.chart) for s in sdeps}
        self.pods: list[Pod] = []
        self.ingresses: list[Ingress] = []
        server_dir = workdir / "app-server"  # the image's /app/server
        server_dir.mkdir()
        (server_dir / "settings.json").write_text((REPO / cluster.SETTINGS_FILE).read_text())
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLSERVER_"))}
        secret = {"MLFLOW_TRACKING_URI": tracking_uri}  # envFrom: mlflow-credentials
        for name, dep in sorted(self.deployments.items()):
            for pred in dep.predictors:
                ip = f"{POD_NET}{len(self.pods) + 1}"
                tmp = workdir / f"{name}-{pred.name}-tmp"
                tmp.mkdir()
                env = {**base, **self.image_env, **secret, **pred.container.environment({})}
                env["MLSERVER_HOST"] = ip
                env["MLSERVER_METRICS_DIR"] = str(tmp / Path(self.image_env.get("MLSERVER_METRICS_DIR", "/tmp/m")).name)
                env["TMPDIR"] = str(tmp)
                log = workdir / f"{name}-{pred.name}.log"
                with open(log, "w") as out:
                    proc = subprocess.Popen(mlserver_command(server_dir), cwd=server_dir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                self.pods.append(Pod(name, pred, ip, proc, log))

    def wait_ready(self, timeout: float = 240) -> None:
        """Each pod until its readiness probe's path answers, as the kubelet would ask it."""
        deadline = time.monotonic() + timeout
        for pod in self.pods:
            url = f"http://{pod.address('http')}{pod.container.readiness_path}"
            if not wait_for(url, pod.proc, max(1.0, deadline - time.monotonic())):
                raise AssertionError(f"pod {pod.deployment}/{pod.predictor.name} not ready at {url}:\n{pod.output()[-3000:]}")

    def start_standin(self, access: list[dict] | None = None, jwks: dict[str, dict] | None = None) -> Ingress:
        """The ingress in front of the pods, enforcing what `access` (default: this environment's
        objects) says the gateway does; `jwks` holds each issuer's keys, as istiod inlines them after
        fetching the jwksUri. The first one started is the cluster's own (`self.http`, `self.grpc`)."""
        http, grpc = free_port(), free_port()
        gate = cluster.Access.ingress(self.objects if access is None else access)
        rules = [{**r, "jwks": (jwks or {}).get(r.get("issuer"), {"keys": []})} for r in gate.jwt_rules]
        config = {"http_port": http, "grpc_port": grpc, "deployments": [], "access": {"jwt_rules": rules, "deny": gate.deny, "allow": gate.allow}}
        for name, dep in self.deployments.items():
            pods = {p.predictor.name: p for p in self.pods if p.deployment == name}
            config["deployments"].append({
                "gateway_ok": not cluster.gateway_problems(self.objects, dep),
                "http_prefix": dep.http_prefix,
                "grpc_headers": dep.grpc_headers,
                "grpc_path": dep.grpc_path,
                "routes": dep.routes,
                "mirror": dep.mirror,
                "predictors": {n: {"graph": p.predictor.graph_name, "http": p.address("http"), "grpc": p.address("grpc")} for n, p in pods.items()},
            })  # fmt: skip
        n = len(self.ingresses)
        path = self.workdir / f"standin-{n}.json"
        path.write_text(json.dumps(config))
        log = self.workdir / f"standin-{n}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, str(STANDIN), str(path)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        ingress = Ingress(http, grpc, proc, log)
        self.ingresses.append(ingress)
        if not wait_until(lambda: "ready" in log.read_text(), 30, [proc], interval=0.1):
            raise AssertionError(f"ingress stand-in did not start:\n{log.read_text()}")
        if n == 0:
            self.http, self.grpc = http, grpc
        return ingress

    def rest_url(self, deployment: str, ingress: Ingress | None = None) -> str:
        """tritonclient's url (host:port/base-path) for a deployment through the ingress."""
        return f"127.0.0.1:{(ingress or self).http}{self.deployments[deployment].http_prefix.rstrip('/')}"

    def grpc_headers(self, deployment: str) -> dict[str, str]:
        return self.deployments[deployment].grpc_headers

    def pods_of(self, deployment: str) -> list[Pod]:
        return [p for p in self.pods if p.deployment == deployment]

    def stop(self) -> None:
        for ingress in self.ingresses:
            stop_group(ingress.proc)
        for pod in self.pods:
            stop_group(pod.proc)
