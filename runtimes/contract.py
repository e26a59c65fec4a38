"""The serving contract: what `mlops sync` writes and the runtimes read, and the names both sides share.

`mlops` (sync, seldon, serve, dashboards, cluster) and the runtimes import it; it imports nothing of
MLServer, so the CLI can use it without touching the serving process's patches. A fact written here
is written nowhere else: a port, an implementation path, a `parameters.extra` field or a metric name
that changes here changes on both sides.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

# --- where things are --------------------------------------------------------------------------

SPEC_FILE = "deployments.yaml"
MODEL_SETTINGS_DIR = "model-settings"  # served by `mlops serve`; its settings.json is the image's
SELDON_DIR = "seldon"
STATE_DIR = ".mlops"  # the embedded registry and local run state, beside the spec

# The serving process: `python -m runtimes.server start FOLDER`, in the image (Dockerfile CMD) and under `mlops serve`.
SERVER_MODULE = "runtimes.server"
RUNTIME = "runtimes.registry_sklearn.RegistrySKLearnRuntime"
ROUTER = "runtimes.router.RouterRuntime"

# The V2 gRPC service MLServer registers (mlserver/grpc/dataplane_pb2_grpc.py) and its inference method.
GRPC_SERVICE, GRPC_INFER_METHOD = "inference.GRPCInferenceService", "ModelInfer"
GRPC_INFER = f"/{GRPC_SERVICE}/{GRPC_INFER_METHOD}"  # the call's path on the wire

# MLServer's default ports, which the image, the pods and `mlops serve` all use.
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8080, 8081, 8082
LOOPBACK = "127.0.0.1"  # what local servers bind unless told otherwise

EXTRA_ENV = "MLSERVER_MODEL_EXTRA"  # MLServer reads a single model's parameters.extra from it, as JSON

# After SIGTERM, the time MLServer has to answer what it accepted (runtimes/drain.py); the pods'
# terminationGracePeriodSeconds covers it plus the operator's preStop sleep (mlops/check/cluster.py checks).
DRAIN_SECONDS = 30

# The short roads to MLServer's data plane (runtimes/rest.py, runtimes/grpc_edge.py): on unless set to 0.
REST_FAST_PATH = "MLOPS_REST_FAST_PATH"
GRPC_FAST_PATH = "MLOPS_GRPC_FAST_PATH"

# gRPC servers listening on the one gRPC port, in the one serving process (runtimes/grpc_edge.py).
GRPC_LISTENERS = "MLOPS_GRPC_LISTENERS"
GRPC_LISTENERS_DEFAULT = 16


def switched_off(variable: str) -> bool:
    return os.environ.get(variable, "1").lower() in ("0", "false", "off")


# --- parameters.extra --------------------------------------------------------------------------


class _Extra(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeExtra(_Extra):
    """`parameters.extra` of a variant's runtime (runtimes/registry_sklearn.py), locally in its
    model-settings and in a pod in MLSERVER_MODEL_EXTRA."""

    registered_model: str | None = None  # names the spec's `models.<name>` in trust errors
    variant: str | None = None  # reported as each answer's `parameters.variant`
    alias: str | None = None
    shadow: bool = False
    # The public name's live variants: feedback for any of them may reach this runtime (runtimes/feedback.py).
    live_variants: list[str] = Field(default_factory=list)
    allow_pickle: bool = False
    skops_trusted_types: list[str] = Field(default_factory=list)
    predict_fn: str | None = None  # the default output, `predict` unless set
    max_request_values: int | None = Field(default=None, ge=1)


class VariantRoute(_Extra):
    """One variant in a router's `parameters.extra.variants`."""

    name: str
    shadow: bool = False
    uri: str
    version: str
    weight: int = Field(ge=0, le=100)


class RouterExtra(_Extra):
    """`parameters.extra` of a routed public name (runtimes/router.py)."""

    variants: list[VariantRoute] = Field(min_length=1)
    runtime: RuntimeExtra = Field(default_factory=RuntimeExtra)  # passed on to each variant's runtime
    fallback: bool = False


# --- metrics -----------------------------------------------------------------------------------
# This project's (runtimes/metrics.py; counters without the `_total` Prometheus adds) ...
ROUTER_REQUESTS = "mlops_router_requests"
ROUTER_LATENCY = "mlops_router_request_duration_seconds"
ROUTER_WEIGHT = "mlops_router_variant_weight"
ROUTER_AGREEMENT = "mlops_router_shadow_agreement"
ROUTER_AVAILABLE = "mlops_router_variant_available"
BATCH_REQUESTS = "mlops_batch_requests"
BATCH_WAIT = "mlops_batch_wait_seconds"
FEEDBACK = "mlops_feedback"  # _total{model,variant,outcome}
FEEDBACK_ABS_ERROR = "mlops_feedback_abs_error"  # summaries: read their _sum{model,variant}
FEEDBACK_SQUARED_ERROR = "mlops_feedback_squared_error"
MODEL_LOADS = "mlops_model_loads"
MODEL_READY = "mlops_model_ready"
PROCESS_CPU = "mlops_process_cpu_seconds_total"
PROCESS_MEMORY = "mlops_process_resident_memory_bytes"
VARIANT_WEIGHT = "mlops_variant_weight"  # recorded per environment by the rule `mlops sync` writes
# ... and MLServer 1.7.1's, which the dashboards and alerts read.
INFER_SUCCESS = "model_infer_request_success_total"
INFER_FAILURE = "model_infer_request_failure_total"
INFER_DURATION = "model_infer_request_duration"  # a summary: _sum and _count
REST_REQUESTS = "rest_server_requests_total"
REST_LATENCY = "rest_server_request_duration_seconds"
GRPC_HANDLED = "grpc_server_handled_total"
GRPC_LATENCY = "grpc_server_handling_seconds"
