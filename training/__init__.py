"""Training jobs: fit, log and register models in MLflow."""
