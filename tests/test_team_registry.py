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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MLOPS, free_port, mlops, new_project, stop_group
from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModelAlias

from training.catalog import JOBS
from training.train import ALIASES

CANDIDATES = len(JOBS["iris"].candidates)  # versions one `mlops train -m iris` registers
ROUNDS, JOBS_PER_ROUND = 5, 2  # rounds of jobs that set the same aliases at the same moment
AUTH_CACHE_SECONDS = 60  # as a team with request-heavy jobs runs it; failed logins are checked every time
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


def _admin_connection(backend: str, database: str | None = None, autocommit: bool = True):
    name, where, start = BACKENDS[backend]
    try:
        if backend == "postgres":
            import psycopg2

            conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=database or "postgres", connect_timeout=5)
            conn.autocommit = autocommit
            return conn
        import pymysql

        return pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", database=database, connect_timeout=5, autocommit=autocommit)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{name} is not reachable at {where}: {str(exc).strip().splitlines()[0]}\nstart it with `{start}`", pytrace=False)


@contextlib.contextmanager
def scratch_database(backend: str):
    """A database of its own for one server, dropped afterwards; yields its name and URI."""
    db = f"mlops_test_{secrets.token_hex(4)}"
    conn = _admin_connection(backend)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {db}")
    try:
        yield db, f"postgresql://postgres@127.0.0.1:5432/{db}" if backend == "postgres" else f"mysql+pymysql://root@127.0.0.1:3306/{db}"
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
    database: str
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
        return self.call("GET", path, user=user, password=password)

    def call(self, method: str, path: str, body: dict | None = None, user: str | None = "admin", password: str = PASSWORD) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
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
        return {v for model, v in self.all_versions() if model == "iris"}

    def all_versions(self) -> set[tuple[str, int]]:
        status, body = self.get("/api/2.0/mlflow/model-versions/search?max_results=1000")
        assert status == 200, status
        return {(v["name"], int(v["version"])) for v in json.loads(body).get("model_versions", [])}

    def aliases(self) -> dict[tuple[str, str], int]:
        """(model, alias) -> version, for every registered model."""
        status, body = self.get("/api/2.0/mlflow/registered-models/search?max_results=1000")
        assert status == 200, status
        return {(m["name"], a["alias"]): int(a["version"]) for m in json.loads(body).get("registered_models", []) for a in m.get("aliases", [])}


@pytest.fixture(scope="module", params=list(BACKENDS))
def team(request, tmp_path_factory):
    with scratch_database(request.param) as (database, uri):
        home = tmp_path_factory.mktemp(f"team-{request.param}")
        port = free_port()
        log = home / "server.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [MLOPS, "registry-server", "--backend-store-uri", uri, "--port", str(port), "--workers", "2",
                 "--auth-cache-seconds", str(AUTH_CACHE_SECONDS)],
                cwd=home, env=clean_env(MLOPS_PROJECT_DIR=str(home), MLOPS_REGISTRY_ADMIN_PASSWORD=PASSWORD),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            server = Team(request.param, database, f"http://127.0.0.1:{port}", home, log)
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
                    [MLOPS, "train", "-m", "iris"],
                    cwd=project,
                    env=clean_env(MLOPS_PROJECT_DIR=str(project), **env),
                    stdin=subprocess.DEVNULL,
                    stdout=o,
                    stderr=e,
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
    return [(proc.returncode, out.read_text(), err.read_text()) for proc, (out, err) in zip(procs, logs, strict=True)]


ALIAS_TABLE = SqlRegisteredModelAlias.__tablename__  # its unique key is what two jobs' alias writes race on


@dataclass
class HeldAliases:
    waiting: Callable[[], int]  # alias inserts held back now
    release: Callable[[], None]
    all_waited: bool = False

    def release_once_all_wait(self, procs: list[subprocess.Popen], errs: list[Path]) -> None:
        """For train_concurrently: let go once every job waits on its alias insert (or one has exited)."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            if self.waiting() >= len(procs):
                self.all_waited = True
                break
            time.sleep(0.1)
        self.release()  # also when the jobs did not get there: the test says so


@contextlib.contextmanager
def alias_writes_held(team: Team):
    """Hold back every alias insert on the team database, until released.

    A job setting an alias that does not exist yet looks for its row, finds none and inserts one.
    Held here, every job of a round gets that far and waits; released, they all insert at once,
    as jobs that finish together do, and all but one meet the row another just inserted.
    PostgreSQL: the table locked in SHARE mode, which lets reads through. MariaDB takes a metadata
    lock on the alias table for any write to registered_models (its foreign key's parent), so a lock
    on the table would hold the jobs' version registration too: there a trigger on insert waits
    for a named lock instead.
    """
    holder = _admin_connection(team.backend, team.database, autocommit=team.backend != "postgres")
    watcher = _admin_connection(team.backend, team.database)
    if team.backend == "postgres":
        hold, release, undo = [f"LOCK TABLE {ALIAS_TABLE} IN SHARE MODE"], holder.commit, []
        waiting = (
            f"SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO {ALIAS_TABLE}%'"
        )
    else:
        lock = f"{team.database}.{ALIAS_TABLE}"  # named locks are server-wide
        hold = [
            f"CREATE TRIGGER hold_alias_inserts BEFORE INSERT ON {ALIAS_TABLE} FOR EACH ROW BEGIN DO GET_LOCK('{lock}', 300); DO RELEASE_LOCK('{lock}'); END",
            f"DO GET_LOCK('{lock}', 0)",
        ]
        release, undo = lambda: holder.cursor().execute(f"DO RELEASE_LOCK('{lock}')"), ["DROP TRIGGER IF EXISTS hold_alias_inserts"]
        waiting = f"SELECT count(*) FROM information_schema.processlist WHERE state = 'User lock' AND info LIKE 'DO GET_LOCK(''{lock}''%'"

    def count() -> int:
        with watcher.cursor() as cur:
            cur.execute(waiting)
            return cur.fetchone()[0]

    with holder.cursor() as cur:
        for statement in hold:
            cur.execute(statement)
    try:
        yield HeldAliases(count, release)
    finally:
        release()
        with holder.cursor() as cur:
            for statement in undo:
                cur.execute(statement)
        holder.close()
        watcher.close()


@dataclass
class Round:
    results: list[tuple[int, str, str]]  # (exit code, stdout, stderr) of each job
    collided: bool  # every job's first alias write waited on the others' at once
    aliases: dict[tuple[str, str], int]  # after the round
    versions: set[tuple[str, int]]


@pytest.fixture(scope="module")
def alias_rounds(team, tmp_path_factory) -> tuple[Path, list[Round]]:
    """Rounds of training jobs on the team server whose alias writes are released together.

    MLflow inserts an alias row the first time a model gets that alias and updates it after; so each
    round starts from a model without aliases, as on its first training, where jobs can collide.
    """
    project = new_project(tmp_path_factory.mktemp(f"client-{team.backend}"), IRIS_SPEC)
    rounds = []
    for _ in range(ROUNDS):
        for model, alias in team.aliases():
            status, _ = team.call("DELETE", "/api/2.0/mlflow/registered-models/alias", {"name": model, "alias": alias})
            assert status == 200, status
        with alias_writes_held(team) as held:
            results = train_concurrently(project, JOBS_PER_ROUND, team.login, while_running=held.release_once_all_wait)
        rounds.append(Round(results, held.all_waited, team.aliases(), team.all_versions()))
    return project, rounds


def test_concurrent_jobs_register_distinct_versions_and_valid_aliases(team, alias_rounds):
    _, rounds = alias_rounds
    assert len(rounds) == ROUNDS
    for i, r in enumerate(rounds, 1):
        for code, stdout, stderr in r.results:
            assert code == 0, f"round {i}: a job failed\n{stdout}\n{stderr}"
        assert r.collided, f"round {i}: the jobs never all waited on their alias writes at once"
        trained = [trained_versions(stderr) for _, _, stderr in r.results]
        reported = [v for job in trained for v, _ in job.values()]
        assert len(reported) == JOBS_PER_ROUND * CANDIDATES and len(set(reported)) == len(reported), (i, reported)
        assert {("iris", v) for v in reported} <= r.versions, i
        assert {alias for _, alias in r.aliases} == set(ALIASES), (i, r.aliases)
        for (model, alias), version in r.aliases.items():
            assert (model, version) in r.versions, f"round {i}: {model}@{alias} points at version {version}, which does not exist"
            assert version in {v for job in trained for v, a in job.values() if a == alias}, (i, alias, version, trained)
    assert team.versions() == {v for r in rounds for _, _, stderr in r.results for v, _ in trained_versions(stderr).values()}


def test_sync_and_fetch_through_the_team_registry(team, alias_rounds):
    project, _ = alias_rounds
    mlops(project, "sync", env=team.login, check=True)
    assert not (project / ".mlops").exists(), "the client wrote into an embedded registry"
    status, body = team.get("/api/2.0/mlflow/registered-models/get?name=iris")
    assert status == 200, status
    aliases = {a["alias"]: a["version"] for a in json.loads(body)["registered_model"]["aliases"]}
    for variant in ("champion", "challenger"):
        params = json.loads((project / f"model-settings/iris-{variant}/model-settings.json").read_text())["parameters"]
        assert (params["uri"], params["version"]) == (f"models:/iris/{aliases[variant]}", aliases[variant])
    assert len(list(team.artifacts.rglob("MLmodel"))) == ROUNDS * JOBS_PER_ROUND * CANDIDATES, "artifacts are not in the server's proxied store"

    # The runtime imports MLServer, which cannot share this process with tritonclient.grpc.
    code = (
        "import sys; from runtimes.registry_sklearn import fetch, load_estimator\n"
        "path = fetch(sys.argv[1], sys.argv[2]); print(path)\n"
        "print(load_estimator(path).predict([[5.1, 3.5, 1.4, 0.2]]).tolist())"
    )
    uri = f"models:/iris/{aliases['champion']}"
    fetched = subprocess.run([sys.executable, "-c", code, uri, team.url], env=clean_env(**team.login), capture_output=True, text=True, timeout=120)
    assert fetched.returncode == 0, fetched.stderr
    path, prediction = fetched.stdout.strip().splitlines()[-2:]
    assert not Path(path).is_relative_to(team.artifacts), "read from the server's disk, not through the proxy"
    assert prediction == "[0]"


def test_requests_without_a_valid_login_are_refused(team, tmp_path):
    assert team.get("/api/2.0/mlflow/registered-models/search")[0] == 200  # a login checked and trusted for a while
    for path in ("/api/2.0/mlflow/registered-models/search", "/api/2.0/mlflow-artifacts/artifacts"):
        assert team.get(path, user=None)[0] == 401, path
        assert team.get(path, password="not-the-password")[0] == 401, path  # which lets no other password in

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
