"""`mlops ab-report`: the per-variant table a reviewer of an A/B test wants, and a chart of quality and share.

The same numbers `mlops promote` decides on (outcomes over the policy's window) beside what the
dashboards show (share of live requests, server errors, p99), read from the same Prometheus with the
dashboards' own queries, so the report, the dashboard and the decision never disagree on a definition.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..domain.spec import Model, Rollout
from .promote import PromotionError, api, arm_of, by_variant, interval, last_scrape, outcome_queries, read_outcomes
from .sequential import Arm

SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Row:
    variant: str
    weight: int
    share: float | None  # percent of the model's live requests over the window
    requests: float
    error_ratio: float | None
    p99: float | None
    arm: Arm

    def quality(self) -> tuple[float, float, float] | None:
        return interval(self.arm)


def seconds(duration: str) -> int:
    match = re.fullmatch(r"([0-9]+)([smhdw])", duration)
    if not match:
        raise PromotionError(f"'{duration}' is not a duration such as 30m, 6h or 7d")
    return int(match.group(1)) * SECONDS[match.group(2)]


def rows(url: str, model_name: str, model: Model, policy: Rollout, env: str | None) -> list[Row]:
    from ..render.dashboards import variant_error_ratio, variant_latency, variant_requests, variant_share

    weights = model.weights(env)
    sel, live, w = f'model="{model_name}"', f'model="{model_name}", role="live"', policy.window

    at = last_scrape(url, model_name)
    outcomes = read_outcomes(url, model_name, policy, at)
    share = by_variant(url, variant_share("model, variant", "model", w, sel), at)
    requests = by_variant(url, variant_requests("variant", live, w, fn="increase"), at)
    errors = by_variant(url, variant_error_ratio("variant", live, w, "server"), at)
    p99 = by_variant(url, variant_latency(0.99, "variant", live, w), at)
    return [
        Row(v, weights[v], share.get(v), requests.get(v, 0.0), errors.get(v), p99.get(v), arm_of(policy.metric, outcomes, v))
        for v in weights  # live variants, in the spec's order
    ]


def table(model_name: str, policy: Rollout, found: list[Row]) -> list[list[str]]:
    """Header and one line per variant, as text cells."""
    header = ["variant", "weight", "share", "requests", "server errors", "p99", "outcomes", f"{policy.metric} (95% interval)"]
    lines = [header]
    for r in found:
        q = r.quality()
        lines.append(
            [
                r.variant + (" (champion)" if r.variant == policy.champion else " (challenger)" if r.variant == policy.challenger else ""),
                f"{r.weight}%",
                "-" if r.share is None else f"{r.share:.1f}%",
                f"{r.requests:.0f}",
                "-" if r.error_ratio is None else f"{r.error_ratio:.2%}",
                "-" if r.p99 is None else f"{r.p99 * 1000:.1f} ms",
                f"{r.arm.n:.0f}",
                "no outcomes" if q is None else f"{q[0]:.4f} ({q[1]:.4f} to {q[2]:.4f})",
            ]
        )
    return lines


def query_range(url: str, expr: str, start: float, end: float, step: float) -> dict[str, list[tuple[float, float]]]:
    """A range query: per variant, (timestamp, value) points."""
    result = api(url, "query_range", {"query": expr, "start": start, "end": end, "step": step})
    return {s["metric"].get("variant", ""): [(float(t), float(v)) for t, v in s["values"]] for s in result}


def chart(url: str, model_name: str, policy: Rollout, since: str, path: Path) -> Path:
    """A PNG: each variant's quality (over a rolling twelfth of the range) and share of live requests over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..render.dashboards import variant_share

    span = seconds(since)
    rolling = f"{max(span // 12, 60)}s"
    end = time.time()
    step = max(span / 120, 15)
    sel = f'model="{model_name}"'
    exprs = outcome_queries(policy.metric, sel, rolling)
    series = {k: query_range(url, e, end - span, end, step) for k, e in exprs.items()}
    share = query_range(url, variant_share("model, variant", "model", rolling, sel), end - span, end, step)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for variant, points in sorted(series["n"].items()):
        totals = dict(series["total"].get(variant, []))
        xs, ys = [], []
        for t, n in points:
            if n > 0 and t in totals:
                xs.append((t - end) / 3600)
                ys.append(totals[t] / n)
        top.plot(xs, ys, marker=".", label=variant)
    top.set_ylabel(policy.metric)
    top.set_title(f"{model_name}: {policy.metric} per variant (rolling {int(rolling[:-1]) // 60} min) and share of live requests")
    top.legend()
    for variant, points in sorted(share.items()):
        bottom.plot([(t - end) / 3600 for t, _ in points], [v for _, v in points], marker=".", label=variant)
    bottom.set_ylabel("share of live requests (%)")
    bottom.set_xlabel("hours before now")
    bottom.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
