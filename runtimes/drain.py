"""Graceful shutdown of MLServer 1.7.1: on SIGTERM, stop accepting, answer what was accepted, then exit.

A pod gets SIGTERM after the operator's preStop sleep and is killed when its grace period ends;
contract.DRAIN_SECONDS is the time between the two that the manifests promise for the drain.
What MLServer 1.7.1 did with the signal (mlserver/server.py 168-190):

- gRPC first, `server.stop(grace=5)` (grpc/server.py 122-126): calls still running after 5 s were
  cancelled, long before the pod's time was up;
- REST through uvicorn's shutdown (uvicorn 0.54 server.py 281-292), which closes every keep-alive
  connection with no request in progress at once (protocols/http/httptools_impl.py 349-356): a request
  the client had just written on one was lost, the client reading a closed connection before any answer
  (wrk: "read errors");
- the inference pool before either (server.py 177-178), failing requests held by parallel workers;
- uvicorn >= 0.29 installs its own SIGINT/SIGTERM handlers around `serve()` (`capture_signals`,
  server.py 332-349), which MLServer's `install_signal_handlers` overrides (rest/server.py 14-16,
  metrics/server.py 17-19) no longer prevent: the first signal also stopped the metrics server, and each
  uvicorn server raised it again when it finished, running `stop()` three more times.

Now the server's stop (runtimes/server.py) drains once, whatever signals follow:

1. stop accepting: REST's listening sockets close and gRPC's `stop()` closes its listener and sends
   GOAWAY, both at once; new connections are refused;
2. REST: each request in progress is answered; a request that arrives on an open keep-alive connection
   is answered too, and every answer from then on says `Connection: close` (runtimes/rest.py), unless its
   headers were sent already. An idle connection closes at uvicorn's keep-alive timeout, as it would
   without the drain (one that never carried a request gets the same timeout): no connection is closed
   under a client that may be writing on it;
3. gRPC: every call started is finished, with what is left of DRAIN_SECONDS as its grace;
4. whatever is left at DRAIN_SECONDS is cancelled, and the last log line says how much; then the
   inference pool, Kafka and last the metrics server stop, and the process exits 0.

gRPC core (grpcio 1.85) cancels, unprocessed and as CANCELLED, a call it received that the asyncio
server had not taken up yet when the shutdown began, or that arrives before the client has read the
GOAWAY (grpc/grpc#41785); grpcio's Python API has nothing that prevents it. A client cannot tell such a
call from one cut off, so the last log line gives MLServer's count of the gRPC calls it started. In a
cluster the preStop sleep lets Istio stop routing to the pod before SIGTERM, so no call arrives then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

import uvicorn
from mlserver.metrics.prometheus import stop_metrics
from mlserver.server import MLServer
from prometheus_client import REGISTRY

from . import rest
from .contract import DRAIN_SECONDS

logger = logging.getLogger("mlserver")

POLL_SECONDS = 0.02


def _name(sig: int | None) -> str:
    return signal.Signals(sig).name if sig else "stop"


def _grpc_calls_started() -> int:
    """MLServer's own count (grpc_server_started_total, its PromServerInterceptor) since start-up."""
    return int(sum(s.value for m in REGISTRY.collect() for s in m.samples if s.name == "grpc_server_started_total"))


async def stop(server: MLServer, sig: int | None = None) -> None:
    """In place of MLServer.stop (mlserver/server.py 176-190), which dropped accepted requests (module
    docstring): one drain, however many signals arrive."""
    drain = server.__dict__.get("_mlops_drain")
    if drain is None:
        drain = server.__dict__["_mlops_drain"] = asyncio.ensure_future(_drain(server, sig))
    else:
        logger.info("%s: already draining", _name(sig))
    await asyncio.shield(drain)


async def _drain(server: MLServer, sig: int | None) -> None:
    rest.close_connections()
    start = time.monotonic()
    deadline = start + DRAIN_SECONDS
    uv = getattr(server._rest_server, "_server", None)
    grpc_server = getattr(server._grpc_server, "_server", None)

    for listener in getattr(uv, "servers", []):
        listener.close()
    grpc_stopped = asyncio.ensure_future(_stop_grpc(grpc_server, deadline)) if grpc_server else None
    await asyncio.sleep(0)  # gRPC's stop has closed its listener and sent GOAWAY
    answered_before = uv.server_state.total_requests if uv else 0
    logger.info(
        "%s: draining for at most %d s: new connections refused; answering the %d REST requests and the gRPC calls in progress",
        _name(sig),
        DRAIN_SECONDS,
        len(uv.server_state.tasks) if uv else 0,
    )

    cut_off = await _drain_rest(uv, deadline) if uv else 0
    grpc_finished = await grpc_stopped if grpc_stopped is not None else True
    summary = (
        f"drained in {time.monotonic() - start:.2f} s: {(uv.server_state.total_requests if uv else 0) - answered_before} "
        f"REST requests answered during the drain, {cut_off} cut off; gRPC: "
    )
    if server._settings.metrics_endpoint:  # MLServer counts gRPC calls only then (grpc/server.py 47-50)
        summary += f"{_grpc_calls_started()} calls started since start-up, "
    summary += "all finished" if grpc_finished else "those still running at the deadline cancelled"
    (logger.info if grpc_finished and not cut_off else logger.error)(summary)

    if server._inference_pool_registry:
        await server._inference_pool_registry.close()
    if server._kafka_server:
        await server._kafka_server.stop()
    if server._metrics_server:
        # As MetricsServer.stop (metrics/server.py 75-82), but not through handle_exit(sig), which has
        # uvicorn raise the signal again once serve() returns.
        await stop_metrics(server._settings, os.getpid())
        metrics = getattr(server._metrics_server, "_server", None)
        if metrics is not None:
            metrics.should_exit = True


async def _stop_grpc(grpc_server, deadline: float) -> bool:
    """gRPC's own drain (stop listening, GOAWAY, wait for the calls started); True if all finished in time."""
    await grpc_server.stop(grace=deadline - time.monotonic())
    return time.monotonic() < deadline


async def _drain_rest(uv: uvicorn.Server, deadline: float) -> int:
    """Step 2 of the module docstring, in place of uvicorn's closing of idle connections
    (httptools_impl.py 349-356), until no connection is left or the deadline; the requests cut off."""
    state = uv.server_state
    loop = asyncio.get_running_loop()
    for conn in list(state.connections):
        cycle = getattr(conn, "cycle", None)
        if cycle is not None and not cycle.response_complete:
            if not cycle.response_started:
                cycle.keep_alive = False  # uvicorn adds Connection: close to the answer
        elif getattr(conn, "timeout_keep_alive_task", False) is None:  # open, but never carried a request
            conn.timeout_keep_alive_task = loop.call_later(conn.timeout_keep_alive, conn.timeout_keep_alive_handler)  # type: ignore[union-attr]
    while (state.connections or state.tasks) and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    cut_off = len(state.tasks)
    if state.connections or state.tasks:
        for conn in list(state.connections):
            conn.shutdown()
        for task in list(state.tasks):
            task.cancel()
    uv.should_exit = True  # uvicorn's own shutdown now finds nothing left to close
    return cut_off


def _wake_loop(signum, frame) -> None:
    """Does nothing, as asyncio's `_sighandler_noop`: the signal reaches the event loop's handlers
    (MLServer's, server.py 168-174) through the loop's wakeup fd."""


def _release_signals() -> None:
    """Hand SIGINT and SIGTERM back to MLServer's handlers (server.py 168-174) where uvicorn's
    `capture_signals` (uvicorn server.py 332-349) took them past MLServer's `_NoSignalServer`
    (rest/server.py 14-16, metrics/server.py 17-19): otherwise the metrics server stops at the first
    signal and its re-raise starts uvicorn's own REST shutdown in the middle of the drain."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if isinstance(getattr(signal.getsignal(sig), "__self__", None), uvicorn.Server):
            signal.signal(sig, _wake_loop)


async def release_signals(server: MLServer) -> None:
    """Runs beside `MLServer.start`: each of its uvicorn servers (REST, metrics) takes the signals as it
    starts serving (before `started`), so give them back until all have started, then once more."""
    if threading.current_thread() is not threading.main_thread():
        return

    def serving() -> bool:
        listeners = [s for s in (server._rest_server, server._metrics_server) if s is not None]
        return all(getattr(getattr(s, "_server", None), "started", False) for s in listeners)

    while not serving():
        _release_signals()
        await asyncio.sleep(POLL_SECONDS)
    _release_signals()
