"""SIGTERM under load: MLServer stops accepting, answers every request it accepted, and exits within the drain.

A pod's MLServer process gets SIGTERM (after the operator's preStop sleep) and is killed when the grace
period ends; `mlops serve` runs the same command as the image (runtimes/server.py) as its child. This starts `mlops serve` on free
ports, loads the routed `iris` from threads over keep-alive REST connections and tritonclient gRPC (its
defaults), sends SIGTERM to the MLServer process and keeps loading until it has exited. Every request
either was not accepted or was answered:

- not accepted: the connection was refused, or closed by the server before the client wrote on it (a
  client checks a pooled connection before reuse); a gRPC call UNAVAILABLE because it could not connect
  or its stream was refused unprocessed;
- accepted and failed: any 5xx or wrong answer, a connection closed after the request was written and
  before a full answer, and a gRPC error for a call the server started. gRPC core cancels calls that
  reach it during its shutdown before any handler sees them (runtimes/drain.py), and the client cannot
  tell those from calls cut off; the server's own count of the calls it started (the drain's last log
  line) can: it must equal the calls answered.

The load shows what clients see; three requests make sure the drain has work, by construction rather
than by timing: a REST request whose body the server is reading (it answered `100 Continue`) and a gRPC
call whose message the client holds back (the server has its headers) when SIGTERM is sent, both completed
only once new connections are refused and MLServer 1.7.1's own 5 s gRPC grace has passed; and a REST
request sent after SIGTERM on a keep-alive connection the client held.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import Server, mlserver_process
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from mlops.supervise.processes import wait_for, wait_until
from mlops.supervise.serve import LOOPBACK
from runtimes.contract import DRAIN_SECONDS, GRPC_INFER

MODEL = "iris"
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float64)
BODY = json.dumps({"inputs": [{"name": "input-0", "shape": list(ROWS.shape), "datatype": "FP64", "data": ROWS.ravel().tolist()}]}).encode()
PATH = f"/v2/models/{MODEL}/infer"
HEADERS = {"Content-Type": "application/json"}
REST_THREADS, GRPC_THREADS = 6, 3
LOAD_SECONDS = 2.0  # of load before SIGTERM, so that every connection is busy
MLSERVER_GRPC_GRACE = 5  # seconds: MLServer 1.7.1's own `server.stop(grace=5)` (mlserver/grpc/server.py 125)
HOLD_SECONDS = MLSERVER_GRPC_GRACE + 1  # after SIGTERM, before the held requests are completed
# gRPC's words for a call that never reached the server: it could not connect, or the stream was refused
# unprocessed after a GOAWAY (gRPC retries those on a new connection, which is then refused).
NOT_SENT_GRPC = ("failed to connect to all addresses", "Connection refused", "REFUSED_STREAM")
# The drain's last log line (runtimes/drain.py): MLServer's count of the gRPC calls it started.
DRAIN_SUMMARY = re.compile(r"gRPC: (\d+) calls started since start-up, (.+)")


@dataclass
class Outcome:
    protocol: str
    start: float
    end: float
    result: str  # "ok", "not accepted: ...", "unanswered: ..." (gRPC, judged by the server's count) or "failed: ..."


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, protocol: str, start: float, result: str) -> None:
        self.outcomes.append(Outcome(protocol, start, time.monotonic(), result))
        if result != "ok":
            time.sleep(0.02)  # a client that is turned away keeps trying, without starving the server


def closed_by_peer(sock: socket.socket) -> bool:
    """An idle keep-alive connection that the server closed reads as ready (EOF or reset)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def answer_problem(status: int, body: bytes) -> str | None:
    if status != 200:
        return f"HTTP {status} {body[:200]!r}"
    if len(json.loads(body)["outputs"][0]["data"]) != len(ROWS):
        return f"wrong answer {body[:200]!r}"
    return None


def rest_load(port: int, load: Load) -> None:
    """One keep-alive connection at a time, checked before reuse as pooling clients (urllib3) do."""
    conn = None
    while not load.stop.is_set():
        start = time.monotonic()
        if conn is not None and closed_by_peer(conn.sock):
            conn.close()
            conn = None
        if conn is None:
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
            try:
                conn.connect()
            except OSError as exc:
                load.add("rest", start, f"not accepted: connect: {exc!r}")
                conn = None
                continue
        try:
            conn.request("POST", PATH, BODY, HEADERS)
        except OSError as exc:  # the server had reset the connection: it read nothing of this request
            load.add("rest", start, f"not accepted: write: {exc!r}")
            conn.close()
            conn = None
            continue
        try:
            resp = conn.getresponse()
            problem = answer_problem(resp.status, resp.read())
        except (http.client.HTTPException, OSError) as exc:
            problem = f"no complete answer: {exc!r}"
            resp = None
        load.add("rest", start, f"failed: {problem}" if problem else "ok")
        if resp is None or resp.will_close:
            conn.close()
            conn = None


def grpc_load(port: int, load: Load) -> None:
    client = grpcclient.InferenceServerClient(f"{LOOPBACK}:{port}")
    inp = grpcclient.InferInput("input-0", list(ROWS.shape), "FP64")
    inp.set_data_from_numpy(ROWS)
    try:
        while not load.stop.is_set():
            start = time.monotonic()
            try:
                result = client.infer(MODEL, [inp], client_timeout=60)
            except InferenceServerException as exc:
                not_sent = exc.status() == "StatusCode.UNAVAILABLE" and any(s in exc.message() for s in NOT_SENT_GRPC)
                load.add("grpc", start, f"{'not accepted' if not_sent else 'unanswered'}: {exc.status()} {exc.message()[:160]}")
                continue
            out = result.as_numpy("predict")
            load.add("grpc", start, "ok" if out is not None and len(out) == len(ROWS) else f"failed: wrong answer {out!r}")
    finally:
        client.close()


def refused(port: int) -> bool:
    """True once nothing listens on the port.

    A connection reset is not an answer either way: the kernel completed our handshake into the
    backlog of a listener that closed before accepting it (RST to every queued connection), so the
    port was still listening when we knocked; look again.
    """
    try:
        socket.create_connection((LOOPBACK, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        pass
    return False


def wait_refused(port: int, timeout: float) -> bool:
    return wait_until(lambda: refused(port), max(timeout, 0.0), interval=0.01)


def attempt(request) -> tuple[int, bytes, str | None] | str:
    """(status, body, Connection header) of an answer, or what went wrong instead."""
    try:
        resp = request()
        return resp.status, resp.read(), resp.getheader("connection")
    except (http.client.HTTPException, OSError) as exc:
        return f"no answer: {exc!r}"


def held_grpc_call(channel: grpc.Channel, release: threading.Event) -> grpc.Future:
    """A ModelInfer call whose headers go out now and whose one message only once `release` is set:
    called as stream-unary, which on the wire is the unary call MLServer serves."""
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="input-0", datatype="FP64", shape=list(ROWS.shape))
    tensor.contents.fp64_contents.extend(ROWS.ravel().tolist())

    def message():
        release.wait()
        yield request

    grpc.channel_ready_future(channel).result(timeout=30)
    infer = channel.stream_unary(
        GRPC_INFER,
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    return infer.future(message(), timeout=60)


def grpc_outcome(call: grpc.Future) -> str:
    try:
        response = call.result()
    except grpc.RpcError as exc:
        return f"{exc.code().name} {exc.details()}"
    rows = response.outputs[0].shape[0] if response.outputs else 0
    return "ok" if rows == len(ROWS) else f"wrong answer {response}"


def raw_response(sock: socket.socket) -> http.client.HTTPResponse:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp


@pytest.fixture
def iris_server(project):
    """`mlops serve` with the project's settings.json and the routed iris (its router and both variants) only."""
    for d in (project / "model-settings").iterdir():
        if d.is_dir() and not d.name.startswith(MODEL):
            shutil.rmtree(d)
    srv = Server(project)
    try:
        assert wait_for(f"http://{srv.url}/v2/health/ready", srv.proc, 180), srv.output()
        yield srv
    finally:
        srv.stop()


def test_sigterm_under_load_answers_every_accepted_request_and_exits_within_the_drain(iris_server):
    srv = iris_server
    mlserver = mlserver_process(srv)
    load = Load()
    threads = [threading.Thread(target=rest_load, args=(srv.http, load)) for _ in range(REST_THREADS)]
    threads += [threading.Thread(target=grpc_load, args=(srv.grpc, load)) for _ in range(GRPC_THREADS)]
    reading = socket.create_connection((LOOPBACK, srv.http), timeout=60)
    idle = http.client.HTTPConnection(LOOPBACK, srv.http, timeout=60)
    release = threading.Event()
    channel = grpc.insecure_channel(f"{LOOPBACK}:{srv.grpc}")
    held = held_grpc_call(channel, release)
    for t in threads:
        t.start()
    try:
        time.sleep(LOAD_SECONDS)  # the server has long taken up the held call's headers
        # A request the server has accepted and whose body it is reading: it answered 100 Continue.
        reading.sendall(
            f"POST {PATH} HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert reading.recv(64).startswith(b"HTTP/1.1 100 "), "the server reads the request's body"
        # A keep-alive connection the client holds idle over SIGTERM, as a pooling client does.
        before = attempt(lambda: idle.request("POST", PATH, BODY, HEADERS) or idle.getresponse())
        assert not isinstance(before, str) and before[0] == 200, before

        sigterm = time.monotonic()
        os.kill(mlserver, signal.SIGTERM)
        # Stopped accepting while requests are still in progress: the held ones are, by construction.
        # (gRPC core closes its listener on its own thread after stop(): wait for each, not one after a look)
        stopped_listening = all(wait_refused(port, sigterm + HOLD_SECONDS - time.monotonic()) for port in (srv.http, srv.grpc))
        stopped_listening = stopped_listening and not held.done()
        idle_answer = attempt(lambda: idle.request("POST", PATH, BODY, HEADERS) or idle.getresponse())
        time.sleep(max(0.0, sigterm + HOLD_SECONDS - time.monotonic()))
        metrics_answer = attempt(lambda: urllib.request.urlopen(f"http://{LOOPBACK}:{srv.metrics}/metrics", timeout=10))
        release.set()
        reading_answer = attempt(lambda: reading.sendall(BODY) or raw_response(reading))
        held_answer = grpc_outcome(held)
        try:
            code = srv.proc.wait(timeout=DRAIN_SECONDS - (time.monotonic() - sigterm))
        except subprocess.TimeoutExpired:
            code = None
        exited = time.monotonic()
    finally:
        release.set()
        load.stop.set()
        for t in threads:
            t.join()
        reading.close()
        idle.close()
        channel.close()
    log = srv.output()

    outcomes = load.outcomes
    by_kind = Counter(f"{o.protocol} {o.result}" for o in outcomes if o.result != "ok")
    grpc_ok = sum(o.protocol == "grpc" and o.result == "ok" for o in outcomes) + (held_answer == "ok")
    summary = DRAIN_SUMMARY.search(log)
    started, calls_end = (int(summary.group(1)), summary.group(2)) if summary else (None, None)
    print(f"\nSIGTERM to MLServer {mlserver} under load; exited {exited - sigterm:.2f} s later with code {code}")
    for protocol in ("rest", "grpc"):
        mine = [o for o in outcomes if o.protocol == protocol]
        ok = [o for o in mine if o.result == "ok"]
        print(
            f"  {protocol}: {len(mine)} requests: {len(ok)} answered ({sum(o.start < sigterm < o.end for o in ok)} in flight "
            f"at SIGTERM, {sum(o.start > sigterm for o in ok)} sent after it), "
            + ", ".join(f"{n} {kind}" for kind in ("not accepted", "unanswered", "failed") if (n := sum(o.result.startswith(kind) for o in mine)))
        )
    print(f"  the server: {started} gRPC calls started, {calls_end}; the clients got {grpc_ok} answers")
    for what, n in by_kind.most_common():
        print(f"  {n:6d}  {what}")

    problems = []
    if code is None:
        problems.append(f"still running {DRAIN_SECONDS} s (DRAIN_SECONDS) after SIGTERM")
    elif code != 0:
        problems.append(f"exit code {code}")
    if not stopped_listening:
        problems.append("new REST and gRPC connections were not refused at once, while accepted requests were in progress")
    for what, answer in (("the REST request being read at SIGTERM", reading_answer), ("a REST request on a keep-alive connection after SIGTERM", idle_answer)):
        if isinstance(answer, str) or answer_problem(*answer[:2]):
            problems.append(f"{what}: {answer if isinstance(answer, str) else answer_problem(*answer[:2])}")
    if not isinstance(idle_answer, str) and idle_answer[2] != "close":
        problems.append("an answer during the drain left its connection open (no Connection: close)")
    if isinstance(metrics_answer, str) or metrics_answer[0] != 200:
        problems.append(f"the metrics endpoint during the drain: {metrics_answer}")
    if held_answer != "ok":
        problems.append(f"the gRPC call in progress at SIGTERM: {held_answer}")
    problems += [f"{n} accepted and failed: {what}" for what, n in by_kind.items() if " failed: " in what]
    if summary is None:
        problems.append("no drain summary in the log")
    elif calls_end != "all finished" or started != grpc_ok:
        problems.append(f"the server started {started} gRPC calls, {calls_end}; the clients got {grpc_ok} answers")
    if code is not None and not (refused(srv.http) and refused(srv.grpc) and refused(srv.metrics)):
        problems.append("something still listens after the exit")
    assert not problems, "\n".join(problems) + f"\n--- log:\n{log[-3000:]}"
