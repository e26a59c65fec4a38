"""Behaviours of MLServer 1.7.1 that this project changes, applied by the serving entry point only.

runtimes/server.py applies them before MLServer starts; nothing else in the project imports this
module, so the CLI and the tests that import runtimes leave MLServer as it is. Each change is small,
idempotent and tied to 1.7.1's internals; tests/test_reliability.py checks each against a real
server, so an MLServer upgrade that breaks one fails there, and `apply()` refuses to patch any other
release (`TESTED_MLSERVER`): the server does not start, saying which release to install.

- Readiness with parallel workers: a runtime's `load()` returning False marks the model not ready
  (MLServer's documented contract), but with parallel workers the main process reports every model
  ready whatever its workers said. It now asks a worker (`is_ready`) for runtimes that offer it.
- gRPC tensors whose `raw_input_contents` do not match their shape and datatype were INTERNAL
  errors from the request converter; they are now INVALID_ARGUMENT, naming the mismatch.
- While no inference worker is up (one died and MLServer is starting its replacement), requests
  got a bare 500 from an empty round robin; they now get 503 / UNAVAILABLE saying so.
- Status codes MLServer has no gRPC mapping for: 413 (request too large) is RESOURCE_EXHAUSTED,
  503 is UNAVAILABLE, instead of UNKNOWN.

The entry point also serves MLServer's REST app instance through `runtimes/rest.py` (a shorter road to
the same data plane, binary tensors, JSON sent as a form) and makes its stop the drain of
`runtimes/drain.py` (tests/test_shutdown.py): no class of MLServer, FastAPI or uvicorn changes for those.
"""

from __future__ import annotations

import grpc
import mlserver
from mlserver.errors import InferenceError, MLServerError
from mlserver.grpc import converters
from mlserver.grpc.utils import STATUS_CODE_MAPPING
from mlserver.parallel.dispatcher import Dispatcher
from mlserver.parallel.model import ParallelModel

TESTED_MLSERVER = "1.7.1"  # every patch here names lines of this release; another may have moved them
READINESS_PROBE = "is_ready"  # the runtime method a worker answers with its model's readiness


class WorkerUnavailable(MLServerError):
    def __init__(self):
        super().__init__(
            "no inference worker is available: MLServer is restarting a worker that stopped; retry shortly",
            status_code=503,
        )


async def _parallel_load(self) -> bool:
    if not hasattr(self._model, READINESS_PROBE):
        return True
    return bool(await self._send(READINESS_PROBE))


def _wrap_request_converter(to_types):
    def wrapped(cls, pb_object):
        try:
            return to_types(pb_object)
        except MLServerError:
            raise
        except Exception as exc:  # noqa: BLE001 - a request the converter cannot read is the client's
            raise InferenceError(
                f"malformed tensor contents: {exc} (each raw_input_contents entry must hold exactly "
                "the elements of its input's shape, in its datatype's binary form)"
            ) from None

    wrapped.mlops_patched = True  # type: ignore[attr-defined]
    return classmethod(wrapped)


def _wrap_get_worker(get_worker):
    def wrapped(self):
        try:
            return get_worker(self)
        except StopIteration:  # the round robin is empty until a restarted worker has loaded its models
            raise WorkerUnavailable() from None

    wrapped.mlops_patched = True  # type: ignore[attr-defined]
    return wrapped


class UntestedMLServer(RuntimeError):
    pass


def check_version(found: str) -> None:
    """Refuse to patch an MLServer these patches were not tested with: a moved line would fail silently."""
    if found != TESTED_MLSERVER:
        raise UntestedMLServer(
            f"MLServer {found} is installed; this project's runtimes patch MLServer {TESTED_MLSERVER} (runtimes/mlserver_patches.py) "
            f"and refuse to start on another release: install mlserver=={TESTED_MLSERVER} (requirements-serving.lock), or update "
            "the patches and their tests for the new release"
        )


def apply() -> None:
    check_version(mlserver.__version__)
    ParallelModel.load = _parallel_load
    if not getattr(converters.ModelInferRequestConverter.to_types, "mlops_patched", False):
        converters.ModelInferRequestConverter.to_types = _wrap_request_converter(converters.ModelInferRequestConverter.to_types)
    if not getattr(Dispatcher._get_worker, "mlops_patched", False):
        Dispatcher._get_worker = _wrap_get_worker(Dispatcher._get_worker)
    STATUS_CODE_MAPPING.setdefault(413, grpc.StatusCode.RESOURCE_EXHAUSTED)
    STATUS_CODE_MAPPING.setdefault(503, grpc.StatusCode.UNAVAILABLE)
