"""Coalesce concurrent predictions of one estimator into one call.

A one-row scikit-learn predict costs ~200 µs, nearly all of it input
validation that a 64-row predict pays once. Requests that reach a model within
two event-loop turns are stacked and predicted together: requests that clients
send together reach the server over more than one poll of the network, and the
second turn polls it once more. A lone request waits only for two turns of an
otherwise idle loop, microseconds, never for company. When a stacked call
fails, each request is predicted alone, so a failure stays with the request
that caused it.

MLServer's adaptive batching (`max_batch_size`) merges whole requests before a
model sees them, which would send one router's batch to a single variant; this
runs inside the model, after each request has been routed.

A request's rows are an array, or, for a model logged from a DataFrame, a dict
of one array per column; `prepare` turns the stacked rows into what the
estimator takes (the DataFrame), once per call.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import numpy as np

from .metrics import batch_metrics

MAX_ROWS = 256  # a larger pending batch is split across loop turns


def _rows(X) -> int:
    return len(next(iter(X.values()))) if isinstance(X, dict) else len(X)


def _stack(parts: list):
    if isinstance(parts[0], dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


class Coalescer:
    def __init__(self, estimator, prepare=None, name: str = ""):
        self._estimator = estimator
        self._prepare = prepare
        self._pending: dict[tuple[str, ...], list[tuple[np.ndarray | dict[str, np.ndarray], asyncio.Future]]] = defaultdict(list)
        self._rows = 0
        self._scheduled = False
        self._since = 0.0  # when the first pending request arrived
        metrics = batch_metrics()
        self._size, self._wait = metrics.size.labels(name), metrics.wait.labels(name)

    async def predict(self, methods: tuple[str, ...], X: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
        """One array per method, for the rows of X."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[methods].append((X, future))
        self._rows += _rows(X)
        if self._rows >= MAX_ROWS:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            self._since = time.perf_counter()
            loop.call_soon(loop.call_soon, self._flush)
        return await future

    def _flush(self) -> None:
        pending, self._pending, self._rows, self._scheduled = self._pending, defaultdict(list), 0, False
        waited = time.perf_counter() - self._since if self._since else 0.0
        self._since = 0.0
        for methods, items in pending.items():
            self._size.observe(len(items))
            self._wait.observe(waited)
            try:
                X = items[0][0] if len(items) == 1 else _stack([x for x, _ in items])
                results = self._predict(methods, X)
            except Exception as exc:  # noqa: BLE001 - one request's failure must stay its own
                if len(items) == 1:
                    _settle(items[0][1], exc=exc)
                else:
                    for x, future in items:
                        self._flush_one(methods, x, future)
                continue
            start = 0
            for x, future in items:
                end = start + _rows(x)
                _settle(future, [r[start:end] for r in results])
                start = end

    def _predict(self, methods: tuple[str, ...], X) -> list[np.ndarray]:
        if self._prepare is not None:
            X = self._prepare(X)
        return [np.asarray(getattr(self._estimator, m)(X)) for m in methods]

    def _flush_one(self, methods, X, future) -> None:
        try:
            _settle(future, self._predict(methods, X))
        except Exception as exc:  # noqa: BLE001
            _settle(future, exc=exc)


def _settle(future: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
    """A waiter that went away (client disconnected, request cancelled) has nothing to receive."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
