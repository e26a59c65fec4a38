"""`mlops promote`: read a model's A/B evidence from Prometheus, decide, and write the decision to Git.

Flagger and Argo Rollouts move weight from metric analysis too, but they change the cluster behind Git's
back and judge with fixed thresholds that are checked again and again. Here the decision comes from an
always-valid sequential test (mlops/rollout/sequential.py), so it may run on a schedule, and it lands as
the usual change: `deployments.yaml` rewritten in place (mlops/rollout/weights.py), then `mlops sync`.
Flux applies what Git holds; nothing here talks to the cluster.

One look, stateless: the counters are cumulative over the policy's window, and acting on this look's
always-valid p-value alone is at least as strict as acting on the minimum over all looks.
"""

from __future__ import annotations

import json
import math
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runtimes import contract as c

from ..domain.registry import Registry
from ..domain.spec import Model, Rollout
from ..render.generated import write_files
from .sequential import Arm, Evidence, compare
from .weights import set_weights

Action = Literal["promote", "step", "hold", "rollback"]
Z95 = 1.959963984540054  # the per-variant 95% intervals


class PromotionError(Exception):
    """Promotion cannot be decided or written; the message is one line for the user, and nothing was changed."""


@dataclass(frozen=True)
class Guardrail:
    name: str
    value: float | None  # None: not enough traffic to judge
    limit: float
    unit: str

    @property
    def breached(self) -> bool:
        return self.value is not None and self.value > self.limit

    def describe(self) -> str:
        if self.value is None:
            return f"{self.name} not judged (too few requests)"
        fmt = (lambda v: f"{v:.2%}") if self.unit == "ratio" else (lambda v: f"{v * 1000:.1f} ms")
        return f"{self.name} {fmt(self.value)} {'>' if self.breached else '<='} {fmt(self.limit)}{' BREACHED' if self.breached else ''}"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    weights: dict[str, int]  # before
    new_weights: dict[str, int]  # after; equal to weights for hold
    champion: Arm
    challenger: Arm
    evidence: Evidence | None = None
    guardrails: list[Guardrail] = field(default_factory=list)


# --- reading Prometheus ---------------------------------------------------------------------------


def api(url: str, endpoint: str, params: dict, timeout: float = 30) -> list[dict]:
    """The `result` of a Prometheus query API call (`query`, `query_range`); PromotionError naming the server
    and the query when it does not answer."""
    address = f"{url.rstrip('/')}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(address, timeout=timeout) as r:
            body = json.load(r)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.load(exc).get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        raise PromotionError(f"Prometheus at {url} refused the query ({exc.code}: {detail}): {params['query']}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PromotionError(f"cannot reach Prometheus at {url}: {reason}") from None
    if body.get("status") != "success":
        raise PromotionError(f"Prometheus at {url} answered {body.get('status')}: {body.get('error')}")
    return body["data"]["result"]


def query(url: str, expr: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
    """An instant query (at a time, else now): (labels, value) per series."""
    params = {"query": expr, **({"time": repr(at)} if at is not None else {})}
    return [(s["metric"], float(s["value"][1])) for s in api(url, "query", params)]


def last_scrape(url: str, model: str) -> float | None:
    """When the model's feedback counters were last scraped. Evaluated then, increase() counts what the counters
    say; evaluated later it extrapolates past the last sample (up to one scrape interval's worth), which over a
    young series is a large share. The runtimes publish the series at 0, so the start needs no extrapolation."""
    found = query(url, f'max(timestamp({c.FEEDBACK}_total{{model="{model}"}}))')
    return found[0][1] if found else None


def by_variant(url: str, expr: str, at: float | None) -> dict[str, float]:
    return {labels.get("variant", ""): value for labels, value in query(url, expr, at) if not math.isnan(value)}


def outcome_queries(metric: str, selector: str, window: str) -> dict[str, str]:
    """PromQL per variant for an Arm's counters over `window`: `n` and `total` (correct answers, or the summed
    absolute error), and for regressors `squares` (the summed squared error)."""
    if metric == "accuracy":
        return {
            "n": f'sum by (variant) (increase({c.FEEDBACK}_total{{{selector}, outcome=~"correct|incorrect"}}[{window}]))',
            "total": f'sum by (variant) (increase({c.FEEDBACK}_total{{{selector}, outcome="correct"}}[{window}]))',
        }
    return {
        "n": f'sum by (variant) (increase({c.FEEDBACK}_total{{{selector}, outcome="scored"}}[{window}]))',
        "total": f"sum by (variant) (increase({c.FEEDBACK_ABS_ERROR}_sum{{{selector}}}[{window}]))",
        "squares": f"sum by (variant) (increase({c.FEEDBACK_SQUARED_ERROR}_sum{{{selector}}}[{window}]))",
    }


def read_outcomes(url: str, model: str, policy: Rollout, at: float | None = None) -> dict[str, dict[str, float]]:
    """Each variant's counters over the policy's window, ending at `at` (default now)."""
    return {k: by_variant(url, expr, at) for k, expr in outcome_queries(policy.metric, f'model="{model}"', policy.window).items()}


def arm_of(metric: str, outcomes: dict[str, dict[str, float]], variant: str) -> Arm:
    n, total = outcomes["n"].get(variant, 0.0), outcomes["total"].get(variant, 0.0)
    if metric == "accuracy":
        return Arm.classifier(n, min(total, n))  # two series read by two queries may differ by a scrape
    return Arm.regressor(n, total, outcomes["squares"].get(variant, 0.0))


def read_arms(url: str, model: str, policy: Rollout, at: float | None = None) -> tuple[Arm, Arm]:
    """The champion's and the challenger's outcomes over the policy's window, ending at `at` (default now)."""
    outcomes = read_outcomes(url, model, policy, at)
    return arm_of(policy.metric, outcomes, policy.champion), arm_of(policy.metric, outcomes, policy.challenger)


def read_guardrails(url: str, model: str, policy: Rollout, at: float | None = None) -> list[Guardrail]:
    """The challenger's live error ratio and p99 over the guardrails' window, with the dashboards' queries."""
    from ..render.dashboards import variant_error_ratio, variant_latency, variant_requests

    g = policy.guardrails
    sel = f'model="{model}", variant="{policy.challenger}", role="live"'
    requests = sum(v for _, v in query(url, variant_requests("variant", sel, g.window, fn="increase"), at))
    judged = requests >= g.min_requests
    errors = [v for _, v in query(url, variant_error_ratio("variant", sel, g.window, "server"), at)]
    p99 = [v for _, v in query(url, variant_latency(0.99, "variant", sel, g.window), at) if not math.isnan(v)]
    return [
        Guardrail("error ratio", max(errors, default=0.0) if judged else None, g.error_ratio, "ratio"),
        Guardrail("p99 latency", max(p99, default=0.0) if judged else None, g.p99_seconds, "seconds"),
    ]


# --- deciding -------------------------------------------------------------------------------------


def decide(policy: Rollout, weights: dict[str, int], champion: Arm, challenger: Arm, guardrails: list[Guardrail]) -> Decision:
    """promote | step | hold | rollback from the evidence; pure, so every branch is testable without servers."""
    ch, cp = policy.challenger, policy.champion
    w = weights[ch]

    def moved(challenger_weight: int) -> dict[str, int]:
        new = dict(weights)
        new[cp] += w - challenger_weight
        new[ch] = challenger_weight
        return new

    def made(action: Action, reason: str, new: dict[str, int], evidence: Evidence | None = None) -> Decision:
        return Decision(action, reason, weights, new, champion, challenger, evidence, guardrails)

    if w == 0:
        return made("hold", f"the challenger '{ch}' takes no traffic (weight 0): nothing to decide", weights)
    breached = [g for g in guardrails if g.breached]
    if breached:
        return made("rollback", "guardrail breached: " + "; ".join(g.describe() for g in breached), moved(0))
    short = [f"{name} {arm.n:.0f}" for name, arm in ((cp, champion), (ch, challenger)) if arm.n < policy.min_samples]
    if short:
        return made("hold", f"too few outcomes for a decision ({', '.join(short)} < min_samples {policy.min_samples})", weights)
    evidence = compare(champion, challenger, policy.alpha, higher_is_better=policy.metric == "accuracy")
    if evidence.verdict == "worse":
        return made("rollback", f"the challenger is significantly worse (p {evidence.p_value:.2g} <= alpha {policy.alpha})", moved(0), evidence)
    if evidence.verdict == "undecided":
        return made("hold", f"no significant difference yet (p {evidence.p_value:.2g} > alpha {policy.alpha})", weights, evidence)
    if w >= policy.max_weight:
        end = dict.fromkeys(weights, 0) | {cp: 100}  # the challenger becomes the champion; the new challenger slot starts empty
        return made("promote", f"the challenger is significantly better at max_weight {policy.max_weight}", end, evidence)
    target = min(w + policy.step_weight, policy.max_weight, w + weights[cp])
    return made("step", f"the challenger is significantly better: weight {w} -> {target}", moved(target), evidence)


def interval(arm: Arm) -> tuple[float, float, float] | None:
    """(estimate, low, high): the quality with a 95% normal interval, printed beside the test's own
    confidence sequence; None without outcomes."""
    if arm.n <= 0:
        return None
    half = Z95 * math.sqrt(arm.variance / arm.n)
    return arm.mean, arm.mean - half, arm.mean + half


def _interval(arm: Arm) -> str:
    q = interval(arm)
    return "no outcomes" if q is None else f"{q[0]:.4f} (95% {q[1]:.4f} to {q[2]:.4f})"


def report(model: str, env: str | None, policy: Rollout, d: Decision) -> list[str]:
    """The decision line, then the evidence a reviewer reads; also the commit message's body."""
    lines = [
        f"decision: {d.action}",
        f"reason: {d.reason}",
        f"model: {model}{f' ({env})' if env else ''}; metric {policy.metric}; alpha {policy.alpha}; window {policy.window}",
    ]
    for name, arm in ((policy.champion, d.champion), (policy.challenger, d.challenger)):
        lines.append(f"{name}: {arm.n:.0f} outcomes, {policy.metric} {_interval(arm)}")
    if d.evidence is not None:
        e = d.evidence
        low, high = e.interval
        lines.append(
            f"difference (challenger - champion): {e.difference:+.4f}, always-valid {1 - e.alpha:.0%} interval {low:+.4f} to {high:+.4f}; "
            f"log likelihood ratio {e.log_likelihood_ratio:.2f}, p {e.p_value:.2g}; verdict {e.verdict}"
        )
    if d.guardrails:
        lines.append("guardrails (challenger): " + "; ".join(g.describe() for g in d.guardrails))
    if d.new_weights != d.weights:
        lines.append("weights: " + ", ".join(f"{v} {d.weights[v]} -> {d.new_weights[v]}" for v in d.weights))
    return lines


def policy_of(model_name: str, model: Model | None) -> Rollout:
    if model is None:
        raise PromotionError(f"deployments.yaml has no model '{model_name}'")
    if model.rollout is None:
        raise PromotionError(f"deployments.yaml: models.{model_name}.rollout is not set: promote needs a policy (metric, min_samples, alpha, ...)")
    return model.rollout


# --- writing --------------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if proc.returncode:
        raise PromotionError(f"git {' '.join(args[:2])} in {root} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return proc.stdout


def _rewritten(text: str, model_name: str, model: Model, env: str | None, d: Decision) -> str:
    if d.action != "promote":
        return set_weights(text, model_name, d.new_weights, env)
    for scope in (None, *model.environments):  # a promotion moves the aliases, which every environment shares
        text = set_weights(text, model_name, d.new_weights, scope)
    return text


def write(root: Path, registry: Registry, model_name: str, env: str | None, d: Decision, commit: bool = False, message: list[str] = ()) -> list[str]:
    """Rewrite deployments.yaml, move the registry aliases on promote, sync, and commit if asked.

    All or nothing: if any step fails, the spec and the aliases are put back and the error names the step.
    Returns the generated folders that changed.
    """
    from ..domain.spec import load_spec
    from ..render.sync import sync

    generated = [c.SPEC_FILE, c.MODEL_SETTINGS_DIR, c.SELDON_DIR]
    if commit:
        _git(root, "rev-parse", "--show-toplevel")
        dirty = _git(root, "status", "--porcelain", "--", *generated).strip()
        if dirty:
            raise PromotionError(f"uncommitted changes in {', '.join(generated)}; commit or stash them first:\n{dirty}")
    spec_path = root / c.SPEC_FILE
    before = spec_path.read_text()
    spec = load_spec(spec_path)
    model = spec.models[model_name]
    policy = policy_of(model_name, model)
    after = _rewritten(before, model_name, model, env, d)
    moved: tuple[str, str, str] | None = None  # (alias, version now, version before)
    synced = False
    client = registry.client()
    try:
        write_files(root, {c.SPEC_FILE: after})
        load_spec(spec_path)  # the rewritten spec must be valid before anything else moves
        if d.action == "promote":
            champion_alias, challenger_alias = model.variants[policy.champion].alias, model.variants[policy.challenger].alias
            assert champion_alias and challenger_alias  # the spec's validation requires aliases for a rollout
            old = client.get_model_version_by_alias(model_name, champion_alias).version
            new = client.get_model_version_by_alias(model_name, challenger_alias).version
            client.set_registered_model_alias(model_name, champion_alias, new)
            moved = (champion_alias, str(new), str(old))
        result = sync(root, registry)
        synced = True
        if commit:
            _git(root, "add", "--", *generated)
            _git(root, "commit", "--quiet", "-m", f"promote {model_name}{f' ({env})' if env else ''}: {d.action}", "-m", "\n".join(message), "--", *generated)
    except Exception as exc:
        write_files(root, {c.SPEC_FILE: before})
        if moved is not None:
            client.set_registered_model_alias(model_name, moved[0], moved[2])
        if synced:  # the generated files back to what the restored spec and aliases give
            sync(root, registry)
        if isinstance(exc, PromotionError):
            raise
        raise PromotionError(
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}; {c.SPEC_FILE} and the registry are as they were"
        ) from None
    return result.changed
