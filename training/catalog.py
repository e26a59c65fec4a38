"""What `mlops train` fits: data that ships with scikit-learn, two or more candidates per model.

The best candidate on held-out data becomes `champion`, the runner-up `challenger`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sklearn.datasets import load_diabetes, load_iris, load_wine
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier


@dataclass(frozen=True)
class Job:
    load: Callable
    task: str  # "classification" or "regression"
    candidates: dict[str, Callable[[], object]]  # candidate name -> fresh estimator

    @property
    def score_metric(self) -> str:
        return "accuracy" if self.task == "classification" else "r2"


JOBS: dict[str, Job] = {
    "iris": Job(
        load_iris,
        "classification",
        {
            "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
            # A single shallow tree: one-row predictions in microseconds (a 50-tree forest takes ~3 ms).
            "decision-tree": lambda: DecisionTreeClassifier(max_depth=3, random_state=0),
        },
    ),
    "wine": Job(
        load_wine,
        "classification",
        {
            "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000)),
            "random-forest": lambda: RandomForestClassifier(n_estimators=100, random_state=0),
        },
    ),
    "diabetes": Job(
        load_diabetes,
        "regression",
        {
            "ridge": lambda: Ridge(alpha=0.5),
            "gradient-boosting": lambda: GradientBoostingRegressor(n_estimators=100, max_depth=2, random_state=0),
        },
    ),
}

# skops refuses to load any type it does not know to be safe. These were reviewed:
# trees store raw node indices that scikit-learn trusts, which is safe for models
# this project trains itself. Anything else a candidate needs fails training loudly.
REVIEWED_TRUSTED_TYPES = frozenset({"sklearn.tree._tree.Tree"})
