"""Outcomes in: the truth about predictions a variant made, recorded as the metrics an A/B decision reads.

Feedback is stateless: it names the variant, the predictions that variant answered with and the true
values, so any process serving the model can record it (in a cluster Istio may send it to any variant's
pod; the metrics are labelled with the variant the feedback names, not the pod's). Two forms carry it:

- REST `POST /v2/models/{model}/feedback` with JSON `{"variant", "prediction": [...], "truth": [...], "id"?}`,
  answered `{"recorded": N}` (runtimes/rest.py);
- a V2 inference request to the model with the request parameter `feedback: true` and the inputs
  `variant` (BYTES, one element), `prediction` and `truth` (one element per outcome), answered with the
  output `recorded` (INT64). This is the form Seldon's executor passes to a pod. Its V2 REST routes
  are inference, readiness, metadata and health only (seldon-core v1.18.2 executor/api/rest/server.go
  184-191), so `/v2/models/{model}/feedback` gets its 404; an inference body that has `inputs` goes on
  unchanged, request `parameters` included (api/rest/kfserving.go 10-23), and gRPC ModelInfer passes
  the request message on as it is (api/grpc/kfserving/server.go 76-88, client.go 71-90; its
  ModelInferRequest has `parameters`, grpc_service.proto 633). tritonclient sends it over REST (with
  `binary_data=False`: the executor parses every REST body as JSON, kfserving.go 16-20) and gRPC with
  `infer(..., parameters={"feedback": True})`.

A classifier's outcomes are `correct` or `incorrect` (labels must be classes the model knows); a
regressor's are `scored`, with the absolute and squared errors summed, so mean and variance of the
absolute error follow. Anything else is a 400 naming the field, and nothing is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import metrics
from .signature import datatype_of

PARAMETER = "feedback"  # the request parameter that makes an inference request feedback
RECORDED = "recorded"
MAX_OUTCOMES = 100_000  # per feedback; larger batches are split by the caller


class FeedbackError(MLServerError):
    def __init__(self, message: str, status_code: int = 400):
        super().__init__(f"feedback: {message}", status_code=status_code)


Label = int | float | str


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    variant: str
    prediction: list[Label] = Field(min_length=1, max_length=MAX_OUTCOMES)
    truth: list[Label] = Field(min_length=1, max_length=MAX_OUTCOMES)
    id: str | None = None

    @classmethod
    def read(cls, data: object) -> Feedback:
        """From a JSON body; the error names the first field that is wrong."""
        try:
            feedback = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = first["loc"]
            if len(loc) >= 2 and isinstance(loc[1], int):  # an element of prediction or truth
                raise FeedbackError(f"{loc[0]}[{loc[1]}]: {first['input']!r} is not a number or a class label") from None
            raise FeedbackError(f"{loc[0] if loc else 'body'}: {first['msg']}") from None
        if len(feedback.prediction) != len(feedback.truth):
            raise FeedbackError(f"prediction and truth must be lists of equal length (got {len(feedback.prediction)} and {len(feedback.truth)})")
        return feedback

    @classmethod
    def of_inference(cls, payload: InferenceRequest) -> Feedback | None:
        """The feedback an inference request carries (request parameter `feedback: true`), else None."""
        if not (payload.parameters and getattr(payload.parameters, PARAMETER, False) is True):
            return None
        inputs = {i.name: i for i in payload.inputs}
        missing = [name for name in ("variant", "prediction", "truth") if name not in inputs]
        if missing or len(inputs) != 3:
            raise FeedbackError(f"a feedback request has exactly the inputs variant, prediction and truth (missing: {', '.join(missing) or 'none'})")
        try:
            (variant,) = StringCodec.decode_input(inputs["variant"])
        except ValueError:
            raise FeedbackError("variant: one BYTES element naming the variant") from None
        data = {"variant": variant, "id": payload.id}
        for name in ("prediction", "truth"):
            decoded = StringCodec.decode_input(inputs[name]) if datatype_of(inputs[name]) == "BYTES" else NumpyCodec.decode_input(inputs[name]).ravel().tolist()
            data[name] = decoded
        return cls.read(data)


@dataclass(frozen=True)
class Target:
    """What feedback for one served model is checked against."""

    model: str
    variants: tuple[str, ...]  # the live variants whose predictions reach clients
    classes: tuple | None  # a classifier's labels; None for a regressor

    def publish(self) -> Target:
        """Create every series at 0: Prometheus' increase() misses outcomes recorded before a series' first scrape."""
        m = metrics.feedback_metrics()
        for variant in self.variants:
            for outcome in ("correct", "incorrect") if self.classes is not None else ("scored",):
                m.outcomes.labels(self.model, variant, outcome)
            if self.classes is None:
                m.abs_error.labels(self.model, variant)
                m.squared_error.labels(self.model, variant)
        return self

    def record(self, feedback: Feedback) -> int:
        if feedback.variant not in self.variants:
            raise FeedbackError(f"variant: '{feedback.variant}' is not a live variant of model '{self.model}' (live: {', '.join(self.variants)})", 404)
        if self.classes is not None:
            known = set(self.classes)
            for field in ("prediction", "truth"):
                for i, value in enumerate(getattr(feedback, field)):
                    if isinstance(value, bool) or value not in known:
                        raise FeedbackError(f"{field}[{i}]: {value!r} is not a class of model '{self.model}' (classes: {', '.join(map(str, self.classes))})")
            correct = sum(p == t for p, t in zip(feedback.prediction, feedback.truth, strict=True))
            counted = metrics.feedback_metrics().outcomes
            if correct:
                counted.labels(self.model, feedback.variant, "correct").inc(correct)
            if correct < len(feedback.truth):
                counted.labels(self.model, feedback.variant, "incorrect").inc(len(feedback.truth) - correct)
            return len(feedback.truth)
        for field in ("prediction", "truth"):
            for i, value in enumerate(getattr(feedback, field)):
                if isinstance(value, (str, bool)) or not math.isfinite(value):
                    raise FeedbackError(f"{field}[{i}]: {value!r} is not a finite number (model '{self.model}' is a regressor)")
        errors = [abs(float(p) - float(t)) for p, t in zip(feedback.prediction, feedback.truth, strict=True)]
        m = metrics.feedback_metrics()
        m.outcomes.labels(self.model, feedback.variant, "scored").inc(len(errors))
        abs_error, squared_error = m.abs_error.labels(self.model, feedback.variant), m.squared_error.labels(self.model, feedback.variant)
        for e in errors:
            abs_error.observe(e)
            squared_error.observe(e * e)
        return len(errors)


def answer(model: str, recorded: int, request_id: str | None) -> InferenceResponse:
    """The answer to feedback sent as an inference request."""
    return InferenceResponse(
        model_name=model,
        id=request_id,
        outputs=[ResponseOutput(name=RECORDED, shape=[1], datatype="INT64", data=[recorded])],
    )
