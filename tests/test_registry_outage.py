"""A server whose registry is down at start stays up and not ready, retries, and becomes ready when it answers.

In a cluster this is a pod starting while the MLflow server is down: its readiness probe fails and no
traffic reaches it, but it is not restarted in a loop; once the registry answers it becomes ready.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import Server, free_port, stop_group

from mlops.supervise.processes import answers, wait_until


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_models_load_once_the_registry_answers_without_a_restart(project):
    port = free_port()
    registry_url = f"http://127.0.0.1:{port}"
    srv = Server(project, env={"MLFLOW_TRACKING_URI": registry_url})
    registry = None
    try:
        srv.wait_for_paths(["/v2/health/live"], 120)
        time.sleep(3)  # a few tries against the closed port
        assert _status(f"http://{srv.url}/v2/health/ready") != 200
        assert _status(f"http://{srv.url}/v2/models/iris/ready") != 200
        log = srv.output()
        assert "model 'iris' not ready, try 1 failed: cannot reach the registry" in log and "trying again in" in log, log[-3000:]

        db = project / ".mlops" / "mlflow.db"
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        out = open(project / "registry.log", "w")
        registry = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=project, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        ready = wait_until(lambda: answers(f"http://{srv.url}/v2/health/ready"), 150, [registry, srv.proc], interval=1)
        assert ready or registry.poll() is None, (project / "registry.log").read_text()[-3000:]
        assert ready or srv.proc.poll() is None, "the server must not exit while it waits"
        assert ready, srv.output()[-3000:]
        assert "model 'iris' loaded on try" in srv.output()
    finally:
        if registry is not None:
            stop_group(registry)
        srv.stop()
