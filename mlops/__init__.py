"""The `mlops` command: train, sync, serve, validate."""
