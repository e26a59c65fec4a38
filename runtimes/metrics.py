"""Prometheus metrics of this project's runtimes, served on MLServer's metrics port.

Created on first use, not at import: MLServer switches prometheus_client to
multi-process mode at start-up, and only metrics created after that are
collected from its parallel workers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections import Counter as Tally
from dataclasses import dataclass
from functools import cache

from prometheus_client import Counter, Gauge, Histogram, Summary

from . import contract

# From 0.5 ms: a one-row scikit-learn prediction takes well under a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class RouterMetrics:
    requests: Counter
    latency: Histogram
    weight: Gauge
    agreement: Counter
    available: Gauge


@cache
def router_metrics() -> RouterMetrics:
    return RouterMetrics(
        requests=Counter(
            contract.ROUTER_REQUESTS,
            "Requests answered by each variant; role is live or shadow; outcome is ok, client_error, error, dropped (shadow queue full) or load_error.",
            ["model", "variant", "role", "outcome"],
        ),
        latency=Histogram(
            contract.ROUTER_LATENCY,
            "Time a variant took to answer, by role (live or shadow).",
            ["model", "variant", "role"],
            buckets=LATENCY_BUCKETS,
        ),
        weight=Gauge(
            contract.ROUTER_WEIGHT,
            "Traffic weight of each variant in percent (0 for shadows): the configured one, or with fallback "
            "the share redistributed from live variants that failed to load (which get 0).",
            ["model", "variant"],
            multiprocess_mode="mostrecent",
        ),
        agreement=Counter(
            contract.ROUTER_AGREEMENT,
            "Shadow answers compared with the live answer to the same request (agree=true/false).",
            ["model", "variant", "agree"],
        ),
        available=Gauge(
            contract.ROUTER_AVAILABLE,
            "1 if the variant loaded in its router, 0 if it failed to (the router then serves from the "
            "other live variants when the spec sets fallback, or is not ready).",
            ["model", "variant"],
            multiprocess_mode="mostrecent",
        ),
    )


@dataclass(frozen=True)
class FeedbackMetrics:
    outcomes: Counter
    abs_error: Summary
    squared_error: Summary


@cache
def feedback_metrics() -> FeedbackMetrics:
    """Outcomes per variant (runtimes/feedback.py). The errors are summaries for their `_sum` series:
    `mlops_feedback_abs_error_sum` and `mlops_feedback_squared_error_sum`, one observation per outcome."""
    return FeedbackMetrics(
        outcomes=Counter(
            contract.FEEDBACK,
            "Outcomes reported by feedback, by the variant that made the prediction: correct or incorrect (classifiers), scored (regressors).",
            ["model", "variant", "outcome"],
        ),
        abs_error=Summary(contract.FEEDBACK_ABS_ERROR, "Absolute error of a regressor's scored predictions.", ["model", "variant"]),
        squared_error=Summary(contract.FEEDBACK_SQUARED_ERROR, "Squared error of a regressor's scored predictions.", ["model", "variant"]),
    )


BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # requests per call; runtimes/batching.py MAX_ROWS caps rows at 256
BATCH_WAIT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01)


@dataclass(frozen=True)
class BatchMetrics:
    size: Histogram
    wait: Histogram


@cache
def batch_metrics() -> BatchMetrics:
    """What the runtimes' own coalescing does (runtimes/batching.py): MLServer's adaptive batching and
    its queue histograms only act with parallel workers, which the shipped settings turn off."""
    return BatchMetrics(
        size=Histogram(
            contract.BATCH_REQUESTS,
            "Requests stacked into one estimator call by the runtime's coalescing.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
        ),
        wait=Histogram(
            contract.BATCH_WAIT,
            "Time the first request of each coalesced call waited for company before the call.",
            ["model"],
            buckets=BATCH_WAIT_BUCKETS,
        ),
    )


@dataclass(frozen=True)
class ModelMetrics:
    loads: Counter
    ready: Gauge
    cpu: Gauge
    memory: Gauge


@cache
def model_metrics() -> ModelMetrics:
    # MLServer 1.7.1 exports neither model lifecycle nor process metrics (its multi-process
    # collector leaves out prometheus_client's process collector), so the runtimes do.
    return ModelMetrics(
        loads=Counter(contract.MODEL_LOADS, "Model loads in this server, by outcome (ok or error).", ["model", "outcome"]),
        ready=Gauge(contract.MODEL_READY, "1 while the model is loaded and ready in a live worker.", ["model"], multiprocess_mode="livemax"),
        cpu=Gauge(
            contract.PROCESS_CPU,
            "CPU time (user + system) of an MLServer process.",
            ["process", "pid"],
            multiprocess_mode="livemostrecent",
        ),
        memory=Gauge(
            contract.PROCESS_MEMORY,
            "Resident memory of an MLServer process.",
            ["process", "pid"],
            multiprocess_mode="livemostrecent",
        ),
    )


_loaded: Tally = Tally()  # loaded instances per model name in this process: a reload loads the new one before unloading the old


def loaded_instances(name: str) -> int:
    return _loaded[name]


async def tracked_load(name: str, load) -> None:
    """Await a runtime's load and report it under the served name, whatever the outcome."""
    try:
        await load
    except Exception:
        model_loaded(name, ok=False)
        raise
    model_loaded(name, ok=True)


def model_loaded(name: str, ok: bool) -> None:
    m = model_metrics()
    m.loads.labels(name, "ok" if ok else "error").inc()
    if ok:
        _loaded[name] += 1
        m.ready.labels(name).set(1)
        _start_process_sampler()


def model_unloaded(name: str) -> None:
    _loaded[name] = max(0, _loaded[name] - 1)
    model_metrics().ready.labels(name).set(1 if _loaded[name] else 0)


PROCESS_SAMPLE_S = 5.0
_sampler: asyncio.Task | None = None


def proc_stat(pid: int) -> tuple[float, float] | None:
    """(cpu seconds, resident bytes) from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    return (int(fields[11]) + int(fields[12])) / ticks, int(fields[21]) * page


def sample_processes() -> None:
    """This worker and its parent, the main MLServer process that serves REST and gRPC."""
    m = model_metrics()
    if multiprocessing.parent_process() is None:  # parallel_workers 0: models run in the main process
        procs = [("main", os.getpid())]
    else:
        procs = [("worker", os.getpid()), ("main", os.getppid())]
    for role, pid in procs:
        stat = proc_stat(pid)
        if stat is not None:
            m.cpu.labels(role, str(pid)).set(stat[0])
            m.memory.labels(role, str(pid)).set(stat[1])


def _start_process_sampler() -> None:
    global _sampler
    if _sampler is not None and not _sampler.done():
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return

    async def run() -> None:
        while True:
            sample_processes()
            await asyncio.sleep(PROCESS_SAMPLE_S)

    _sampler = loop.create_task(run())
