"""The mSPRT behind promotion: false promotions stay within alpha however often the counters are looked at."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from mlops.rollout.sequential import MIN_SAMPLES, VARIANCE_FLOOR, Arm, compare, running, simulate_classifier

ALPHA = 0.05
Z = stats.norm.ppf(1 - ALPHA / 2)  # the naive two-sided z-test's threshold


def test_aa_classifier_keeps_false_promotions_within_alpha_where_a_naive_z_test_does_not():
    sim = simulate_classifier(0.90, 0.90, samples_per_arm=2000, looks=20, experiments=2000, alpha=ALPHA, seed=11)
    z = sim.evidence.difference / sim.evidence.standard_error
    naive = float(np.mean(np.any(z > Z, axis=-1)))
    print(
        f"\nA/A 90% vs 90%, 2000 experiments x 20 looks to 2000/arm: mSPRT promotes {sim.promotion_rate:.4f}, demotes {sim.demotion_rate:.4f}; naive z promotes {naive:.4f}"
    )
    assert sim.promotion_rate <= ALPHA
    assert sim.promotion_rate + sim.demotion_rate <= ALPHA  # either wrong decision, two-sided
    assert naive > ALPHA  # the same data does catch a test that is not sequential
    assert float(np.mean(z[:, -1] > Z)) < ALPHA  # ... which is only wrong because it looks repeatedly


def test_a_five_point_better_challenger_is_promoted_and_the_median_samples_it_takes():
    sim = simulate_classifier(0.90, 0.95, samples_per_arm=2000, looks=20, experiments=500, alpha=ALPHA, seed=12)
    median = sim.median_samples_to_promote
    print(f"\n90% -> 95%, 500 experiments x 20 looks to 2000/arm: power {sim.promotion_rate:.3f}, median samples per arm to promote {median:.0f}")
    assert sim.promotion_rate >= 0.95
    assert sim.demotion_rate == 0
    assert 300 <= median <= 800


def regressor_looks(rng, mae_a, mae_b, *, experiments, looks, n_a, n_b):
    """Cumulative counters at `looks` equally spaced looks; |error| is exponential (Laplace errors), skewed like real ones."""
    arms = []
    for mae, n in ((mae_a, n_a), (mae_b, n_b)):
        at = np.round(np.linspace(n / looks, n, looks)).astype(int)
        abs_error = rng.exponential(mae, size=(experiments, n))
        arms.append(Arm.regressor(at, abs_error.cumsum(axis=-1)[:, at - 1], (abs_error**2).cumsum(axis=-1)[:, at - 1]))
    return arms


def test_aa_regressor_with_a_canary_split_keeps_wrong_decisions_within_alpha():
    champion, challenger = regressor_looks(np.random.default_rng(13), 2.0, 2.0, experiments=1000, looks=20, n_a=3200, n_b=800)
    verdict = compare(champion, challenger, ALPHA, higher_is_better=False).verdict
    better, worse = (float(np.mean(np.any(verdict == v, axis=-1))) for v in ("better", "worse"))
    print(f"\nA/A MAE 2.0 vs 2.0, 1000 experiments x 20 looks to 3200/800: better {better:.4f}, worse {worse:.4f}")
    assert better + worse <= ALPHA


def test_a_regressor_with_lower_mae_is_better_and_one_with_higher_is_worse():
    champion, challenger = regressor_looks(np.random.default_rng(14), 2.0, 1.5, experiments=200, looks=10, n_a=1000, n_b=1000)
    evidence = compare(champion, challenger, ALPHA, higher_is_better=False)
    assert np.mean(evidence.verdict[:, -1] == "better") >= 0.97
    assert np.all(evidence.difference[:, -1] < 0) and np.all(evidence.improvement[:, -1] > 0)
    assert not np.any(evidence.verdict == "worse")
    assert np.mean(compare(challenger, champion, ALPHA, higher_is_better=False).verdict[:, -1] == "worse") >= 0.97


def test_the_statistic_is_the_normal_mixture_and_the_interval_its_inversion():
    champion, challenger = Arm.classifier(400, 352), Arm.classifier(300, 279)
    e = compare(champion, challenger, ALPHA, higher_is_better=True, tau=0.04)
    v = champion.variance / 400 + challenger.variance / 300
    assert e.standard_error == pytest.approx(math.sqrt(v))

    def mixture(d):  # integral over theta ~ N(0, tau^2) of the likelihood ratio N(d; theta, V) / N(d; 0, V)
        return integrate.quad(lambda t: stats.norm.pdf(d, t, math.sqrt(v)) / stats.norm.pdf(d, 0, math.sqrt(v)) * stats.norm.pdf(t, 0, 0.04), -1, 1)[0]

    assert e.likelihood_ratio == pytest.approx(mixture(e.difference), rel=1e-6)
    assert e.p_value == pytest.approx(min(1, 1 / e.likelihood_ratio))
    for end in e.interval:  # the confidence sequence's ends are where the shifted statistic reaches 1/alpha
        assert mixture(e.difference - end) == pytest.approx(1 / ALPHA, rel=1e-6)


@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_the_interval_excludes_zero_exactly_when_p_is_at_most_alpha(kind):
    rng = np.random.default_rng(15)
    size = 20_000
    n_a, n_b = rng.integers(0, 3000, size), rng.integers(0, 3000, size)
    if kind == "classifier":
        champion = Arm.classifier(n_a, rng.binomial(n_a, rng.uniform(0.5, 1, size)))
        challenger = Arm.classifier(n_b, rng.binomial(n_b, rng.uniform(0.5, 1, size)))
    else:  # sums of n exponential |errors|: Gamma totals, squares consistent with them
        totals = [rng.gamma(np.maximum(n, 1), rng.uniform(0.5, 2, size)) * (n > 0) for n in (n_a, n_b)]
        champion, challenger = (Arm.regressor(n, t, t**2 / np.maximum(n, 1) * rng.uniform(1, 3, size)) for n, t in zip((n_a, n_b), totals, strict=True))
    decided = clear = 0
    for alpha in (0.001, 0.01, 0.05, 0.1, 0.3):
        e = compare(champion, challenger, alpha, higher_is_better=kind == "classifier", tau=rng.uniform(0.005, 0.2))
        low, high = e.interval
        away = np.abs(e.log_likelihood_ratio - math.log(1 / alpha)) > 1e-9  # off the boundary, where rounding could split them
        assert np.array_equal(((low > 0) | (high < 0))[away], (e.p_value <= alpha)[away])
        assert np.array_equal((e.verdict != "undecided")[away], (e.p_value <= alpha)[away])
        decided += int(np.sum(e.p_value <= alpha))
        clear += int(np.sum(away))
    assert decided > 5000 and clear > 0.99 * 5 * size  # both sides of the property were exercised


def test_too_few_samples_are_undecided_whatever_they_show():
    for champion, challenger in [
        (Arm.classifier(0, 0), Arm.classifier(0, 0)),
        (Arm.classifier(0, 0), Arm.classifier(500, 500)),
        (Arm.classifier(1, 0), Arm.classifier(1, 1)),
        (Arm.classifier(MIN_SAMPLES - 1, 0), Arm.classifier(MIN_SAMPLES - 1, MIN_SAMPLES - 1)),
        (Arm.regressor(1, 5.0, 25.0), Arm.regressor(1, 0.0, 0.0)),
    ]:
        e = compare(champion, challenger, ALPHA, higher_is_better=champion.kind == "classifier")
        assert (e.verdict, e.p_value, e.log_likelihood_ratio, e.interval) == ("undecided", 1.0, 0.0, (-math.inf, math.inf))
    assert math.isnan(Arm.classifier(0, 0).mean) and math.isnan(Arm.classifier(0, 0).variance)
    assert Arm.regressor(1, 5.0, 25.0).variance == VARIANCE_FLOOR
    e = compare(Arm.classifier(MIN_SAMPLES, 0), Arm.classifier(MIN_SAMPLES, MIN_SAMPLES), ALPHA, higher_is_better=True)
    assert e.verdict == "better"


def test_all_correct_arms_do_not_divide_by_zero():
    assert Arm.classifier(200, 200).variance == VARIANCE_FLOOR and Arm.classifier(200, 0).variance == VARIANCE_FLOOR
    same = compare(Arm.classifier(200, 200), Arm.classifier(200, 200), ALPHA, higher_is_better=True)
    assert (same.verdict, same.p_value, same.difference) == ("undecided", 1.0, 0.0)
    assert compare(Arm.classifier(500, 500), Arm.classifier(500, 420), ALPHA, higher_is_better=True).verdict == "worse"
    exact = compare(Arm.regressor(100, 0.0, 0.0), Arm.regressor(100, 0.0, 0.0), ALPHA, higher_is_better=False)
    assert (exact.verdict, exact.p_value) == ("undecided", 1.0)


def test_a_scalar_look_gives_plain_values():
    e = compare(Arm.classifier(1000, 900), Arm.classifier(1000, 950), ALPHA, higher_is_better=True)
    assert e.verdict == "better" and isinstance(e.verdict, str) and isinstance(e.p_value, float)
    assert e.difference == pytest.approx(0.05) and e.improvement == pytest.approx(0.05) and e.samples == (1000, 1000)
    low, high = e.interval
    assert 0 < low < e.difference < high
    mae = compare(Arm.regressor(1000, 2000.0, 8000.0), Arm.regressor(1000, 1500.0, 4500.0), ALPHA, higher_is_better=False)
    assert mae.difference == pytest.approx(-0.5) and mae.improvement == pytest.approx(0.5) and mae.verdict == "better"


def test_running_p_values_are_the_minimum_so_far():
    assert running([0.8, 0.04, 0.3, 0.01]).tolist() == [0.8, 0.04, 0.04, 0.01]
    sim = simulate_classifier(0.9, 0.95, looks=5, experiments=3)
    assert running(sim.evidence.p_value).shape == (3, 5) and np.all(np.diff(running(sim.evidence.p_value), axis=-1) <= 0)


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, math.nan, math.inf, "0.05", None])
def test_an_alpha_outside_zero_one_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        compare(Arm.classifier(100, 90), Arm.classifier(100, 95), alpha, higher_is_better=True)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Arm.classifier(-1, 0), "n"),
        (lambda: Arm.classifier(10, -1), "correct"),
        (lambda: Arm.classifier(10, 11), "correct"),
        (lambda: Arm.classifier(math.nan, 0), "n"),
        (lambda: Arm.classifier(np.array([10, 10]), np.array([5, 11])), "correct"),
        (lambda: Arm.regressor(-5, 1.0, 1.0), "n"),
        (lambda: Arm.regressor(10, -1.0, 1.0), "abs_error_sum"),
        (lambda: Arm.regressor(10, 1.0, -1.0), "squared_error_sum"),
        (lambda: Arm.regressor(10, 1.0, math.inf), "squared_error_sum"),
        (lambda: compare(Arm.classifier(100, 90), Arm.classifier(100, 95), ALPHA, True, tau=0), "tau"),
        (lambda: compare(Arm.classifier(100, 90), Arm.classifier(100, 95), ALPHA, True, tau=-0.05), "tau"),
        (lambda: compare(Arm.classifier(100, 90), Arm.regressor(100, 5.0, 30.0), ALPHA, True), "challenger"),
    ],
)
def test_invalid_counters_are_refused_naming_the_field(make, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        make()
