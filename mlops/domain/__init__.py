"""Domain: the deployment spec and the MLflow registry; imports nothing of mlops."""
