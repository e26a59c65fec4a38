"""Serve an MLflow-logged scikit-learn model straight from its registry artifact.

The stock `mlserver_mlflow` runtime goes through pyfunc and pandas on every
request; this one reads the MLmodel file, loads the skops file with the trusted
types recorded there, and predicts on numpy tensors. Models of other flavors
fall back to pyfunc.

Model-settings `parameters.extra` knobs:
  skops_trusted_types: extra skops types to trust beyond those recorded in MLmodel
  allow_pickle: load pickle/cloudpickle artifacts (they run arbitrary code on load)
  predict_fn: default output when a request names none ("predict" or "predict_proba")
  max_request_values: the most tensor values (rows x features) one request may carry (default 1,000,000)
  variant: the deployment variant this instance serves, reported in each answer's `parameters.variant`
    (in a cluster every variant pod serves the public name, so the answer must say which one it is)
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math

import numpy as np
from mlserver.codecs import NumpyCodec, NumpyRequestCodec
from mlserver.errors import InferenceError, InvalidModelURI
from mlserver.model import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, Parameters
from mlserver.utils import get_model_uri

from . import feedback, metrics, signature
from .artifacts import ModelLoadError, fetch, load_estimator, read_extra, read_mlmodel, retry_later
from .batching import Coalescer
from .contract import SPEC_FILE, RuntimeExtra
from .signature import MAX_MAGNITUDE, RequestTooLarge

PREDICT = "predict"
PREDICT_PROBA = "predict_proba"
VALID_OUTPUTS = (PREDICT, PREDICT_PROBA)
# 8 MB as FP64. A REST body is parsed before any model sees it, so this bounds what a request costs
# past parsing; gRPC messages stop at grpc_max_message_length (settings.json) before that.
MAX_REQUEST_VALUES = 1_000_000
NUMERIC_DATATYPES = ("FP64", "FP32", "FP16", "INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8", "BOOL")

logger = logging.getLogger("mlserver.runtimes")


RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0


class ReportedModel(MLModel):
    """Loads through `load_model()`, reporting the outcome under the served name, and records feedback.

    A model whose first load fails stays registered and not ready, with the cause logged.
    Raising would make MLServer 1.7.1 drop the model, and at start-up stop the whole server, so
    one bad artifact would take every other model down. A failed reload still raises: MLServer
    then keeps serving the instance it has.
    """

    _loaded = False
    _feedback: feedback.Target | None = None  # set at load; None for a shadow, whose answers reach no client

    def record_feedback(self, fb: feedback.Feedback) -> int:
        """Record outcomes for one of this model's live variants (runtimes/feedback.py); the number recorded."""
        if not self._loaded:
            raise feedback.FeedbackError(f"model '{self.name}' is not ready", 503)
        if self._feedback is None:
            raise feedback.FeedbackError(f"model '{self.name}' is a shadow: its answers reach no client, so it takes no feedback", 404)
        return self._feedback.record(fb)

    def _feedback_answer(self, payload: InferenceRequest) -> InferenceResponse | None:
        """The answer to feedback sent as an inference request; None for an inference request."""
        fb = feedback.Feedback.of_inference(payload)
        if fb is None:
            return None
        # Istio mirrors every request to a shadow's pod too: the copy is answered, and not counted twice.
        recorded = 0 if self._feedback is None and self._loaded else self.record_feedback(fb)
        return feedback.answer(self.name, recorded, payload.id)

    async def load_model(self) -> None:
        raise NotImplementedError

    async def load(self) -> bool:
        reload = metrics.loaded_instances(self.name) > 0
        try:
            await metrics.tracked_load(self.name, self.load_model())
        except Exception as exc:
            if reload:
                raise
            if retry_later(exc):
                metrics.model_metrics().ready.labels(self.name).set(0)
                self._retry = asyncio.get_running_loop().create_task(self._load_when_the_registry_answers(exc))
                return False
            logger.error("model '%s' failed to load and stays not ready: %s", self.name, exc)
            metrics.model_metrics().ready.labels(self.name).set(0)
            return False
        self._loaded = True
        return True

    async def _load_when_the_registry_answers(self, exc: Exception) -> None:
        """Not ready meanwhile (a pod's readiness probe fails, it is not restarted); ready once loaded."""
        delay, tries = RETRY_FIRST_S, 1
        while True:
            logger.warning("model '%s' not ready, try %d failed: %s; trying again in %.0f s", self.name, tries, exc, delay)
            await asyncio.sleep(delay)
            tries += 1
            try:
                await metrics.tracked_load(self.name, self.load_model())
            except Exception as again:  # noqa: BLE001 - logged: reachable but unloadable stays not ready
                if retry_later(again):
                    exc, delay = again, min(delay * 2, RETRY_MAX_S)
                    continue
                logger.error("model '%s' failed to load and stays not ready: %s", self.name, again)
                return
            self._loaded = self.ready = True
            logger.info("model '%s' loaded on try %d and is ready", self.name, tries)
            return

    async def is_ready(self) -> bool:
        return self._loaded

    async def unload(self) -> bool:
        retry = getattr(self, "_retry", None)
        if retry is not None:
            retry.cancel()
        if self._loaded:
            metrics.model_unloaded(self.name)
        return True


class RegistrySKLearnRuntime(ReportedModel):
    async def load_model(self) -> None:
        """Load without reporting readiness: a router loads its variants this way, under its own name."""
        extra = read_extra(RuntimeExtra, self.settings.parameters.extra if self.settings.parameters else None, f"model '{self.name}'")
        try:
            uri = await get_model_uri(self.settings)
        except InvalidModelURI:
            raise ModelLoadError(f"model artifact not found at {self.settings.parameters.uri}") from None
        model_dir = fetch(uri)
        registered = extra.registered_model
        self._model = load_estimator(
            model_dir,
            extra_trusted=extra.skops_trusted_types,
            allow_pickle=extra.allow_pickle,
            trust=f"{SPEC_FILE} models.{registered}.trust" if registered else "parameters.extra",
        )
        self._default_output = extra.predict_fn or PREDICT
        self._variant = extra.variant
        self._max_values = extra.max_request_values or MAX_REQUEST_VALUES
        self._n_features = getattr(self._model, "n_features_in_", None)
        self._has_proba = hasattr(self._model, PREDICT_PROBA)
        mlmodel = read_mlmodel(model_dir) or {}
        columns = signature.parse_columns(mlmodel)
        self._columns = signature.ColumnDecoder(columns, self._max_values) if columns else None
        self._coalescer = Coalescer(self._model, prepare=self._columns.frame if self._columns else None, name=self.name)
        self.inputs = signature.column_metadata(columns) if columns else signature.tensor_metadata(mlmodel)
        classes = getattr(self._model, "classes_", None)
        self.outputs = signature.output_metadata(mlmodel, self._has_proba, classes)
        if not extra.shadow:
            own = [extra.variant] if extra.variant else []
            self._feedback = feedback.Target(
                model=registered or self.name,
                variants=tuple(extra.live_variants or own),
                classes=tuple(classes.tolist()) if classes is not None else None,
            ).publish()
        self._settings.platform = "sklearn" if "sklearn" in (mlmodel.get("flavors") or {}) else "mlflow_pyfunc"
        self._settings.versions = [self.version] if self.version else []
        # A full collection walks every object that MLflow, pandas and scikit-learn allocated on
        # import: 200+ ms here, stalling every request in flight. What is alive now lives as long
        # as the model, so the collector stops visiting it.
        gc.collect(1)
        gc.freeze()

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if payload.parameters is not None and (answer := self._feedback_answer(payload)) is not None:
            return answer
        return await self.answer(payload)

    async def answer(self, payload: InferenceRequest) -> InferenceResponse:
        """The prediction for an inference request; the router calls it after telling feedback apart itself."""
        names = [o.name for o in payload.outputs] if payload.outputs else [self._default_output]
        for name in names:
            if name not in VALID_OUTPUTS:
                raise InferenceError(f"unknown output '{name}'; this model offers {', '.join(self._outputs())}")
            if name == PREDICT_PROBA and not self._has_proba:
                raise InferenceError(f"output '{PREDICT_PROBA}' is not offered by this model (a regressor, or a model without it); ask for '{PREDICT}'")
        X = self._columns.decode(payload) if self._columns else self._features(payload)
        results = await self._coalescer.predict(tuple(names), X)
        outputs = [NumpyCodec.encode_output(name, y) for name, y in zip(names, results, strict=True)]
        response = InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs)
        if self._variant:
            response.parameters = Parameters(variant=self._variant)
        return response

    def _outputs(self) -> list[str]:
        return [PREDICT, PREDICT_PROBA] if self._has_proba else [PREDICT]

    def _features(self, payload: InferenceRequest) -> np.ndarray:
        if len(payload.inputs) != 1:
            raise InferenceError(f"expected exactly one input tensor of rows x features, got {len(payload.inputs)}")
        inp = payload.inputs[0]
        datatype = signature.datatype_of(inp)
        if datatype not in NUMERIC_DATATYPES:
            raise InferenceError(f"input '{inp.name}' has datatype {datatype!r}; this model takes numbers ({', '.join(NUMERIC_DATATYPES)})")
        if any(d < 0 for d in inp.shape):
            raise InferenceError(f"input '{inp.name}' has a negative dimension in shape {list(inp.shape)}")
        if (size := math.prod(inp.shape)) > self._max_values:
            raise RequestTooLarge(
                f"request too large: input '{inp.name}' has shape {list(inp.shape)}, {size:,} values; this model takes at most "
                f"{self._max_values:,} values per request (parameters.extra.max_request_values): send smaller batches"
            )
        try:
            X = NumpyRequestCodec.decode_request(payload)
        except Exception as exc:  # noqa: BLE001 - codec errors become client errors
            raise InferenceError(f"cannot decode input '{inp.name}': {exc}") from None
        if X.dtype.kind not in "fiub":
            raise InferenceError(f"input '{inp.name}' must be numeric, got datatype {datatype}")
        if X.dtype == np.float16:  # scikit-learn would compute in it, and overflow past 65504
            X = X.astype(np.float64)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2:
            raise InferenceError(f"input '{inp.name}' must have shape [rows, features], got {list(X.shape)}")
        if self._n_features is not None and X.shape[1] != self._n_features:
            raise InferenceError(f"input '{inp.name}' has {X.shape[1]} features per row, the model expects {self._n_features}")
        if X.shape[0] == 0:
            raise InferenceError(f"input '{inp.name}' has no rows")
        if X.dtype.kind == "f" and X.size and not np.abs(X).max() <= MAX_MAGNITUDE:  # one pass: NaN compares false
            finite = np.isfinite(X).all(axis=1)
            if not finite.all():
                raise InferenceError(
                    f"input '{inp.name}' contains NaN or Inf (null over REST), first in row {int(np.argmin(finite))}; the model needs finite numbers"
                )
            raise InferenceError(f"input '{inp.name}' has a value beyond ±{MAX_MAGNITUDE:.4g}, which the model cannot represent")
        return X
