"""`mlops bench` (`bench/run.py`, the `bench` extra): the served system side by side with the alternatives, and how cost grows.

Load comes from compiled generators (wrk for REST, h2load for gRPC), never a
Python client competing for the cores. Systems are measured in turn, rotating
the order every round, so drift on a shared machine hits all of them alike;
every figure is the median over rounds, and ratios compare figures of one run.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib  # the bench extra: `mlops bench` without it says so before any work

from mlops.domain.registry import Registry, default_registry
from mlops.supervise.processes import free_port, stop_process, wait_for
from mlops.supervise.serve import Ports, mlserver_command, server_env
from runtimes.binary import NUMPY
from runtimes.contract import GRPC_INFER, GRPC_LISTENERS, REST_FAST_PATH
from runtimes.metrics import proc_stat

matplotlib.use("Agg")  # files, no display
PAYLOAD = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}
# The column-based model a team's own job logs (training/clinic_job.py): one input per DataFrame column.
COLUMNS_MODEL = "cancer"
COLUMNS_PAYLOAD = {"inputs": [
    {"name": "radius", "shape": [1], "datatype": "FP64", "data": [14.1]},
    {"name": "texture", "shape": [1], "datatype": "FP64", "data": [19.3]},
    {"name": "perimeter", "shape": [1], "datatype": "FP64", "data": [91.9]},
    {"name": "clinic", "shape": [1], "datatype": "BYTES", "data": ["north"]},
]}  # fmt: skip
BENCH_SPEC = """\
models:
  iris:
    variants:
      champion:   {alias: champion, weight: 80}
      challenger: {alias: challenger, weight: 20}
  cancer:
    variants:
      champion:   {alias: champion, weight: 100}
"""


class BenchError(Exception):
    pass


LOAD_GENERATORS = {"wrk": "wrk", "h2load": "nghttp2-client"}  # command: Debian package


def require_tools() -> None:
    missing = [t for t in LOAD_GENERATORS if shutil.which(t) is None]
    if missing:
        pkgs = " ".join(LOAD_GENERATORS[t] for t in missing)
        raise BenchError(f"{', '.join(missing)} not found; install the Debian package(s): apt-get install {pkgs} (or run `make bench`)")


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    port: int
    log: Path

    def pids(self) -> list[int]:
        """The process and its children (MLServer's inference workers)."""
        pids, todo = [], [self.popen.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                children = []
            todo += [int(c) for c in children]
        return pids

    def cpu_seconds(self) -> float:
        return sum(stat[0] for stat in self._stats())

    def rss_mb(self) -> float:
        return sum(stat[1] for stat in self._stats()) / 2**20

    def _stats(self) -> list[tuple[float, float]]:
        return [stat for stat in map(proc_stat, self.pids()) if stat is not None]

    def stop(self) -> None:
        stop_process(self.popen)


def stop_all(procs) -> None:
    """SIGTERM every process first, then wait for each: shutdowns overlap instead of adding up."""
    procs = list(procs)
    for p in procs:
        if p.popen.poll() is None:
            p.popen.terminate()
    for p in procs:
        p.stop()


def start(name: str, cmd: list[str], env: dict, port: int, workdir: Path) -> Proc:
    log = workdir / f"{name}.log"
    with open(log, "w") as f:
        popen = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=workdir)
    return Proc(name, popen, port, log)


def wait_ready(proc: Proc, path: str, timeout: float = 600) -> float:
    """Seconds from start until `path` answers 200."""
    t0 = time.monotonic()
    if wait_for(f"http://127.0.0.1:{proc.port}{path}", proc.popen, timeout, interval=0.2):
        return time.monotonic() - t0
    if proc.popen.poll() is not None:
        raise BenchError(f"{proc.name} exited ({proc.popen.returncode}); see {proc.log}:\n{proc.log.read_text()[-2000:]}")
    raise BenchError(f"{proc.name} not ready after {timeout:.0f}s; see {proc.log}")


def start_mlserver(name: str, settings_dir: Path, registry: Registry, workdir: Path, env: dict | None = None, stock: bool = False) -> tuple[Proc, Ports]:
    """MLServer as this project serves it (runtimes/server.py), or with stock=True as released: `mlserver start`."""
    ports = Ports(free_port(), free_port(), free_port())
    metrics_dir = tempfile.mkdtemp(prefix="metrics-", dir=workdir)
    command = [str(Path(sys.executable).with_name("mlserver")), "start", str(settings_dir)] if stock else mlserver_command(settings_dir)
    proc = start(name, command, {**server_env(registry, ports, metrics_dir), **(env or {})}, ports.http, workdir)
    return proc, ports


# ---------------------------------------------------------------- load generators


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    server_cpu: float  # cores busy in the server's processes during the run


def _load_generator(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk_ms(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        raise BenchError(f"cannot read the {pct}th percentile from wrk's output:\n{text}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def wrk(url: str, body_file: Path, connections: int, seconds: float, workdir: Path) -> tuple[float, float, float, int, int]:
    script = workdir / f"post-{body_file.stem}.lua"  # one per payload
    if not script.exists():
        script.write_text(
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = io.open({str(body_file)!r}, \'rb\'):read(\'*a\')\n'
        )
    out = _load_generator(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url])
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(m.group(1)) if m else 0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps, _wrk_ms(out, "50"), _wrk_ms(out, "99"), requests, errors


def h2load(url: str, body_file: Path, connections: int, seconds: float, workdir: Path) -> tuple[float, float, float, int, int]:
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)  # h2load appends to its log file
    out = _load_generator(
        [
            "h2load",
            "-t1",
            f"-c{connections}",
            "-m1",
            f"-D{seconds:g}",
            "--warm-up-time=1",
            "-d",
            str(body_file),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"--log-file={log}",
            url,
        ]
    )
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not m:
        raise BenchError(f"cannot read h2load's output:\n{out}")
    done, _ok, failed, errored = map(int, m.groups())
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    durations = sorted(int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.strip())
    if not durations:
        raise BenchError(f"h2load completed no request:\n{out}")
    pick = lambda q: durations[min(len(durations) - 1, int(q * len(durations)))]  # noqa: E731
    return rps, pick(0.50), pick(0.99), done, failed + errored


def grpc_body(model: str) -> bytes:
    """One length-prefixed ModelInferRequest as tritonclient's gRPC client sends it: tensors in raw_input_contents."""
    import numpy as np
    from mlserver.grpc import dataplane_pb2 as pb

    tensor = PAYLOAD["inputs"][0]
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])],
        raw_input_contents=[np.asarray(tensor["data"], dtype=NUMPY[tensor["datatype"]]).tobytes()],
    )
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def grpc_predict(port: int, model: str) -> list:
    """Checks that the gRPC system answers before it is loaded."""
    import grpc
    import numpy as np
    from mlserver.grpc import dataplane_pb2 as pb

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            GRPC_INFER,
            request_serializer=lambda b: b,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response = call(grpc_body(model)[5:], timeout=30)
    out = response.outputs[0]
    return np.frombuffer(response.raw_output_contents[0], dtype=NUMPY[out.datatype]).tolist()


def rest_predict(port: int, model: str, body: Path) -> list:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model}/infer",
        data=body.read_bytes(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["outputs"][0]["data"]


# ---------------------------------------------------------------- systems


@dataclass
class System:
    key: str
    label: str
    proc: Proc
    url: str
    body: Path
    grpc: bool = False
    runs: dict[int, list[Run]] = field(default_factory=dict)

    def load(self, connections: int, seconds: float, workdir: Path) -> Run:
        cpu0, t0 = self.proc.cpu_seconds(), time.monotonic()
        rps, p50, p99, n, errors = (h2load if self.grpc else wrk)(self.url, self.body, connections, seconds, workdir)
        cpu = (self.proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        run = Run(rps, p50, p99, n, errors, round(cpu, 2))
        self.runs.setdefault(connections, []).append(run)
        return run

    def summary(self) -> dict:
        return {
            str(c): {
                "rps": statistics.median(r.rps for r in runs),
                "p50_ms": statistics.median(r.p50_ms for r in runs),
                "p99_ms": statistics.median(r.p99_ms for r in runs),
                "server_cpu_cores": statistics.median(r.server_cpu for r in runs),
                "errors": sum(r.errors for r in runs),
                "requests": sum(r.requests for r in runs),
                "rounds_rps": [round(r.rps, 1) for r in runs],
            }
            for c, runs in sorted(self.runs.items())
        }


def measure(systems: list[System], connections: list[int], rounds: int, seconds: float, workdir: Path, echo) -> dict:
    """Median figures per system; the order of systems rotates every round so drift hits all alike.

    Ends with one more request to each system, which is answered after those the load generator
    left in flight: MLServer stops its inference workers before its REST server, which then waits
    for ever on a request caught in between.
    """
    echo("warming up")
    for s in systems:
        s.load(max(connections), min(2, seconds), workdir)
        s.runs.clear()
    for r in range(rounds):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]
        for c in connections:
            for s in order:
                run = s.load(c, seconds, workdir)
                echo(
                    f"round {r + 1}/{rounds} {c:>3} conn. {s.label:<44} {run.rps:7.0f} req/s  p50 {run.p50_ms:6.2f} ms  "
                    f"p99 {run.p99_ms:7.2f} ms  errors {run.errors}  server cpu {run.server_cpu:.2f}"
                )
    check_answers(systems)
    return {s.key: s.summary() for s in systems}


def stock_settings(folder: Path, version: str, server_settings: dict) -> Path:
    """The same champion under MLServer's stock MLflow runtime (pyfunc and pandas per request).

    With MLServer's default server settings (d), and with this project's (d'), which tells
    the runtime's share apart from the server settings' share.
    """
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps(server_settings))
    for name, uri in (("iris", f"models:/iris/{version}"), (COLUMNS_MODEL, f"models:/{COLUMNS_MODEL}@champion")):
        (folder / name).mkdir()
        model = {"name": name, "implementation": "mlserver_mlflow.MLflowRuntime", "parameters": {"uri": uri}}
        (folder / name / "model-settings.json").write_text(json.dumps(model))
    return folder


def mlops(project: Path, *args: str, env: dict | None = None) -> float:
    """Run the real `mlops` command; seconds it took."""
    exe = Path(sys.executable).with_name("mlops")
    full_env = {**os.environ, "MLOPS_PROJECT_DIR": str(project), **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run([str(exe), *args], cwd=project, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"mlops {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.monotonic() - t0


def prepare(workdir: Path, echo) -> tuple[Path, Registry, str, Path]:
    """A project of its own: iris trained into an embedded registry and synced."""
    project = workdir / "project"
    project.mkdir()
    (project / "deployments.yaml").write_text(BENCH_SPEC)
    echo("training iris, and the example team job's column-based model, into the bench's own registry")
    mlops(project, "train", "-m", "iris")
    registry = default_registry(project)
    job = subprocess.run(
        [sys.executable, "-m", "training.clinic_job", "--model-name", COLUMNS_MODEL], cwd=project, capture_output=True, text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": registry.tracking_uri},
    )  # fmt: skip
    if job.returncode:
        raise BenchError(f"training.clinic_job failed:\n{job.stderr[-3000:]}")
    mlops(project, "sync")
    client = registry.client()
    version = client.get_model_version_by_alias("iris", "champion").version
    model_dir = Path(urllib.request.url2pathname(client.get_model_version_download_uri("iris", version).removeprefix("file://")))
    return project, registry, version, model_dir


def start_systems(
    workdir: Path, project: Path, registry: Registry, version: str, model_dir: Path, body: Path, grpc_file: Path, columns_body: Path
) -> list[System]:
    ours, ours_ports = start_mlserver("mlserver", project / "model-settings", registry, workdir)
    # the same server with one gRPC server on the port instead of several (runtimes/grpc_edge.py), side by side
    one_listener, one_listener_ports = start_mlserver("mlserver-grpc-one", project / "model-settings", registry, workdir, {GRPC_LISTENERS: "1"})
    stock, tuned = (
        start_mlserver(name, stock_settings(workdir / name, version, server_settings), registry, workdir, stock=True)[0]
        for name, server_settings in (
            ("stock-mlflow", {}),
            ("stock-mlflow-tuned", json.loads((project / "model-settings" / "settings.json").read_text())),
        )
    )
    mono_port = free_port()
    mono = start(
        "monolith",
        [
            str(Path(sys.executable).with_name("uvicorn")),
            "bench.monolith:app",
            "--port",
            str(mono_port),
            "--log-level",
            "warning",
        ],
        {**os.environ, "MODEL_DIR": str(model_dir)},
        mono_port,
        workdir,
    )
    for proc, path in (
        (ours, "/v2/health/ready"),
        (one_listener, "/v2/health/ready"),
        (stock, "/v2/health/ready"),
        (tuned, "/v2/health/ready"),
        (mono, "/docs"),
    ):
        wait_ready(proc, path)
    http = lambda p, m: f"http://127.0.0.1:{p.port}/v2/models/{m}/infer"  # noqa: E731
    grpc_url = lambda ports: f"http://127.0.0.1:{ports.grpc}{GRPC_INFER}"  # noqa: E731
    return [
        System("routed-rest", "a) routed iris, REST", ours, http(ours, "iris"), body),
        System("routed-grpc", "b) routed iris, gRPC", ours, grpc_url(ours_ports), grpc_file, grpc=True),
        System("routed-grpc-one", f"b') the same, one gRPC listener ({GRPC_LISTENERS}=1)", one_listener, grpc_url(one_listener_ports), grpc_file, grpc=True),
        System("direct-rest", "c) iris-champion direct, REST", ours, http(ours, "iris-champion"), body),
        System("stock-mlflow", "d) stock MLflowRuntime, REST", stock, http(stock, "iris"), body),
        System("stock-mlflow-tuned", "d') stock MLflowRuntime, our server settings", tuned, http(tuned, "iris"), body),
        System("monolith", "e) FastAPI monolith, REST", mono, http(mono, "iris"), body),
        System("columns-direct", f"f) {COLUMNS_MODEL}-champion (DataFrame model), REST", ours, http(ours, f"{COLUMNS_MODEL}-champion"), columns_body),
        System("columns-stock", f"g) {COLUMNS_MODEL}, stock MLflowRuntime, REST", stock, http(stock, COLUMNS_MODEL), columns_body),
    ]


def check_answers(systems: list[System]) -> None:
    """Every system gives the same prediction, before any is timed and after the load."""
    by_body: dict[str, dict] = {}
    for s in systems:
        answers = by_body.setdefault(s.body.name, {})
        if s.grpc:
            answers[s.key] = grpc_predict(int(s.url.split(":")[2].split("/")[0]), "iris")
        else:
            answers[s.key] = [int(x) for x in rest_predict(s.proc.port, s.url.rsplit("/", 2)[-2], s.body)]
    for answers in by_body.values():
        if len({json.dumps(a) for a in answers.values()}) != 1:
            raise BenchError(f"systems disagree on the benchmark payload: {answers}")


# ---------------------------------------------------------------- server settings

SWEEP = {  # name: (changes to the generated settings.json, environment)
    "chosen (model-settings/settings.json)": ({}, {}),
    f"REST fast path off ({REST_FAST_PATH}=0)": ({}, {REST_FAST_PATH: "0"}),
    "parallel_workers: 1": ({"parallel_workers": 1}, {}),
    "gzip_enabled: true": ({"gzip_enabled": True}, {}),  # the fast path steps aside for GZip
    "MLServer defaults": (None, {}),  # no settings.json: debug (access log) on, 1 worker, gzip on
}


def run_sweep(workdir: Path, project: Path, registry: Registry, body: Path, rounds: int, seconds: float, echo) -> dict:
    """The routed model under each server setting the chosen one departs from, side by side."""
    chosen = json.loads((project / "model-settings" / "settings.json").read_text())
    systems = []
    try:
        for i, (name, (change, env)) in enumerate(SWEEP.items()):
            folder = workdir / f"sweep-{i}"
            shutil.copytree(project / "model-settings", folder)
            (folder / "settings.json").write_text(json.dumps({} if change is None else {**chosen, **change}))
            proc, _ = start_mlserver(f"sweep-{i}", folder, registry, workdir, env)
            systems.append(System(f"sweep-{i}", name, proc, f"http://127.0.0.1:{proc.port}/v2/models/iris/infer", body))
        for s in systems:
            wait_ready(s.proc, "/v2/health/ready")
        load = measure(systems, [8, 64], rounds, seconds, workdir, echo)
    finally:
        stop_all(s.proc for s in systems)
    return {s.label: load[s.key] for s in systems}


# ---------------------------------------------------------------- scale


def register_copies(registry: Registry, source_dir: Path, count: int) -> list[str]:
    """`count` registered models, each @champion on a copy of the iris champion artifact."""
    client = registry.client()
    names = [f"m{i:03d}" for i in range(count)]
    for name in names:
        client.create_registered_model(name)
        mv = client.create_model_version(name, source=source_dir.as_uri())
        client.set_registered_model_alias(name, "champion", mv.version)
    return names


def ready_models(port: int) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/repository/index", data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return sum(1 for m in json.loads(r.read()) if m.get("state") == "READY")


def scale_project(workdir: Path, names: list[str]) -> Path:
    project = workdir / f"scale-{len(names)}"
    project.mkdir()
    lines = ["models:"] + [f"  {n}:\n    variants:\n      champion: {{alias: champion, weight: 100}}" for n in names]
    (project / "deployments.yaml").write_text("\n".join(lines) + "\n")
    return project


def run_scale(workdir: Path, registry: Registry, model_dir: Path, seconds: float, rounds: int, body: Path, echo) -> dict:
    echo("registering 100 models for the scale runs")
    names = register_copies(registry, model_dir, 100)
    env = {"MLFLOW_TRACKING_URI": registry.tracking_uri}
    projects = {n: scale_project(workdir, names[:n]) for n in (1, 10, 50, 100)}
    result: dict = {"sync_seconds": {}, "serving": {}}
    for n, project in projects.items():
        took = mlops(project, "sync", env=env)
        if n in (10, 100):
            result["sync_seconds"][str(n)] = round(took, 2)
            echo(f"  mlops sync of {n} models: {took:.1f} s")
    servers = {}
    for n in (1, 10, 50):
        proc, _ = start_mlserver(f"scale-{n}", projects[n] / "model-settings", registry, workdir)
        ready = wait_ready(proc, "/v2/health/ready")
        time.sleep(2)  # let start-up allocations settle
        if (loaded := ready_models(proc.port)) != 2 * n:  # a router and its variant per spec model
            raise BenchError(f"{proc.name}: {loaded} of {2 * n} models ready; see {proc.log}")
        servers[n] = proc
        result["serving"][str(n)] = {"models": n, "ready_seconds": round(ready, 2), "rss_mb": round(proc.rss_mb(), 1)}
        echo(f"  {n} model(s): ready in {ready:.1f} s, resident {proc.rss_mb():.0f} MB")
    servers.pop(10).stop()
    result["mb_per_additional_model"] = round((result["serving"]["50"]["rss_mb"] - result["serving"]["1"]["rss_mb"]) / 49, 2)
    pair = [System(f"one-of-{n}", f"m000 with {n} model(s) loaded", p, f"http://127.0.0.1:{p.port}/v2/models/m000/infer", body) for n, p in servers.items()]
    try:
        load = measure(pair, [8], rounds, seconds, workdir, echo)
    finally:
        stop_all(servers.values())
    result["throughput_8_connections"] = {k: v["8"] for k, v in load.items()}
    return result


# ---------------------------------------------------------------- soak

SOAK_CONNECTIONS = 8
SOAK_SLICE_SECONDS = 60  # throughput is compared minute by minute
SOAK_WARMUP_SECONDS = 10
SOAK_MEMORY = "soak: resident memory at the end vs the start"
SOAK_THROUGHPUT = "soak: throughput in the last minute vs the first"
SOAK_ERRORS = "soak: failed requests (non-2xx, socket errors)"


def run_soak(system: System, seconds: int, workdir: Path, echo) -> dict:
    """The routed model under steady load for `seconds`, in back-to-back slices of a minute.

    Memory is read after a warm-up, so first-request allocations do not count as growth;
    a leak shows as resident memory rising slice after slice, wear as throughput falling.
    """
    count = max(2, round(seconds / SOAK_SLICE_SECONDS))
    slice_seconds = max(1, round(seconds / count))  # wrk takes whole seconds
    warmup = min(SOAK_WARMUP_SECONDS, slice_seconds)
    load_average = Path("/proc/loadavg").read_text().split()[:3]
    echo(
        f"soak: {system.label}, {SOAK_CONNECTIONS} connections, {count} x {slice_seconds} s after {warmup} s of warm-up (load average {' '.join(load_average)})"
    )
    _, _, _, warm_requests, warm_errors = wrk(system.url, system.body, SOAK_CONNECTIONS, warmup, workdir)
    rss_start = system.proc.rss_mb()
    slices = []
    for i in range(count):
        cpu0, t0 = system.proc.cpu_seconds(), time.monotonic()
        rps, p50, p99, n, errors = wrk(system.url, system.body, SOAK_CONNECTIONS, slice_seconds, workdir)
        cpu = (system.proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        slices.append(
            {
                "rps": round(rps, 1),
                "p50_ms": p50,
                "p99_ms": p99,
                "requests": n,
                "errors": errors,
                "server_cpu_cores": round(cpu, 2),
                "rss_mb": round(system.proc.rss_mb(), 1),
            }
        )
        echo(
            f"soak {i + 1}/{count} {rps:7.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  errors {errors}  "
            f"server cpu {cpu:.2f}  resident {slices[-1]['rss_mb']:.1f} MB"
        )
    return {
        "system": system.key, "connections": SOAK_CONNECTIONS, "seconds": count * slice_seconds, "slice_seconds": slice_seconds,
        "warmup_seconds": warmup, "load_average_at_start": [float(x) for x in load_average],
        "rss_mb_start": round(rss_start, 1), "rss_mb_end": slices[-1]["rss_mb"],
        "rps_first": slices[0]["rps"], "rps_last": slices[-1]["rps"],
        "requests": warm_requests + sum(s["requests"] for s in slices),
        "errors": warm_errors + sum(s["errors"] for s in slices),  # the warm-up's count too
        "slices": slices,
    }  # fmt: skip


# ---------------------------------------------------------------- report


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) // 1024 // 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "mlserver": version("mlserver"),
        "mlflow": version("mlflow"),
        "scikit_learn": version("scikit-learn"),
        "load_average_at_start": os.getloadavg()[0],
    }


def verdicts(load: dict, scale: dict | None, soak: dict | None = None) -> dict:
    rps = lambda key, c: load[key][str(c)]["rps"]  # noqa: E731
    v = {}
    if "64" in load["monolith"]:
        v["routed REST at 64 connections vs FastAPI monolith"] = (rps("routed-rest", 64) / rps("monolith", 64), ">= 1.0x")
        v["router overhead vs direct variant (REST, 64 connections)"] = (1 - rps("routed-rest", 64) / rps("direct-rest", 64), "<= 5%")
        v["routed gRPC vs routed REST, 64 connections"] = (rps("routed-grpc", 64) / rps("routed-rest", 64), ">= 1.0x")
    if "8" in load["monolith"]:
        v["routed REST p99 at 8 connections"] = (load["routed-rest"]["8"]["p99_ms"], "<= 10 ms")
        v["routed gRPC vs routed REST, 8 connections"] = (rps("routed-grpc", 8) / rps("routed-rest", 8), ">= 1.0x")
        v["routed gRPC p99 at 8 connections"] = (load["routed-grpc"]["8"]["p99_ms"], "<= 10 ms")
        v["registry-native vs stock MLflowRuntime (REST, 8 connections)"] = (rps("direct-rest", 8) / rps("stock-mlflow", 8), ">= 3.0x")
        v["registry-native vs stock MLflowRuntime, same server settings"] = (rps("direct-rest", 8) / rps("stock-mlflow-tuned", 8), ">= 3.0x")
        v["DataFrame model: registry-native vs stock MLflowRuntime (REST, 8 connections)"] = (rps("columns-direct", 8) / rps("columns-stock", 8), ">= 3.0x")
    if scale:
        v["resident memory per additional model"] = (scale["mb_per_additional_model"], "<= 5 MB")
        v["mlops sync of 100 models"] = (scale["sync_seconds"]["100"], "< 10 s")
        one = scale["throughput_8_connections"]
        v["one model's throughput with 50 loaded vs with 1"] = (one["one-of-50"]["rps"] / one["one-of-1"]["rps"], ">= 0.9x")
    if soak:
        v[SOAK_MEMORY] = (soak["rss_mb_end"] / soak["rss_mb_start"] - 1, "within 5%")
        v[SOAK_THROUGHPUT] = (soak["rps_last"] / soak["rps_first"] - 1, "within 10%")
        v[SOAK_ERRORS] = (soak["errors"], "== 0")
    out = {}
    for name, (value, target) in v.items():
        op, bound = target.split()[0], float(re.match(r"[\d.]+", target.split()[1]).group())
        shown = value * 100 if target.endswith("%") else value
        ok = {">=": shown >= bound, "<=": shown <= bound, "<": shown < bound, "==": shown == bound, "within": abs(shown) <= bound}[op]
        out[name] = {"value": round(shown, 3), "target": target, "met": ok}
    return out


def chart(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    load = results["load"]
    labels = results["systems"]
    conns = sorted({int(c) for s in load.values() for c in s})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(labels)
    for i, (key, label) in enumerate(labels.items()):
        xs = [j + i * width for j in range(len(conns))]
        ax1.bar(xs, [load[key][str(c)]["rps"] for c in conns], width, label=label)
        ax2.bar(xs, [load[key][str(c)]["p99_ms"] for c in conns], width, label=label)
    for ax, title, unit in ((ax1, "Throughput (median of rounds)", "requests/s"), (ax2, "p99 latency (median of rounds)", "ms")):
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(conns))], [f"{c} conn." for c in conns])
        ax.set_title(title)
        ax.set_ylabel(unit)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"iris, one row; {m['cores']} cores, {m['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> list[str]:
    """Markdown rows for the README."""
    load = results["load"]
    conns = sorted({int(c) for s in load.values() for c in s})
    head = "| system | " + " | ".join(f"{c} conn.: req/s (x e), p50 / p99 ms" for c in conns) + " |"
    rows = [head, "|---|" + "---|" * len(conns)]
    for key, label in results["systems"].items():
        cells = []
        for c in conns:
            r, base = load[key][str(c)], load["monolith"][str(c)]["rps"]  # the DataFrame rows too: one request each
            cells.append(f"{r['rps']:.0f} ({r['rps'] / base:.2f}x), {r['p50_ms']:.1f} / {r['p99_ms']:.1f}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if results.get("server_settings_sweep"):
        sweep = results["server_settings_sweep"]
        base = sweep[next(iter(sweep))]
        rows += ["", "| server settings (routed REST) | 8 conn.: req/s (x chosen), p99 ms | 64 conn.: req/s (x chosen), p99 ms |", "|---|---|---|"]
        for name, r in sweep.items():
            rows.append(
                f"| {name} | " + " | ".join(f"{r[c]['rps']:.0f} ({r[c]['rps'] / base[c]['rps']:.2f}x), {r[c]['p99_ms']:.1f}" for c in ("8", "64")) + " |"
            )
    if soak := results.get("soak"):
        met = lambda name: f"{'yes' if results['targets'][name]['met'] else 'no'} ({results['targets'][name]['target']})"  # noqa: E731
        change = lambda a, b: f"{(b / a - 1) * 100:+.1f}%"  # noqa: E731
        per_slice = ", ".join(f"{x['rps']:.0f}" for x in soak["slices"])
        rows += [
            "",
            f"| soak: {results['systems'][soak['system']]}, {soak['connections']} conn., {soak['seconds']} s "
            f"({len(soak['slices'])} x {soak['slice_seconds']} s) | start | end | change | met |",
            "|---|---|---|---|---|",
            f"| resident memory, MB | {soak['rss_mb_start']:.1f} | {soak['rss_mb_end']:.1f} | "
            f"{change(soak['rss_mb_start'], soak['rss_mb_end'])} | {met(SOAK_MEMORY)} |",
            f"| throughput, req/s (first and last slice; every slice: {per_slice}) | "
            f"{soak['rps_first']:.0f} | {soak['rps_last']:.0f} | {change(soak['rps_first'], soak['rps_last'])} | {met(SOAK_THROUGHPUT)} |",
            f"| failed requests | | {soak['errors']} of {soak['requests']:,} | | {met(SOAK_ERRORS)} |",
        ]
    return rows


def run(out_dir: Path, rounds: int, seconds: float, connections: list[int], scale: bool, sweep: bool, soak_seconds: int = 0, echo=print) -> dict:
    """The whole benchmark; `soak_seconds` 0 leaves the soak out."""
    require_tools()
    started = time.monotonic()
    host = machine()  # the load average before the benchmark adds its own
    with tempfile.TemporaryDirectory(prefix="mlops-bench-") as tmp:
        workdir = Path(tmp)
        project, registry, version, model_dir = prepare(workdir, echo)
        body = workdir / "payload.json"
        body.write_text(json.dumps(PAYLOAD))
        grpc_file = workdir / "payload.grpc"
        grpc_file.write_bytes(grpc_body("iris"))
        columns_body = workdir / "columns.json"
        columns_body.write_text(json.dumps(COLUMNS_PAYLOAD))
        systems = start_systems(workdir, project, registry, version, model_dir, body, grpc_file, columns_body)
        routed = next(s for s in systems if s.key == "routed-rest")
        procs = {s.proc.name: s.proc for s in systems}
        try:
            check_answers(systems)
            load = measure(systems, connections, rounds, seconds, workdir, echo)
            soak_result = None
            if soak_seconds:
                stop_all(p for p in procs.values() if p is not routed.proc)  # nothing else competes for the cores
                soak_result = run_soak(routed, soak_seconds, workdir, echo)
        finally:
            stop_all(procs.values())
        sweep_result = run_sweep(workdir, project, registry, body, rounds, seconds, echo) if sweep else None
        scale_result = run_scale(workdir, registry, model_dir, seconds, rounds, body, echo) if scale else None
    results = {
        "machine": host,
        "settings": {
            "rounds": rounds,
            "seconds_per_run": seconds,
            "connections": connections,
            "payload": PAYLOAD,
            "columns_payload": COLUMNS_PAYLOAD,
            "spec": BENCH_SPEC,
            "load_generators": "wrk -t1 (REST), h2load -t1 -m1 (gRPC)",
            "soak_seconds": soak_seconds,
        },
        "systems": {s.key: s.label for s in systems},
        "load": load,
        "ratios_to_monolith": {k: {c: round(v[c]["rps"] / load["monolith"][c]["rps"], 3) for c in v} for k, v in load.items()},
        "server_settings_sweep": sweep_result,
        "scale": scale_result,
        "soak": soak_result,
        "targets": verdicts(load, scale_result, soak_result),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    errors = {k: sum(v[c]["errors"] for c in v) for k, v in load.items()}
    if soak_result:
        errors["soak"] = soak_result["errors"]
    results["failed_requests"] = errors
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    chart(results, out_dir / "throughput.png")
    (out_dir / "table.md").write_text("\n".join(table(results)) + "\n")
    return results
