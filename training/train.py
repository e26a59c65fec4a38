"""Fit every candidate of a job, log it to MLflow, register it, and move the aliases.

Each candidate becomes a new registry version; the best held-out score gets
`champion`, the next `challenger`. Aliases, not the deprecated stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path

import numpy as np
from sklearn import metrics
from sklearn.model_selection import train_test_split

from runtimes import integrity

from .catalog import JOBS, REVIEWED_TRUSTED_TYPES, Job

ALIASES = ("champion", "challenger")


@dataclass(frozen=True)
class TrainedVersion:
    model: str
    candidate: str
    version: str
    score: float
    alias: str | None


class TrainingError(Exception):
    pass


def _scores(job: Job, y_true, y_pred) -> dict[str, float]:
    if job.task == "classification":
        return {
            "accuracy": metrics.accuracy_score(y_true, y_pred),
            "f1_macro": metrics.f1_score(y_true, y_pred, average="macro"),
        }
    return {
        "r2": metrics.r2_score(y_true, y_pred),
        "rmse": float(np.sqrt(metrics.mean_squared_error(y_true, y_pred))),
        "mae": metrics.mean_absolute_error(y_true, y_pred),
    }


def _scalar_params(estimator) -> dict[str, object]:
    return {k: v for k, v in estimator.get_params(deep=True).items() if isinstance(v, (str, int, float, bool, type(None)))}


def _trusted_types(model_name: str, candidate: str, estimator) -> list[str]:
    from skops.io import dumps, get_untrusted_types

    needed = set(get_untrusted_types(data=dumps(estimator)))
    unreviewed = needed - REVIEWED_TRUSTED_TYPES
    if unreviewed:
        raise TrainingError(
            f"{model_name}/{candidate}: skops types not reviewed as trusted: {', '.join(sorted(unreviewed))} "
            "(review them, then add them to training.catalog.REVIEWED_TRUSTED_TYPES)"
        )
    return sorted(needed)


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = f"{artifact_location}/{name}" if artifact_location else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another job created it meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


DUPLICATE_KEY = ("Duplicate entry", "duplicate key", "UNIQUE constraint failed", "IntegrityError")
ALIAS_TRIES = 5


def set_alias(client, model: str, alias: str, version: str) -> None:
    """Point `alias` at `version`, also when another job sets the same alias at the same moment.

    MLflow's SQL store inserts a new alias row after looking for one; two jobs that both find none
    both insert, and the second fails on the database's unique key (PostgreSQL and MariaDB alike).
    The row then exists, so setting it again updates it.
    """
    for attempt in range(1, ALIAS_TRIES + 1):
        try:
            client.set_registered_model_alias(model, alias, version)
            return
        except Exception as exc:
            if attempt == ALIAS_TRIES or not any(s in str(exc) for s in DUPLICATE_KEY):
                raise
            time.sleep(0.05 * attempt)


def train_model(registry, model_name: str, on_step=lambda msg: None) -> list[TrainedVersion]:
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    job = JOBS[model_name]
    client = registry.client()
    mlflow.set_tracking_uri(registry.tracking_uri)  # the fluent API (start_run, log_model) reads it
    mlflow.set_registry_uri(registry.tracking_uri)
    experiment_id = _experiment_id(client, model_name, registry.artifact_location)
    X, y = job.load(return_X_y=True)
    X = np.asarray(X, dtype=np.float64)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=42, stratify=y if job.task == "classification" else None)
    requirements = [f"{p}=={pkg_version(p)}" for p in ("mlflow", "scikit-learn", "skops", "numpy")]

    results: list[tuple[str, str, float]] = []
    for candidate, make in job.candidates.items():
        on_step(f"{model_name}/{candidate}: fitting")
        estimator = make().fit(X_train, y_train)
        scores = _scores(job, y_test, estimator.predict(X_test))
        trusted = _trusted_types(model_name, candidate, estimator)
        on_step(f"{model_name}/{candidate}: logging and registering")
        with mlflow.start_run(experiment_id=experiment_id, run_name=candidate):
            mlflow.log_params({"candidate": candidate, "estimator": type(estimator).__name__, **_scalar_params(estimator)})
            mlflow.log_metrics({f"test_{k}": float(v) for k, v in scores.items()})
            mlflow.set_tags({"task": job.task, "dataset": job.load.__name__.removeprefix("load_")})
            info = mlflow.sklearn.log_model(
                estimator,
                name="model",
                serialization_format="skops",
                skops_trusted_types=trusted,
                signature=infer_signature(X_test[:5], estimator.predict(X_test[:5])),
                input_example=X_test[:2],
                pip_requirements=requirements,
                registered_model_name=model_name,
            )
        version = str(info.registered_model_version)
        client.set_model_version_tag(model_name, version, "candidate", candidate)
        # The files as registered, so that a runtime can refuse bytes that changed in the store since.
        stored = Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri(model_name, version)))
        client.set_model_version_tag(model_name, version, integrity.TAG, integrity.tag_value(stored))
        results.append((candidate, version, float(scores[job.score_metric])))

    ranked = sorted(results, key=lambda r: r[2], reverse=True)
    out = []
    for i, (candidate, version, score) in enumerate(ranked):
        alias = ALIASES[i] if i < len(ALIASES) else None
        if alias:
            set_alias(client, model_name, alias, version)
        out.append(TrainedVersion(model_name, candidate, version, score, alias))
    return out
