"""Shared fixtures: a trained project in a temporary folder and a real MLServer serving it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from mlops.supervise.processes import answers, free_port, wait_until
from runtimes.contract import MODEL_SETTINGS_DIR, SERVER_MODULE

REPO = Path(__file__).resolve().parents[1]
MLOPS = str(Path(sys.executable).with_name("mlops"))


def mlops(project: Path, *args: str, env: dict | None = None, check: bool = False, timeout: float = 300):
    """Run the real `mlops` command in `project`, against its embedded registry unless env says otherwise."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    full_env["MLOPS_PROJECT_DIR"] = str(project)
    full_env.update(env or {})
    proc = subprocess.run([MLOPS, *args], cwd=project, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mlops {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def in_registry(project: Path, code: str) -> str:
    """Run `code` with `client` bound to the project's registry, in a fresh process.

    MLflow keeps per-process state (store and engine caches, an exported
    MLFLOW_TRACKING_URI) that makes one process unreliable across registries.
    """
    prelude = f"import sys; from pathlib import Path; from mlops.domain.registry import default_registry; client = default_registry(Path({str(project)!r})).client()\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"registry call failed:\n{proc.stderr}")
    return proc.stdout.strip()


def python_output(code: str, cwd: Path, hash_seed: str) -> str:
    """stdout of `code` run by a new Python process in `cwd` with PYTHONHASHSEED=`hash_seed`.

    Sets of strings iterate in an order that differs between seeds, so between runs and machines; two
    renders in one process share theirs and cannot show it.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONHASHSEED"] = hash_seed
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"python -c failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def new_project(dest: Path, spec_text: str | None = None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "deployments.yaml").write_text(spec_text or (REPO / "deployments.yaml").read_text())
    return dest


@pytest.fixture(autouse=True)
def _no_ambient_registry(monkeypatch):
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; keep one test's registry out of the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A project folder whose embedded registry holds every trained model, synced once."""
    project = new_project(tmp_path_factory.mktemp("trained"))
    mlops(project, "train", check=True)
    mlops(project, "sync", check=True)
    return project


@pytest.fixture(scope="session")
def mlserver_data_plane():
    """(settings, DataPlane, model registry) for in-process tests, which load the models they need into the
    registry under names of their own: a DataPlane registers MLServer's metrics, which a process can do once."""
    from mlserver.handlers import DataPlane
    from mlserver.registry import MultiModelRegistry
    from mlserver.settings import Settings

    settings = Settings(**json.loads((REPO / MODEL_SETTINGS_DIR / "settings.json").read_text()))  # as served
    registry = MultiModelRegistry()
    return settings, DataPlane(settings=settings, model_registry=registry), registry


@pytest.fixture
def project(trained, tmp_path) -> Path:
    """A private copy of the trained project (registry included) that a test may change."""
    dest = tmp_path / "project"
    shutil.copytree(trained, dest, symlinks=True)
    return dest


class Server:
    def __init__(self, project: Path, env: dict | None = None):
        self.project = project
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.log = open(project / "mlserver.log", "w+")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        full_env.update(MLOPS_PROJECT_DIR=str(project), **(env or {}))
        self.proc = subprocess.Popen(
            [MLOPS, "serve", "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)],
            cwd=project,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http}"

    def wait_ready(self, timeout: float = 180) -> None:
        self.wait_for_paths(["/v2/health/ready"], timeout)

    def wait_ready_models(self, models: list[str], timeout: float = 180) -> None:
        """For a server where some model is meant to stay not ready (so the server is not)."""
        self.wait_for_paths([f"/v2/models/{m}/ready" for m in models], timeout)

    def wait_for_paths(self, paths: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for path in paths:
            self.wait_until(partial(answers, f"http://{self.url}{path}"), deadline - time.monotonic(), f"MLServer: {path} not ready after {timeout}s")

    def wait_until(self, done: Callable[[], bool], timeout: float, failure: str) -> None:
        """Until `done()`; fails with `failure` (or how the server exited) if it exits or `timeout` seconds pass first."""
        if not wait_until(done, timeout, [self.proc]):
            if self.proc.poll() is not None:
                raise AssertionError(f"mlops serve exited {self.proc.returncode}:\n{self.output()}")
            raise AssertionError(f"{failure}:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM a process started with start_new_session and its children; SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def mlserver_process(srv: Server) -> int:
    """The pid of the MLServer process `mlops serve` started: the serving entry point's `start`."""
    (pid,) = [pid for pid, cmd in children(srv.proc.pid) if f" -m {SERVER_MODULE} start " in cmd]
    return pid


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of a process's children, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out.append((int(entry), f.read().replace(b"\0", b" ").decode()))
        except (OSError, ValueError, IndexError):
            continue
    return out


def scrape(srv: Server, prefix: str = "mlops_") -> dict[tuple[str, frozenset], float]:
    """The server's metric samples named `prefix*`, keyed by name and label set."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        m = re.match(rf"^({prefix}\w*)\{{(.*)\}} (\S+)$", line)
        if m:
            samples[(m.group(1), frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2))))] = float(m.group(3))
    return samples


@pytest.fixture(scope="session")
def server(trained):
    srv = Server(trained)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def cluster(trained, tmp_path_factory):
    """The dev environment's iris (A/B) and wine (shadow) pods behind the ingress + executor stand-in."""
    from cluster_pods import Cluster

    from mlops.domain.registry import default_registry

    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking_uri = default_registry(trained).tracking_uri
    running = Cluster(tmp_path_factory.mktemp("cluster"), tracking_uri)
    try:
        running.wait_ready()
        running.start_standin()
        yield running
    finally:
        running.stop()
