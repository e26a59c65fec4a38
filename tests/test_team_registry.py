"""The team registry: `mlops registry-server` on real PostgreSQL and MariaDB, with basic auth and proxied artifacts.

Each backend gets a freshly created database, dropped afterwards, and one server that
every test of that backend shares. Concurrent training is checked against the server
and against the embedded SQLite registry.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import MLOPS, free_port, mlops, new_project, stop_group
from training.catalog import JOBS

CANDIDATES = len(JOBS["iris"].candidates)  # versions one `mlops train -m iris` registers
PASSWORD = f"team-{secrets.token_hex(8)}"  # made up per run: no password lives in the repo
IRIS_SPEC = """\
models:
  iris:
    variants:
      champion:   {alias: champion, weight: 80}
      challenger: {alias: challenger, weight: 20}
"""
BACKENDS = {
    "postgres": ("PostgreSQL", "127.0.0.1:5432 (user postgres, trust auth)", "sudo service postgresql start"),
    "mariadb": ("MariaDB", "127.0.0.1:3306 (user root, empty password)", "sudo service mariadb start"),
}


def _admin_connection(backend: str):
    name, where, start = BACKENDS[backend]
    try:
        if backend == "postgres":
            import psycopg2

            conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5)
            conn.autocommit = True
            return conn
        import pymysql

        return pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", connect_timeout=5, autocommit=True)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{name} is not reachable at {where}: {str(exc).strip().splitlines()[0]}\nstart it with `{start}`", pytrace=False)


@contextlib.contextmanager
def scratch_database(backend: str):
    """A database of its own for one server, dropped afterwards; yields its URI."""
    db = f"mlops_test_{secrets.token_hex(4)}"
    conn = _admin_connection(backend)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {db}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{db}" if backend == "postgres" else f"mysql+pymysql://root@127.0.0.1:3306/{db}"
    finally:
        conn = _admin_connection(backend)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {db}" + (" WITH (FORCE)" if backend == "postgres" else ""))
        conn.close()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLOPS_"))}
    return {**env, **extra}


@dataclass
class Team:
    backend: str
    url: str
    home: Path  # the server's project folder: .mlops/registry-server holds artifacts and the auth DB
    log: Path

    @property
    def login(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD}

    @property
    def artifacts(self) -> Path:
        return self.home / ".mlops/registry-server/artifacts"

    def get(self, path: str, user: str | None = "admin", password: str = PASSWORD) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path)
        if user:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""
        except OSError:  # not listening yet
            return 0, b""

    def versions(self) -> set[int]:
        status, body = self.get("/api/2.0/mlflow/model-versions/search?filter=name%3D%27iris%27&max_results=1000")
        assert status == 200, status
        return {int(v["version"]) for v in json.loads(body).get("model_versions", [])}


@pytest.fixture(scope="module", params=list(BACKENDS))
def team(request, tmp_path_factory):
    with scratch_database(request.param) as uri:
        home = tmp_path_factory.mktemp(f"team-{request.param}")
        port = free_port()
        log = home / "server.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [MLOPS, "registry-server", "--backend-store-uri", uri, "--port", str(port), "--workers", "2"],
                cwd=home, env=clean_env(MLOPS_PROJECT_DIR=str(home), MLOPS_REGISTRY_ADMIN_PASSWORD=PASSWORD),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            server = Team(request.param, f"http://127.0.0.1:{port}", home, log)
            deadline = time.monotonic() + 180
            while server.get("/health", user=None)[0] != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"registry server on {request.param} did not come up:\n{log.read_text()}")
                time.sleep(0.5)
            yield server
        finally:
            stop_group(proc)


def trained_versions(output: str) -> dict[str, tuple[int, str | None]]:
    """`mlops train` output -> {candidate: (version, alias)}."""
    found = re.findall(r"^\s*iris v(\d+) (\S+): score=\S+(?: @(\w+))?$", output, re.M)
    return {cand: (int(v), alias or None) for v, cand, alias in found}


def train_concurrently(project: Path, jobs: int, env: dict[str, str], while_running=None) -> list[tuple[int, str, str]]:
    """Start `jobs` x `mlops train -m iris` at once; returns (exit code, stdout, stderr) of each."""
    logs = [(project / f"job{i}.out", project / f"job{i}.err") for i in range(jobs)]
    procs = []
    for out, err in logs:
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(
                subprocess.Popen(
                    [MLOPS, "train", "-m", "iris"], cwd=project, env=clean_env(MLOPS_PROJECT_DIR=str(project), **env),
                    stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                )  # fmt: skip
            )
    try:
        if while_running:
            while_running(procs, [err for _, err in logs])
        for proc in procs:
            proc.wait(timeout=300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [(proc.returncode, out.read_text(), err.read_text()) for proc, (out, err) in zip(procs, logs)]


@pytest.fixture(scope="module")
def four_jobs(team, tmp_path_factory):
    """Four training jobs that register versions of the same model on the team server at once."""
    project = new_project(tmp_path_factory.mktemp(f"client-{team.backend}"), IRIS_SPEC)
    return project, train_concurrently(project, 4, team.login)


def test_concurrent_jobs_register_distinct_versions(team, four_jobs):
    _, results = four_jobs
    for code, stdout, stderr in results:
        assert code == 0, f"{stdout}\n{stderr}"
    reported = [v for _, _, stderr in results for v, _ in trained_versions(stderr).values()]
    assert len(reported) == 4 * CANDIDATES and len(set(reported)) == len(reported), reported
    assert team.versions() == set(reported)


def test_sync_and_fetch_through_the_team_registry(team, four_jobs):
    project, _ = four_jobs
    mlops(project, "sync", env=team.login, check=True)
    assert not (project / ".mlops").exists(), "the client wrote into an embedded registry"
    status, body = team.get("/api/2.0/mlflow/registered-models/get?name=iris")
    assert status == 200, status
    aliases = {a["alias"]: a["version"] for a in json.loads(body)["registered_model"]["aliases"]}
    for variant in ("champion", "challenger"):
        params = json.loads((project / f"model-settings/iris-{variant}/model-settings.json").read_text())["parameters"]
        assert (params["uri"], params["version"]) == (f"models:/iris/{aliases[variant]}", aliases[variant])
    assert len(list(team.artifacts.rglob("MLmodel"))) == 4 * CANDIDATES, "artifacts are not in the server's proxied store"

    # The runtime imports MLServer, which cannot share this process with tritonclient.grpc.
    code = (
        "import sys; from runtimes.registry_sklearn import fetch, load_estimator\n"
        "path = fetch(sys.argv[1], sys.argv[2]); print(path)\n"
        "print(load_estimator(path).predict([[5.1, 3.5, 1.4, 0.2]]).tolist())"
    )
    uri = f"models:/iris/{aliases['champion']}"
    fetched = subprocess.run(
        [sys.executable, "-c", code, uri, team.url], env=clean_env(**team.login), capture_output=True, text=True, timeout=120
    )
    assert fetched.returncode == 0, fetched.stderr
    path, prediction = fetched.stdout.strip().splitlines()[-2:]
    assert not Path(path).is_relative_to(team.artifacts), "read from the server's disk, not through the proxy"
    assert prediction == "[0]"


def test_requests_without_a_valid_login_are_refused(team, tmp_path):
    for path in ("/api/2.0/mlflow/registered-models/search", "/api/2.0/mlflow-artifacts/artifacts"):
        assert team.get(path, user=None)[0] == 401, path
        assert team.get(path, password="not-the-password")[0] == 401, path
    assert team.get("/api/2.0/mlflow/registered-models/search")[0] == 200

    project = new_project(tmp_path / "client", IRIS_SPEC)
    proc = mlops(project, "sync", env={"MLFLOW_TRACKING_URI": team.url})
    assert proc.returncode != 0
    assert "401" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_embedded_registry_runs_concurrent_jobs_in_turn(tmp_path):
    project = new_project(tmp_path / "project", IRIS_SPEC)
    (project / ".mlops").mkdir()
    waiting = "waiting for another training job on the embedded registry"

    def release_once_both_wait(procs, errs):
        """Hold the lock as an earlier job would, so both jobs start out waiting, then let them go."""
        deadline = time.monotonic() + 120
        while not all(waiting in err.read_text() for err in errs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                break  # the assertions below say what went wrong
            time.sleep(0.2)
        fcntl.flock(lock, fcntl.LOCK_UN)

    with open(project / ".mlops/train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = train_concurrently(project, 2, {}, while_running=release_once_both_wait)
    for code, stdout, stderr in results:
        assert "database is locked" not in stderr, stderr
        assert code == 0, f"{stdout}\n{stderr}"
        assert waiting in stderr, stderr
    reported = sorted(v for _, _, stderr in results for v, _ in trained_versions(stderr).values())
    assert reported == list(range(1, 2 * CANDIDATES + 1))


def test_refuses_to_start_insecurely(tmp_path):
    def start(*args: str, **env: str):
        return subprocess.run(
            [MLOPS, "registry-server", "--backend-store-uri", "postgresql://postgres@127.0.0.1:5432/postgres", *args],
            cwd=tmp_path, env=clean_env(MLOPS_PROJECT_DIR=str(tmp_path), **env),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    open_to_all = start("--host", "0.0.0.0", "--no-auth")
    assert open_to_all.returncode != 0
    assert "refusing to serve the registry without authentication on 0.0.0.0" in open_to_all.stderr, open_to_all.stderr

    no_password = start("--port", str(free_port()))
    assert no_password.returncode != 0
    assert "set MLOPS_REGISTRY_ADMIN_PASSWORD" in no_password.stderr, no_password.stderr

    weak = start("--port", str(free_port()), MLOPS_REGISTRY_ADMIN_PASSWORD="short")
    assert weak.returncode != 0 and "at least 12 characters" in weak.stderr, weak.stderr
    assert "Traceback" not in open_to_all.stderr + no_password.stderr + weak.stderr
