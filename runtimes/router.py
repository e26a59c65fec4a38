"""A/B router: one public model name (`iris`) answered by a variant chosen by weight.

The variants run inside this model, in this process: no second HTTP/gRPC hop.
Model-settings `parameters.extra.variants` (written by `mlops sync`) lists each
variant's name, registry version, uri, weight and shadow flag.

A live variant that fails to load leaves the router not ready, unless
`parameters.extra.fallback` is true (`fallback: true` in the spec): then its
weight goes to the live variants that loaded, in proportion to their weights,
and `mlops_router_variant_available` says which one is missing.

Routing: a request with a routing key (request parameter `routing_key`, or the
`x-routing-key` header / gRPC metadata) hashes into one of 10,000 buckets;
live variants own consecutive bucket ranges in spec order. So a key keeps its
variant while weights stay fixed, and moving weight between neighbouring
variants (always the case with two) moves only the keys of the moved share.
Requests without a key draw a random bucket.

Shadows get a copy of each request after the live answer is computed, through
a bounded queue served by a background task: the live path only enqueues
(microseconds), a full queue drops the copy (counted), and a shadow's failure
or slowness is recorded in metrics, never returned.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass

import numpy as np
from mlserver.errors import InferenceError
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest, InferenceResponse, MetadataModelResponse, Parameters

from . import feedback, metrics
from .artifacts import ModelLoadError, read_extra, retry_later
from .contract import RouterExtra, VariantRoute
from .registry_sklearn import RegistrySKLearnRuntime, ReportedModel

logger = logging.getLogger("mlserver.router")

BUCKETS = 10_000
ROUTING_KEY = "routing_key"
ROUTING_HEADER = "x-routing-key"
SHADOW_QUEUE = 256  # pending shadow copies per router; beyond this they are dropped, not queued
SHADOW_TIMEOUT_S = 2.0  # a shadow answer slower than this counts as an error


@dataclass
class Variant:
    name: str
    version: str
    weight: int
    shadow: bool
    model: RegistrySKLearnRuntime
    # Labelled series, looked up once at load: (ok, client_error, error, latency) live, (ok, error, dropped, latency) shadow.
    counted: tuple = ()


def bucket(key: str) -> int:
    """Stable across processes and restarts (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % BUCKETS


def routing_table(live: list[Variant]) -> list[tuple[int, Variant]]:
    """(upper bucket, variant): consecutive bucket ranges in spec order, each in proportion to its weight.

    The weights count as shares of their sum, so a failed live variant's weight (it is not in `live`)
    goes to the others in proportion; with none failed the sum is 100. `live` has some weight.
    """
    total = sum(v.weight for v in live)
    table, cumulative = [], 0
    for v in live:
        cumulative += v.weight
        table.append((cumulative * BUCKETS // total, v))
    return table


def routing_key(payload: InferenceRequest) -> str | None:
    params = payload.parameters
    if params is None:
        return None
    key = getattr(params, ROUTING_KEY, None)
    if key is None and params.headers:
        key = params.headers.get(ROUTING_HEADER)
    return None if key is None else str(key)


def agree(live: InferenceResponse, shadow: InferenceResponse) -> bool:
    """Same labels for classifiers; within 5% for numeric outputs such as regressions."""
    a, b = live.outputs[0], shadow.outputs[0]
    x, y = np.asarray(a.data.root), np.asarray(b.data.root)
    if x.shape != y.shape:
        return False
    if x.dtype.kind == "f" or y.dtype.kind == "f":
        return bool(np.allclose(x, y, rtol=0.05, atol=1e-9))
    return bool(np.array_equal(x, y))


class RouterRuntime(ReportedModel):
    async def load_model(self) -> None:
        extra = read_extra(RouterExtra, self.settings.parameters.extra, f"router '{self.name}'")
        specs, fallback = extra.variants, extra.fallback
        self._metrics = m = metrics.router_metrics()
        self._variants: list[Variant] = []
        failed = []
        for spec in specs:
            model = await self._load_variant(spec, extra, fallback)
            if model is not None:
                m.available.labels(self.name, spec.name).set(1)
                self._variants.append(Variant(spec.name, spec.version, spec.weight, spec.shadow, model))
            elif not spec.shadow:
                failed.append(spec.name)
        self._live = [v for v in self._variants if not v.shadow]
        self._shadows = [v for v in self._variants if v.shadow]
        if self._live:  # the public name takes and gives what its variants do (the first live one's signature)
            first = self._live[0].model
            self.inputs, self.outputs = first.inputs, first.outputs
            self._settings.platform = first.settings.platform
        self._settings.versions = sorted({v.version for v in self._variants}, key=lambda s: (len(s), s))
        total = sum(v.weight for v in self._live)
        if not total:
            after = f" after {', '.join(failed)} failed to load" if failed else ""
            raise ModelLoadError(f"router '{self.name}': no live variant with weight is left{after}")
        self._table = routing_table(self._live)
        own = self._live[0].model._feedback
        self._feedback = feedback.Target(self.name, tuple(s.name for s in specs if not s.shadow), own.classes if own else None).publish()
        for v in self._variants:
            m.weight.labels(self.name, v.name).set(0 if v.shadow else v.weight * 100 / total)
            # Each outcome's series from 0: Prometheus' increase() misses what a series counted before its first scrape.
            role = "shadow" if v.shadow else "live"
            outcomes = [m.requests.labels(self.name, v.name, role, o) for o in (("ok", "error", "dropped") if v.shadow else ("ok", "client_error", "error"))]
            v.counted = (*outcomes, m.latency.labels(self.name, v.name, role))
        for name in failed:
            m.weight.labels(self.name, name).set(0)
        if failed:
            logger.error(
                "router %s: serving from %s only, %s failed to load (fallback)",
                self.name,
                ", ".join(f"{v.name}={v.weight * 100 / total:g}%" for v in self._live),
                ", ".join(failed),
            )
        self._queue: asyncio.Queue | None = None

    async def _load_variant(self, spec: VariantRoute, extra: RouterExtra, fallback: bool) -> RegistrySKLearnRuntime | None:
        """The variant's model, or None when it failed to load and the router may go on without it."""
        settings = ModelSettings(
            name=f"{self.name}-{spec.name}",
            implementation=RegistrySKLearnRuntime,
            parameters=ModelParameters(uri=spec.uri, version=spec.version, extra=extra.runtime.model_dump(exclude_unset=True)),
        )
        settings._source = self.settings._source
        model = RegistrySKLearnRuntime(settings)
        try:
            await model.load_model()
        except Exception as exc:
            if retry_later(exc):
                raise  # the router as a whole tries again (ReportedModel)
            self._metrics.available.labels(self.name, spec.name).set(0)
            role = "shadow" if spec.shadow else "live"
            if role == "live" and not fallback:
                raise ModelLoadError(
                    f"router '{self.name}': live variant '{spec.name}' ({spec.uri}) failed to load: {exc} "
                    "(with fallback: true in the spec the router would serve from the other variants)"
                ) from None
            then = "shadowing disabled for it" if role == "shadow" else "its weight goes to the other live variants (fallback)"
            logger.error("router %s: %s variant %s (%s) not loaded, %s: %s", self.name, role, spec.name, spec.uri, then, exc)
            self._metrics.requests.labels(self.name, spec.name, role, "load_error").inc()
            return None
        return model

    async def metadata(self) -> MetadataModelResponse:
        """MLServer's, plus the variants in effect: `variants` (names, live first) and `weight.<name>`/`version.<name>`."""
        meta = await super().metadata()
        live, variants = getattr(self, "_live", []), getattr(self, "_variants", [])  # none before a load succeeds
        params: dict[str, str | int | bool] = {"variants": ",".join(v.name for v in sorted(variants, key=lambda v: v.shadow))}
        for v in live:
            params[f"weight.{v.name}"] = v.weight
        for v in variants:
            params[f"version.{v.name}"] = v.version
            if v.shadow:
                params[f"shadow.{v.name}"] = True
        meta.parameters = Parameters(**params)
        return meta

    def choose(self, key: str | None) -> Variant:
        b = bucket(key) if key is not None else random.randrange(BUCKETS)
        for upper, v in self._table:
            if b < upper:
                return v
        return self._table[-1][1]

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if payload.parameters is not None and (answer := self._feedback_answer(payload)) is not None:
            return answer  # for a variant, recorded here: no variant answers it, no shadow gets a copy
        variant = self.choose(routing_key(payload))
        ok, client_error, error, latency = variant.counted
        start = time.perf_counter()
        try:
            response = await variant.model.answer(payload)  # feedback was told apart above
        except InferenceError:
            client_error.inc()
            raise
        except Exception:
            error.inc()
            raise
        latency.observe(time.perf_counter() - start)
        ok.inc()
        for shadow in self._shadows:
            self._enqueue_shadow(shadow, payload, response)
        response.model_name = self.name
        response.model_version = variant.version
        params = response.parameters or Parameters()
        params.variant = variant.name  # the body says who answered: response headers would cost ~7% of throughput
        response.parameters = params
        return response

    def _enqueue_shadow(self, shadow: Variant, payload: InferenceRequest, live: InferenceResponse) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=SHADOW_QUEUE)
            self._worker = asyncio.get_running_loop().create_task(self._shadow_worker())
        try:
            self._queue.put_nowait((shadow, payload, live))
        except asyncio.QueueFull:
            _, _, dropped, _ = shadow.counted
            dropped.inc()

    async def _shadow_worker(self) -> None:
        m, queue = self._metrics, self._queue
        assert queue is not None  # created before the worker starts
        while True:
            shadow, payload, live = await queue.get()
            ok, error, _, latency = shadow.counted
            start = time.perf_counter()
            try:
                answer = await asyncio.wait_for(shadow.model.answer(payload), SHADOW_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a shadow never fails the live path
                error.inc()
                logger.debug("router %s: shadow %s failed: %s", self.name, shadow.name, exc)
                continue
            finally:
                latency.observe(time.perf_counter() - start)
            ok.inc()
            m.agreement.labels(self.name, shadow.name, str(agree(live, answer)).lower()).inc()

    async def unload(self) -> bool:
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.cancel()
        return await super().unload()
