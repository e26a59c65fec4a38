"""From a registry URI to an estimator: download, integrity check, and a load that refuses what could run code.

Nothing here touches MLServer's behaviour, so the CLI (`mlops serve` reads a model's input example)
and the training jobs' checks can use it without the serving process's patches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import yaml
from mlserver.errors import MLServerError
from pydantic import BaseModel, ValidationError

from . import integrity

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")


class ModelLoadError(MLServerError):
    """The artifact is missing, corrupt or not allowed; the message says which."""

    def __init__(self, msg: str):
        super().__init__(msg, status_code=500)


class RegistryUnavailable(ModelLoadError):
    """The registry did not answer; the runtime tries again with backoff instead of giving up."""

    retry_later = True  # tested by attribute: MLServer reloads runtime modules, so classes are not one identity


def retry_later(exc: BaseException) -> bool:
    return getattr(exc, "retry_later", False)


# Unanswered registry calls fail at once and are retried by ReportedModel, which logs each try; MLflow's
# own default retries an unreachable server for minutes inside one call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
UNREACHABLE = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection", "timed out", "Name or service not known",
               "Temporary failure in name resolution", "status code 502", "status code 503", "status code 504")  # fmt: skip


def fetch(uri: str, tracking_uri: str | None = None) -> Path:
    """A local directory holding the model.

    `models:/name/version` is resolved through the registry (MLFLOW_TRACKING_URI), and its files are
    checked against the sha256 digests recorded on the version (runtimes/integrity.py), if any;
    local artifacts are used in place, remote ones (s3://, mlflow-artifacts:/) downloaded.
    """
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    recorded = None
    try:
        if uri.startswith("models:/"):
            name, _, version = uri.removeprefix("models:/").partition("/")
            client = MlflowClient(tracking_uri, tracking_uri)
            recorded = client.get_model_version(name, version).tags.get(integrity.TAG)
            uri = client.get_model_version_download_uri(name, version)
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            path = Path(url2pathname(parsed.path) if parsed.scheme else uri)
            if not path.exists():
                raise ModelLoadError(f"model artifact not found at {uri}")
        else:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - surfaced with the URI the user configured
        text = str(exc)
        if any(s in text for s in UNREACHABLE) or isinstance(exc, (ConnectionError, TimeoutError)):
            raise RegistryUnavailable(f"cannot reach the registry for {uri}: {text.splitlines()[0] if text else type(exc).__name__}") from None
        raise ModelLoadError(f"cannot fetch model artifact {uri}: {text.splitlines()[0] if text else type(exc).__name__}") from None
    if recorded and (problems := integrity.mismatches(path, recorded)):
        raise ModelLoadError(f"refusing a model whose files changed since registration: {'; '.join(problems)}")
    return path


def read_mlmodel(model_dir: Path) -> dict | None:
    """The MLmodel file's content, None where there is none."""
    path = model_dir / "MLmodel"
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: unreadable MLmodel file ({exc})") from None


def load_estimator(model_dir: Path, extra_trusted: Sequence[str] = (), allow_pickle: bool = False, trust: str = "parameters.extra"):
    """Load with skops and the recorded trusted types; refuse pickles unless allowed.

    `trust` names where the user declares trust, for the refusal messages (the spec's
    `models.<name>.trust`, or model-settings' parameters.extra).
    """
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES) if model_dir.is_dir() else []
        if pickles and not allow_pickle:
            raise ModelLoadError(
                f"{model_dir / pickles[0]}: refusing to load a pickle (it can run arbitrary code); "
                f"log the model with MLflow's skops format, or set {trust}.allow_pickle: true"
            )
        if pickles:
            import joblib

            return joblib.load(model_dir / pickles[0])
        raise ModelLoadError(f"{model_dir}: no MLmodel file; is this an MLflow model artifact?")

    try:
        meta = yaml.safe_load(mlmodel.read_text())
        flavors = meta["flavors"]
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{mlmodel}: unreadable MLmodel file ({exc})") from None

    sk = flavors.get("sklearn")
    if sk is None:
        pyfunc = flavors.get("python_function", {})
        if "python_model" in pyfunc and not allow_pickle:
            raise ModelLoadError(
                f"{model_dir}: a custom python_function model is cloudpickled (it runs arbitrary code on load); set {trust}.allow_pickle: true to serve it"
            )
        if not allow_pickle:
            raise ModelLoadError(
                f"{model_dir}: flavor(s) {', '.join(sorted(flavors))} load through pyfunc, which may unpickle; set {trust}.allow_pickle: true to serve it"
            )
        import mlflow.pyfunc

        return mlflow.pyfunc.load_model(str(model_dir))

    path = model_dir / sk["pickled_model"]
    fmt = sk.get("serialization_format", "cloudpickle")
    if fmt != "skops":
        if not allow_pickle:
            raise ModelLoadError(
                f"{path}: refusing to load a {fmt} artifact (it can run arbitrary code); "
                f"log the model with serialization_format='skops', or set {trust}.allow_pickle: true"
            )
        import cloudpickle

        with open(path, "rb") as f:
            return cloudpickle.load(f)

    import skops.io as sio

    trusted = sorted(set(sk.get("skops_trusted_types") or []) | set(extra_trusted))
    try:
        untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in trusted]
        if untrusted:
            raise ModelLoadError(
                f"{path}: refusing to load untrusted skops type(s) {', '.join(untrusted)}; "
                f"they are not recorded as trusted in MLmodel ({trust}.skops_trusted_types can add them)"
            )
        return sio.load(path, trusted=trusted)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt file must say which file
        raise ModelLoadError(f"{path}: cannot load skops file ({type(exc).__name__}: {exc})") from None


M = TypeVar("M", bound=BaseModel)


def read_extra(model: type[M], extra: dict | None, owner: str) -> M:
    """A runtime's `parameters.extra` as the contract's model; a broken field fails the load, named."""
    try:
        return model.model_validate(extra or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ModelLoadError(f"{owner}: parameters.extra.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
