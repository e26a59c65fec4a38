# The serving image: MLServer plus this project's runtimes. One container serves one model,
# chosen by MLSERVER_MODEL_* environment variables (see mlops/render/seldon.py); the runtime downloads
# the pinned version from the MLflow registry at startup, so no model files are baked in.
FROM python:3.11-slim

# Bytecode is compiled at install (pip's default): without it every start compiles MLflow and
# scikit-learn anew, which doubles start-up time.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 mlserver

WORKDIR /app
COPY requirements-serving.lock .
RUN pip install -r requirements-serving.lock
COPY pyproject.toml .
COPY mlops mlops
COPY runtimes runtimes
COPY training training
RUN pip install --no-deps .
# Server settings as `mlops sync` generated them (parallel workers, gzip, gRPC message limit):
# README "Performance" has the measurements behind them.
COPY model-settings/settings.json /app/server/settings.json

# Numeric, so Kubernetes can enforce runAsNonRoot.
USER 1000
ENV MLSERVER_HTTP_PORT=8080 \
    MLSERVER_GRPC_PORT=8081 \
    MLSERVER_METRICS_PORT=8082 \
    MLSERVER_METRICS_DIR=/tmp/mlserver-metrics
EXPOSE 8080 8081 8082
# `mlserver start` with this project's changes to MLServer (runtimes/server.py). /app/server holds
# no model-settings.json, so MLServer builds the one model from the environment.
CMD ["python", "-m", "runtimes.server", "start", "/app/server"]
