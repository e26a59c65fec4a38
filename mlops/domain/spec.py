"""The deployment spec (`deployments.yaml`): the one file an ML engineer edits.

Every error names the file and the dotted field path, so a reviewer can fix a
spec without reading this code.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # usable as MLServer model and Kubernetes names


class SpecError(Exception):
    """A deployment spec that cannot be used; the message is one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Variant(_Strict):
    alias: str | None = None
    version: int | None = Field(default=None, ge=1)
    weight: int = Field(default=0, ge=0, le=100)
    shadow: bool = False

    @model_validator(mode="after")
    def _one_reference(self) -> Variant:
        if (self.alias is None) == (self.version is None):
            raise ValueError("name exactly one of 'alias' or 'version'")
        if self.alias is not None and self.alias.lower() == "latest":
            raise ValueError("'latest' is not an alias; name an alias or pin a version")
        if self.shadow and self.weight:
            raise ValueError("a shadow variant takes no weight (it gets a copy of every request)")
        return self


class EnvironmentOverride(_Strict):
    weights: dict[str, int] = Field(default_factory=dict)


SKOPS_TYPE_RE = r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$"  # a dotted Python path, as skops names types


class Trust(_Strict):
    """What a model's artifacts may contain beyond what the runtime loads safely by default.

    Loading a pickle or cloudpickle artifact (a custom pyfunc model, a flavor other than scikit-learn's
    skops format) runs whatever code it holds; declare it here, in review, not on the serving side.
    """

    allow_pickle: bool = False
    skops_trusted_types: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _types(self) -> Trust:
        for name in self.skops_trusted_types:
            if not isinstance(name, str) or not re.match(SKOPS_TYPE_RE, name):
                raise ValueError(f"skops_trusted_types: {name!r} is not a dotted type name such as sklearn.tree._tree.Tree")
        return self

    def runtime_extra(self) -> dict:
        """The runtime's `parameters.extra` keys for what is declared; nothing when nothing is."""
        extra: dict = {}
        if self.allow_pickle:
            extra["allow_pickle"] = True
        if self.skops_trusted_types:
            extra["skops_trusted_types"] = sorted(set(self.skops_trusted_types))
        return extra


DURATION_RE = r"^[0-9]+(s|m|h|d|w)$"  # a Prometheus range duration such as 30m, 12h, 7d


def _duration(value: str) -> str:
    if not re.match(DURATION_RE, value) or not int(value[:-1]):
        raise ValueError("must be a Prometheus duration such as 30m, 12h or 7d")
    return value


class Guardrails(_Strict):
    """Checked on the challenger's live traffic whatever the comparison says; a breach means rollback."""

    error_ratio: float = Field(default=0.05, gt=0, lt=1)  # max fraction of its requests answered with a server error
    p99_seconds: float = Field(default=0.5, gt=0)  # max p99 latency
    min_requests: int = Field(default=100, ge=1)  # judged only past this many challenger requests
    window: str = "10m"  # the recent traffic they are judged on

    @field_validator("window")
    @classmethod
    def _duration(cls, value: str) -> str:
        return _duration(value)


class Rollout(_Strict):
    """A/B promotion of `challenger` over `champion` by `mlops promote` (Flagger's analysis vocabulary).

    Each run compares the variants' feedback outcomes with an always-valid sequential test and decides:
    promote (a better challenger at `max_weight`: the registry aliases move), step (a better challenger
    below it gains `step_weight`), hold (undecided), or rollback (a worse challenger or a guardrail breach).
    Promotion moves registry aliases, so both variants must name an `alias`, not pin a `version`.
    """

    champion: str = "champion"  # variant names
    challenger: str = "challenger"
    metric: Literal["accuracy", "mae"]  # accuracy (classifiers, higher is better) or mae (regressors, lower is better)
    min_samples: int = Field(default=200, ge=30)  # feedback outcomes per variant before any decision
    alpha: float = Field(default=0.05, gt=0, le=0.2)  # false-promotion rate the test holds under repeated looks
    step_weight: int = Field(default=10, ge=1, le=100)  # weight points the challenger gains per step
    max_weight: int = Field(default=50, ge=1, le=100)  # the challenger's weight at which a better one is promoted
    window: str = "7d"  # how far back promote reads outcomes
    guardrails: Guardrails = Field(default_factory=Guardrails)

    @field_validator("window")
    @classmethod
    def _duration(cls, value: str) -> str:
        return _duration(value)


class Model(_Strict):
    variants: dict[str, Variant] = Field(min_length=1)
    environments: dict[str, EnvironmentOverride] = Field(default_factory=dict)
    # A live variant that fails to load: False leaves the routed name not ready; True serves it from
    # the live variants that loaded, their weights scaled up in proportion.
    fallback: bool = False
    trust: Trust = Field(default_factory=Trust)
    rollout: Rollout | None = None  # A/B promotion by `mlops promote`; none: weights change only by hand

    def weights(self, env: str | None = None) -> dict[str, int]:
        """Weights of the live (non-shadow) variants, with `env`'s overrides applied."""
        live = {n: v.weight for n, v in self.variants.items() if not v.shadow}
        if env is not None and env in self.environments:
            live.update(self.environments[env].weights)
        return live


class Autoscale(_Strict):
    """A HorizontalPodAutoscaler per predictor (Seldon's hpaSpec), on CPU utilization of the requests."""

    min_replicas: int = Field(ge=1)
    max_replicas: int = Field(ge=1, le=100)
    cpu_percent: int = Field(default=70, ge=1, le=100)

    @model_validator(mode="after")
    def _range(self) -> Autoscale:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class Jwt(_Strict):
    """The identity provider whose tokens callers present (Istio RequestAuthentication's jwtRules)."""

    issuer: str
    jwks_uri: str
    audiences: list[str] = Field(min_length=1)

    @field_validator("issuer", "jwks_uri")
    @classmethod
    def _https(cls, value: str) -> str:
        if not re.match(r"^https://[^\s/]+", value):
            raise ValueError("must be an https:// URL (tokens and keys are not fetched in plaintext)")
        return value


class Auth(_Strict):
    """Who may call the models at the cluster's ingress: holders of a valid token from `jwt`, and,
    when `allow_ips` is set, only from those networks. Health and readiness paths stay open."""

    jwt: Jwt
    allow_ips: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _networks(self) -> Auth:
        for net in self.allow_ips:
            try:
                ipaddress.ip_network(net)
            except ValueError:
                raise ValueError(f"allow_ips: {net!r} is not an address or network such as 203.0.113.0/24") from None
        return self


class Tls(_Strict):
    """TLS at the ingress from a Secret that lives in the cluster (cert-manager's or one created out
    of band), named here; the key itself never enters Git."""

    credential_name: str = Field(pattern=NAME_RE)  # Istio Gateway tls.credentialName


NO_AUTH = "none"
PRODUCTION = "prod"  # the environment `mlops validate` holds to authenticated callers and TLS


class Environment(_Strict):
    replicas: int = Field(default=1, ge=1)
    cpu: str = "250m"
    memory: str = "512Mi"
    autoscale: Autoscale | None = None  # instead of a fixed `replicas`
    # Unset is undecided, which `mlops validate` refuses: an open ingress must be written as `none`.
    auth: Auth | Literal["none"] | None = None
    tls: Tls | None = None

    @model_validator(mode="after")
    def _one_scale(self) -> Environment:
        if self.autoscale is not None and "replicas" in self.model_fields_set:
            raise ValueError("set either 'replicas' or 'autoscale', not both")
        return self

    @property
    def least_replicas(self) -> int:
        return self.autoscale.min_replicas if self.autoscale else self.replicas


class DeploymentSpec(_Strict):
    environments: dict[str, Environment] = Field(default_factory=lambda: {"dev": Environment(), "stage": Environment(), "prod": Environment()})
    models: dict[str, Model] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> DeploymentSpec:
        for name in [*self.models, *self.environments]:
            if not re.match(NAME_RE, name):
                raise ValueError(f"'{name}' must be lower-case letters, digits and '-'")
        for mname, model in self.models.items():
            for vname in model.variants:
                if not re.match(NAME_RE, vname):
                    raise ValueError(f"models.{mname}.variants.{vname}: name must be lower-case letters, digits and '-'")
            for env, override in model.environments.items():
                where = f"models.{mname}.environments.{env}"
                if env not in self.environments:
                    raise ValueError(f"{where}: unknown environment (declared: {', '.join(self.environments)})")
                for vname, w in override.weights.items():
                    variant = model.variants.get(vname)
                    if variant is None:
                        raise ValueError(f"{where}.weights.{vname}: no such variant")
                    if variant.shadow:
                        raise ValueError(f"{where}.weights.{vname}: a shadow variant takes no weight")
                    if not 0 <= w <= 100:
                        raise ValueError(f"{where}.weights.{vname}: must be between 0 and 100 (got {w})")
            for env in [None, *model.environments]:
                weights = model.weights(env)
                where = f"models.{mname}" + (f".environments.{env}.weights" if env else ".variants")
                if not weights:
                    raise ValueError(f"{where}: needs at least one variant that is not a shadow")
                if sum(weights.values()) != 100:
                    detail = " + ".join(f"{n}={w}" for n, w in weights.items())
                    raise ValueError(f"{where}: weights must sum to 100 (got {detail} = {sum(weights.values())})")
            if model.rollout is not None:
                _check_rollout(mname, model, model.rollout)
        return self


def _check_rollout(mname: str, model: Model, rollout: Rollout) -> None:
    where = f"models.{mname}.rollout"
    for role in ("champion", "challenger"):
        vname = getattr(rollout, role)
        variant = model.variants.get(vname)
        if variant is None:
            raise ValueError(f"{where}.{role}: no such variant '{vname}' (variants: {', '.join(model.variants)})")
        if variant.shadow:
            raise ValueError(f"{where}.{role}: variant '{vname}' is a shadow; an A/B rollout needs live variants that take weight")
        if variant.alias is None:
            raise ValueError(f"{where}.{role}: variant '{vname}' pins version {variant.version}; promotion moves registry aliases, so it must name an alias")
    if rollout.champion == rollout.challenger:
        raise ValueError(f"{where}.challenger: must be a different variant from the champion ('{rollout.champion}')")
    if rollout.max_weight < rollout.step_weight:
        raise ValueError(f"{where}.max_weight: must be at least step_weight ({rollout.step_weight}) (got {rollout.max_weight})")


def _format_error(path: Path, err: ValidationError) -> str:
    errors = err.errors()
    first = errors[0]
    # A union field (`auth`) tags each member's errors with the member ("literal['none']", "function-after[...]").
    loc = ".".join(str(p) for p in first["loc"] if "[" not in str(p))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "model_type" and any(e["type"] == "literal_error" for e in errors):
        msg = f"must be {errors[-1]['msg'].removeprefix('Input should be ')} or a mapping"
    where = f"{loc}: " if loc else ""
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    return f"{path.name}: {where}{msg}"


def load_spec(path: Path) -> DeploymentSpec:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read deployment spec ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path.name}{at}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path.name}: expected a mapping with a 'models' key, got {type(data).__name__}")
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_error(path, exc)) from None
