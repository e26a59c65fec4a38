"""Run MLServer on `model-settings/` in the foreground and tell the user how to call it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from runtimes.contract import GRPC_PORT, HTTP_PORT, LOOPBACK, METRICS_PORT, ROUTER, SERVER_MODULE, RouterExtra

from ..domain.registry import Registry
from .processes import wait_for

EVERY_INTERFACE = ("0.0.0.0", "::")


@dataclass(frozen=True)
class Ports:
    http: int = HTTP_PORT
    grpc: int = GRPC_PORT
    metrics: int = METRICS_PORT
    host: str = LOOPBACK  # the interface REST, gRPC and metrics listen on; loopback unless told otherwise

    @property
    def local(self) -> str:
        """The address this machine reaches the server at."""
        return LOOPBACK if self.host in EVERY_INTERFACE else self.host


def mlserver_command(settings_dir: Path) -> list[str]:
    """What the image runs (Dockerfile CMD): MLServer's `start` through the project's serving entry point."""
    return [sys.executable, "-m", SERVER_MODULE, "start", str(settings_dir)]


class ServerError(Exception):
    pass


def server_env(registry: Registry, ports: Ports, metrics_dir: str) -> dict[str, str]:
    """MLServer reads its settings from MLSERVER_*; runtimes reach the registry through MLFLOW_TRACKING_URI.

    Each server gets a fresh metrics folder: files left by an earlier run would be counted again.
    """
    env = dict(os.environ)
    env.update(
        MLSERVER_HOST=ports.host,
        MLSERVER_HTTP_PORT=str(ports.http),
        MLSERVER_GRPC_PORT=str(ports.grpc),
        MLSERVER_METRICS_PORT=str(ports.metrics),
        MLSERVER_METRICS_DIR=metrics_dir,
        MLFLOW_TRACKING_URI=registry.tracking_uri,
    )
    return env


def reload_models(url: str, changed: list[str], removed: list[str]) -> None:
    """MLServer's repository API: `load` of a loaded model swaps in the new one once it is ready."""
    for verb, names in (("load", changed), ("unload", removed)):
        for name in names:
            req = urllib.request.Request(f"{url.rstrip('/')}/v2/repository/models/{name}/{verb}", method="POST", data=b"")
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    r.read()
            except urllib.error.HTTPError as exc:
                raise ServerError(f"{url}: {verb} of model '{name}' failed: {exc.code} {exc.read().decode(errors='replace')}") from None
            except OSError as exc:
                raise ServerError(f"cannot reach MLServer at {url} to {verb} '{name}': {exc}") from None


def served_models(settings_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(settings_dir.glob("*/model-settings.json"))]


def sample_request(registry: Registry, model: dict) -> dict | None:
    """A V2 request built from the input example MLflow logged with the model."""
    from runtimes.artifacts import ModelLoadError, fetch

    try:
        params = model["parameters"]
        uri = params.get("uri") or RouterExtra.model_validate(params["extra"]).variants[0].uri  # a router: its first variant's
        example = fetch(uri, registry.tracking_uri) / "input_example.json"
    except (KeyError, ValidationError, ModelLoadError):
        return None
    if not example.is_file():
        return None
    try:
        rows = json.loads(example.read_text())
        rows = rows.get("data", rows) if isinstance(rows, dict) else rows
        rows = rows[:1]
        flat = [float(x) for row in rows for x in row]
    except (ValueError, TypeError, AttributeError, IndexError):
        return None
    return {"inputs": [{"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP64", "data": flat}]}


def wait_ready(ports: Ports, proc: subprocess.Popen, timeout: float = 300) -> bool:
    return wait_for(f"http://{ports.local}:{ports.http}/v2/health/ready", proc, timeout)


def banner(settings_dir: Path, registry: Registry, ports: Ports, prometheus_url: str | None = None) -> str:
    models = served_models(settings_dir)
    if ports.host == LOOPBACK:
        reach = f"Listening on {LOOPBACK} only: this machine can call it, no other can (--host 0.0.0.0 serves every network)."
    elif ports.host in EVERY_INTERFACE:
        reach = f"Listening on every interface ({ports.host}): anyone who reaches this machine can call every model, unauthenticated."
    else:
        reach = f"Listening on {ports.host}."
    lines = [
        f"MLServer is ready with {len(models)} model(s): {', '.join(m['name'] for m in models)}",
        reach,
        f"  REST     http://{ports.local}:{ports.http}/v2/models/<name>/infer",
        f"  gRPC     {ports.local}:{ports.grpc}  (inference.GRPCInferenceService)",
        f"  metrics  http://{ports.local}:{ports.metrics}/metrics",
    ]
    if prometheus_url:
        lines.append(f"  Prometheus {prometheus_url}  (scrapes the metrics every 5 s; alerts at {prometheus_url}/alerts)")
    samples = [(m["name"], b, m.get("implementation") != ROUTER) for m in models if (b := sample_request(registry, m)) is not None]
    if samples:
        # A public name, as clients call it here and in a cluster; the shortest request to paste.
        name, body, _ = min(samples, key=lambda s: (s[2], len(s[1]["inputs"][0]["data"])))
        lines += [
            "Try:",
            f"  curl -s http://{ports.local}:{ports.http}/v2/models/{name}/infer -H 'Content-Type: application/json' -d '{json.dumps(body)}'",
        ]
    lines.append("Ctrl-C stops the server and Prometheus." if prometheus_url else "Ctrl-C stops the server.")
    return "\n".join(lines)


def serve(settings_dir: Path, registry: Registry, ports: Ports, echo=print, prometheus_port: int | None = None) -> int:
    """With prometheus_port, also a Prometheus (see mlops/supervise/prometheus.py) that lives and dies with the server."""
    with tempfile.TemporaryDirectory(prefix="mlserver-metrics-") as metrics_dir, contextlib.ExitStack() as stack:
        prom = None
        if prometheus_port is not None:
            from .prometheus import beside_server

            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mlops-prometheus-"))
            prom = beside_server(Path(workdir), prometheus_port, ports.metrics, ports.local)
            stack.callback(prom.stop)
        proc = subprocess.Popen(mlserver_command(settings_dir), env=server_env(registry, ports, metrics_dir))
        forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        if wait_ready(ports, proc):
            echo(banner(settings_dir, registry, ports, prom.url if prom else None))
        return proc.wait()
