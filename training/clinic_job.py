"""A team's own training job, written the way a data scientist would, without `mlops train`.

It fits a scikit-learn Pipeline on a pandas DataFrame: three numeric measurements scaled, and a
categorical column (`clinic`, strings) one-hot encoded. It logs the model with MLflow's own API,
with the signature and input example of the DataFrame, registers a version and points the
`champion` alias at it. The platform then serves it like any other model: name it in
deployments.yaml (`cancer: {variants: {champion: {alias: champion, weight: 100}}}`), `mlops sync`,
and call it with one V2 input per column (README, "Your own training jobs").

Run: MLFLOW_TRACKING_URI=<registry> python -m training.clinic_job [--model-name cancer]
The data ship with scikit-learn (breast cancer measurements); the clinic is assigned with a fixed
seed, so every run fits the same model.
"""

from __future__ import annotations

import argparse

import numpy as np

NUMERIC = ["radius", "texture", "perimeter"]
CATEGORICAL = ["clinic"]
CLINICS = ["north", "south", "east"]


def load_frame():
    """The training frame (columns NUMERIC + CATEGORICAL) and the target (1 = benign)."""
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns={"mean radius": "radius", "mean texture": "texture", "mean perimeter": "perimeter"})
    X = frame[NUMERIC].astype("float64")
    X = X.assign(clinic=pd.Series(np.random.default_rng(0).choice(CLINICS, len(X)), index=X.index, dtype=object))
    return X, data.target


def build_pipeline():
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    features = ColumnTransformer([("numeric", StandardScaler(), NUMERIC), ("clinic", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL)])
    return Pipeline([("features", features), ("classifier", LogisticRegression(max_iter=1000))])


def main(model_name: str = "cancer", alias: str = "champion") -> str:
    """Fit, log, register and alias; returns the registered version."""
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.model_selection import train_test_split

    X, y = load_frame()
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    pipeline = build_pipeline().fit(X_train, y_train)
    mlflow.set_experiment(model_name)
    with mlflow.start_run(run_name="pipeline"):
        mlflow.log_metric("test_accuracy", float(pipeline.score(X_test, y_test)))
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            signature=infer_signature(X_train, pipeline.predict(X_train)),
            input_example=X_train.head(2),
            registered_model_name=model_name,
        )
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(model_name, alias, version)
    print(f"registered {model_name} version {version} as @{alias}")
    return version


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="cancer")
    parser.add_argument("--alias", default="champion")
    args = parser.parse_args()
    main(args.model_name, args.alias)
