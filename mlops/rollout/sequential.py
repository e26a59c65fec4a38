"""Always-valid A/B evidence for promotion: a two-sample mixture sequential probability ratio test (mSPRT).

A scheduled `mlops promote` reads cumulative Prometheus counters again and again. A fixed-horizon z-test
checked at every look finds a "significant" difference far more often than alpha when there is none, so
the promotion would be decided by how often the job runs. The mSPRT of Johari, Pekelis and Walsh
("Always Valid Inference: Continuous Monitoring of A/B Tests", 2017/2022) does not have that problem:
its p-value and confidence sequence hold at every look simultaneously, so stopping at the first
decisive look keeps the false-promotion rate at or below alpha.

The test is the two-sample normal-approximation form. The difference of the arms' means
d = mean_challenger - mean_champion is approximately N(theta, V) with V = var_a/n_a + var_b/n_b.
Mixing the likelihood ratio of theta against 0 over theta ~ N(0, tau^2) gives

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)))

and inverting Lambda(theta0) < 1/alpha over theta0 gives the confidence sequence

    d +- sqrt(V (V + tau^2) / tau^2 * (log((V + tau^2) / V) + 2 log(1/alpha)))

so the interval excludes 0 exactly when Lambda >= 1/alpha, i.e. when p = min(1, 1/Lambda) <= alpha.
The variances are plug-in estimates and the normal approximation needs some samples, hence MIN_SAMPLES;
the guarantee assumes the traffic split stays put during an experiment (any fixed split, e.g. a 20% canary).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import numpy as np

Kind = Literal["classifier", "regressor"]
Verdict = Literal["better", "worse", "undecided"]

MIN_SAMPLES = 30
"""Per arm, below which the verdict is undecided: the normal approximation and the plug-in variance need about this many."""

VARIANCE_FLOOR = 1e-12
"""Per-sample variance floor: n < 2, or accuracy 0 or 1, estimate a variance of 0 that V must not divide by."""

ACCURACY_TAU = 0.05
"""Default mixing standard deviation for accuracy: 5 accuracy points, the smallest difference worth a promotion."""

MAE_RELATIVE_TAU = 0.10
"""Default mixing standard deviation for MAE, relative to the pooled MAE: a 10% change, since MAE has the target's units."""


def _counter(name: str, value) -> float | np.ndarray:
    """A cumulative counter as float (or float array): Prometheus counters are floats, and simulations pass arrays."""
    array = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{name} must be a finite count >= 0, got {value!r}")
    return float(array) if array.ndim == 0 else array


def _plain(value):
    """0-d results as Python scalars, so scalar callers get floats and strings, array callers arrays."""
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array


@dataclass(frozen=True)
class Arm:
    """One variant's cumulative sufficient statistics: all the test needs, and exactly what the metrics count.

    `total` is the number of correct predictions (classifier) or the sum of absolute errors (regressor);
    `squares` is the sum of squared errors (regressor only). Fields may be numpy arrays of the same
    broadcastable shape, to evaluate many experiments or looks at once.
    """

    kind: Kind
    n: float | np.ndarray
    total: float | np.ndarray
    squares: float | np.ndarray | None = None

    @classmethod
    def classifier(cls, n, correct) -> Arm:
        """n feedback samples of which `correct` were right; quality is accuracy, higher is better."""
        n, correct = _counter("n", n), _counter("correct", correct)
        if np.any(np.asarray(correct) > np.asarray(n)):
            raise ValueError(f"correct must be <= n, got correct={correct!r} > n={n!r}")
        return cls("classifier", n, correct)

    @classmethod
    def regressor(cls, n, abs_error_sum, squared_error_sum) -> Arm:
        """n feedback samples with their summed |error| and error^2; quality is MAE, lower is better.

        Since error^2 = |error|^2, the two sums give the mean and the variance of |error|. A scrape that
        reads the sums at slightly different moments can make them inconsistent by a hair; the variance
        is clamped at the floor rather than refused.
        """
        return cls("regressor", _counter("n", n), _counter("abs_error_sum", abs_error_sum), _counter("squared_error_sum", squared_error_sum))

    @property
    def mean(self) -> float | np.ndarray:
        """Accuracy or MAE; nan without samples, where there is no estimate."""
        n = np.asarray(self.n)
        with np.errstate(invalid="ignore", divide="ignore"):
            return _plain(np.where(n > 0, np.asarray(self.total) / n, np.nan))

    @property
    def variance(self) -> float | np.ndarray:
        """Per-sample variance: Bernoulli p(1-p), or the sample variance of |error|; floored, nan without samples."""
        n = np.asarray(self.n)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.asarray(self.total) / n
            if self.kind == "classifier":
                raw = mean * (1 - mean)
            else:
                raw = (np.asarray(self.squares) - np.asarray(self.total) * mean) / (n - 1)
                raw = np.where(n >= 2, raw, 0.0)
            return _plain(np.where(n > 0, np.maximum(raw, VARIANCE_FLOOR), np.nan))


@dataclass(frozen=True)
class Evidence:
    """What one look at the counters says about challenger versus champion.

    difference and interval are challenger minus champion in the metric's units (accuracy or MAE), so an
    MAE interval below 0 means the challenger is better; `improvement` is the sign-adjusted difference,
    positive when the challenger is better. p_value is this look's min(1, 1/Lambda): `compare` is stateless,
    so the always-valid p-value of a running experiment is the minimum over its looks (see `running`).
    Fields are arrays when the arms' counters were arrays.
    """

    difference: float | np.ndarray
    interval: tuple[float | np.ndarray, float | np.ndarray]
    log_likelihood_ratio: float | np.ndarray
    p_value: float | np.ndarray
    verdict: Verdict | np.ndarray
    samples: tuple[float | np.ndarray, float | np.ndarray]
    standard_error: float | np.ndarray
    tau: float | np.ndarray
    alpha: float
    higher_is_better: bool

    @property
    def improvement(self) -> float | np.ndarray:
        """The difference with its sign turned so that positive means the challenger is better."""
        return self.difference if self.higher_is_better else -self.difference

    @property
    def likelihood_ratio(self) -> float | np.ndarray:
        """Lambda itself; inf once it overflows, which log_likelihood_ratio does not."""
        with np.errstate(over="ignore"):
            return _plain(np.exp(self.log_likelihood_ratio))


def default_tau(champion: Arm, challenger: Arm) -> float | np.ndarray:
    """The mixing standard deviation when none is given: the smallest effect worth acting on.

    tau is the spread of the true differences the mixture averages over. At a given look Lambda is largest
    for tau^2 = d^2 - V, so evidence builds fastest for effects of about tau: a larger tau is quicker on large
    effects and slower on small ones, a smaller tau the reverse, and validity holds for any tau fixed in
    advance. Accuracy: ACCURACY_TAU (5 points). MAE: MAE_RELATIVE_TAU of the pooled MAE, because MAE has the
    target's units; it is estimated from the data, which settles within the first looks and keeps A/A error
    within alpha in simulation, but pass tau explicitly when the scale is known.
    """
    if champion.kind == "classifier":
        return ACCURACY_TAU
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = (np.asarray(champion.total) + np.asarray(challenger.total)) / (np.asarray(champion.n) + np.asarray(challenger.n))
    return _plain(MAE_RELATIVE_TAU * pooled)


def compare(champion: Arm, challenger: Arm, alpha: float, higher_is_better: bool, tau: float | None = None) -> Evidence:
    """The mSPRT's evidence at one look: always-valid p-value, confidence sequence and verdict.

    The verdict is "better" or "worse" only when p_value <= alpha (equivalently, the interval excludes 0),
    by the sign of the improvement, and "undecided" otherwise or below MIN_SAMPLES per arm. Acting on the
    first decisive look keeps the chance of a wrong decision at or below alpha however often this is called;
    a verdict may fall back to "undecided" later, which does not undo the earlier decision.
    tau: see default_tau.
    """
    if champion.kind != challenger.kind:
        raise ValueError(f"challenger is a {challenger.kind}, champion a {champion.kind}: their qualities do not compare")
    if not (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and 0 < alpha < 1):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if tau is not None and not (isinstance(tau, numbers.Real) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    tau = default_tau(champion, challenger) if tau is None else float(tau)
    n_a, n_b = np.asarray(champion.n), np.asarray(challenger.n)
    enough = (n_a >= MIN_SAMPLES) & (n_b >= MIN_SAMPLES)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        difference = np.asarray(challenger.mean) - np.asarray(champion.mean)
        v = np.asarray(champion.variance) / n_a + np.asarray(challenger.variance) / n_b
        t2 = np.asarray(tau) ** 2
        log_lambda = -0.5 * np.log1p(t2 / v) + difference**2 / (2 * v) / (1 + v / t2)
        radius = np.sqrt(v * (1 + v / t2) * (np.log1p(t2 / v) + 2 * math.log(1 / alpha)))
        log_lambda = np.where(enough, log_lambda, 0.0)
        p_value = np.where(enough, np.minimum(1.0, np.exp(-log_lambda)), 1.0)
    low = np.where(enough, difference - radius, -np.inf)
    high = np.where(enough, difference + radius, np.inf)
    improvement = difference if higher_is_better else -difference
    decided = p_value <= alpha
    verdict = np.where(decided & (improvement > 0), "better", np.where(decided & (improvement < 0), "worse", "undecided"))
    return Evidence(
        difference=_plain(difference),
        interval=(_plain(low), _plain(high)),
        log_likelihood_ratio=_plain(log_lambda),
        p_value=_plain(p_value),
        verdict=_plain(verdict),
        samples=(_plain(np.broadcast_to(n_a, np.shape(difference))), _plain(np.broadcast_to(n_b, np.shape(difference)))),
        standard_error=_plain(np.sqrt(v)),
        tau=_plain(tau),
        alpha=float(alpha),
        higher_is_better=bool(higher_is_better),
    )


def running(p_values) -> np.ndarray:
    """Always-valid p-values of a running experiment from its per-look ones: the running minimum over the last axis.

    Each look's min(1, 1/Lambda) is valid on its own; the experiment's p-value after k looks is the
    smallest so far, since any look could have been the one to stop at. The caller keeps the history.
    """
    return np.minimum.accumulate(np.asarray(p_values, dtype=float), axis=-1)


@dataclass(frozen=True)
class Simulation:
    """Monte Carlo experiments of a scheduled rollout: `evidence` fields have shape (experiments, looks)."""

    looks: np.ndarray
    evidence: Evidence

    @property
    def promoted(self) -> np.ndarray:
        """Per experiment: whether any look said "better", i.e. whether a promote job would have promoted."""
        return np.any(self.evidence.verdict == "better", axis=-1)

    @property
    def promotion_rate(self) -> float:
        """Share of experiments promoted: the false-promotion rate of an A/A simulation, the power otherwise."""
        return float(np.mean(self.promoted))

    @property
    def demotion_rate(self) -> float:
        """Share of experiments where some look said "worse"."""
        return float(np.mean(np.any(self.evidence.verdict == "worse", axis=-1)))

    @property
    def samples_to_promote(self) -> np.ndarray:
        """Per experiment: samples per arm at the first "better" look; inf if none."""
        better = self.evidence.verdict == "better"
        return np.where(better.any(axis=-1), self.looks[better.argmax(axis=-1)], np.inf)

    @property
    def median_samples_to_promote(self) -> float:
        """Median samples per arm until promotion over all experiments, those never promoted counting as inf."""
        return float(np.median(self.samples_to_promote))


def simulate_classifier(
    champion_accuracy: float,
    challenger_accuracy: float,
    *,
    samples_per_arm: int = 2000,
    looks: int = 20,
    experiments: int = 500,
    alpha: float = 0.05,
    tau: float | None = None,
    seed: int = 0,
) -> Simulation:
    """Simulate classifier A/B rollouts: equal split, `looks` equally spaced looks up to samples_per_arm per arm.

    For planning (how much feedback a rollout needs before a decision) and for checking the test: every
    sample is a Bernoulli draw, accumulated exactly as the feedback counters are.
    """
    rng = np.random.default_rng(seed)
    at = np.round(np.linspace(samples_per_arm / looks, samples_per_arm, looks)).astype(int)
    steps = np.diff(at, prepend=0)
    champion = Arm.classifier(at, rng.binomial(steps, champion_accuracy, size=(experiments, looks)).cumsum(axis=-1))
    challenger = Arm.classifier(at, rng.binomial(steps, challenger_accuracy, size=(experiments, looks)).cumsum(axis=-1))
    return Simulation(looks=at, evidence=compare(champion, challenger, alpha, higher_is_better=True, tau=tau))
