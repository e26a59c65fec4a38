"""`mlops up`, the main job: an empty registry gets trained, synced and served, and the printed request works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request

from conftest import MLOPS, free_port, new_project


def test_up_on_an_empty_embedded_registry_serves_and_prints_a_working_request(tmp_path):
    project = new_project(tmp_path / "project")
    ports = [str(free_port()) for _ in range(3)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLOPS_PROJECT_DIR"] = str(project)
    log = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen(
        [MLOPS, "up", "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]],
        cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline, text = time.monotonic() + 300, ""
        while time.monotonic() < deadline and "Ctrl-C stops the server." not in text:
            assert proc.poll() is None, f"mlops up exited {proc.returncode}:\n{text}"
            time.sleep(1)
            log.seek(0)
            text = log.read()
        assert "Ctrl-C stops the server." in text, text[-3000:]
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
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        log.close()
