"""Where the MLflow registry is, and how spec references become pinned versions.

`MLFLOW_TRACKING_URI` (and `MLFLOW_TRACKING_USERNAME` / `_PASSWORD`) select any
MLflow server or database, as every MLflow tool does. Without it the project
uses an embedded registry: SQLite plus a local artifact folder under `.mlops/`
in the project root, which git ignores.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runtimes.contract import SPEC_FILE, STATE_DIR

from .spec import DeploymentSpec, SpecError


class RegistryError(Exception):
    """The registry cannot be reached or does not hold what the spec names."""


@dataclass(frozen=True)
class Registry:
    tracking_uri: str
    artifact_location: str | None  # set only for the embedded default

    @property
    def embedded(self) -> bool:
        return self.artifact_location is not None

    def client(self):
        import mlflow

        # MLflow logs every run link, registration and DB migration at INFO; the CLI reports its own.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)


def default_registry(root: Path) -> Registry:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return Registry(uri, None)
    state = (root / STATE_DIR).resolve()
    state.mkdir(parents=True, exist_ok=True)
    return Registry(f"sqlite:///{state / 'mlflow.db'}", (state / "artifacts").as_uri())


@contextmanager
def embedded_write_lock(root: Path, registry: Registry, on_wait=lambda msg: None):
    """Concurrent jobs on the embedded registry take turns.

    SQLite has one writer at a time and MLflow's first use creates the schema, so parallel
    jobs would otherwise die with "database is locked". A database server needs no turns.
    """
    if not registry.embedded:
        yield
        return
    path = root.resolve() / STATE_DIR / "train.lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait(f"waiting for another training job on the embedded registry ({STATE_DIR}/train.lock)...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fail_fast_http() -> None:
    """MLflow retries an unreachable server for minutes by default; a CLI user wants an answer."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


@dataclass(frozen=True)
class ResolvedVariant:
    """One variant of one model, pinned to a registry version."""

    model: str  # registered model name, e.g. "iris"
    name: str  # variant name, e.g. "champion"
    version: str  # registry version, e.g. "3"
    alias: str | None  # the alias it was resolved from, if any
    weight: int
    shadow: bool
    live_variants: tuple[str, ...] = ()  # the model's live variants, whose feedback a live variant's runtime records

    @property
    def served_name(self) -> str:
        return f"{self.model}-{self.name}"

    @property
    def registry_uri(self) -> str:
        """The pinned artifact reference every generated file uses.

        Unlike the artifact path behind it (which holds a random logged-model id),
        it is the same on every machine that trains the same registry history.
        """
        return f"models:/{self.model}/{self.version}"

    @property
    def runtime_extra(self) -> dict:
        """The runtime's `parameters.extra`, locally (model-settings) and in its pod (MLSERVER_MODEL_EXTRA).

        `variant` is what the runtime reports as the answer's `parameters.variant`: in a cluster each
        pod serves the public name, so this is how a client learns which variant answered.
        """
        extra = {"registered_model": self.model, "variant": self.name, "alias": self.alias, "shadow": self.shadow}
        if self.live_variants and not self.shadow:
            extra["live_variants"] = list(self.live_variants)
        return extra


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def resolve(spec: DeploymentSpec, registry: Registry, spec_name: str = SPEC_FILE) -> dict[str, list[ResolvedVariant]]:
    """Pin every variant of every model; raise SpecError/RegistryError naming the field."""
    from mlflow.exceptions import MlflowException

    fail_fast_http()
    client = registry.client()
    try:
        client.search_registered_models(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot reach"
        raise RegistryError(f"cannot reach MLflow registry at {registry.tracking_uri}: {_describe(exc)}") from None

    resolved: dict[str, list[ResolvedVariant]] = {}
    for mname, model in spec.models.items():
        try:
            registered = client.get_registered_model(mname)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise SpecError(f"{spec_name}: models.{mname}: no registered model '{mname}' in {registry.tracking_uri}") from None
            raise RegistryError(f"MLflow registry at {registry.tracking_uri}: {_describe(exc)}") from None
        aliases = sorted(getattr(registered, "aliases", {}) or {})
        variants = []
        for vname, variant in model.variants.items():
            where = f"{spec_name}: models.{mname}.variants.{vname}"
            try:
                if variant.alias is not None:
                    mv = client.get_model_version_by_alias(mname, variant.alias)
                else:
                    mv = client.get_model_version(mname, str(variant.version))
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise RegistryError(f"MLflow registry at {registry.tracking_uri}: {_describe(exc)}") from None
                if variant.alias is not None:
                    known = ", ".join(aliases) or "none"
                    raise SpecError(f"{where}.alias: model '{mname}' has no alias '{variant.alias}' (aliases: {known})") from None
                raise SpecError(f"{where}.version: model '{mname}' has no version {variant.version}") from None
            variants.append(
                ResolvedVariant(
                    model=mname,
                    name=vname,
                    version=str(mv.version),
                    alias=variant.alias,
                    weight=variant.weight,
                    shadow=variant.shadow,
                    live_variants=tuple(n for n, v in model.variants.items() if not v.shadow),
                )
            )
        _check_one_interface(client, registry, f"{spec_name}: models.{mname}.variants", variants)
        resolved[mname] = variants
    return resolved


def _signature_inputs(client, registry: Registry, v: ResolvedVariant) -> str | None:
    """The version's MLflow signature inputs (the MLmodel file's JSON string), None without one."""
    import mlflow.artifacts
    import yaml

    uri = client.get_model_version_download_uri(v.model, v.version).rstrip("/") + "/MLmodel"
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=registry.tracking_uri)
        return ((yaml.safe_load(Path(path).read_text()) or {}).get("signature") or {}).get("inputs")
    except Exception as exc:  # noqa: BLE001 - the runtime reports an unreadable artifact when it loads it
        logging.getLogger(__name__).debug("no signature for %s: %s", uri, exc)
        return None


def _check_one_interface(client, registry: Registry, where: str, variants: list[ResolvedVariant]) -> None:
    """A public name answers from any of its variants, so they must take the same inputs."""
    if len({v.version for v in variants}) < 2:
        return
    seen: dict[str, ResolvedVariant] = {}
    for v in variants:
        inputs = _signature_inputs(client, registry, v)
        if inputs is not None:
            seen.setdefault(inputs, v)
    if len(seen) > 1:
        (a_inputs, a), (b_inputs, b) = list(seen.items())[:2]
        raise SpecError(
            f"{where}: variants take different inputs, so '{a.model}' would have no one interface: "
            f"{a.name} (version {a.version}) takes {a_inputs}, {b.name} (version {b.version}) takes {b_inputs}; "
            "serve a model with other inputs under a name of its own"
        )
