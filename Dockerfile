# The serving image: MLServer plus this project's runtimes. One container serves one model,
# chosen by MLSERVER_MODEL_* environment variables (see mlops/seldon.py); the runtime downloads
# the pinned version from the MLflow registry at startup, so no model files are baked in.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 mlserver \
    && mkdir /mnt/models \
    && chown mlserver /mnt/models

WORKDIR /app
COPY requirements.lock .
RUN pip install -r requirements.lock
COPY pyproject.toml .
COPY mlops mlops
COPY runtimes runtimes
COPY training training
RUN pip install --no-deps .

# Numeric, so Kubernetes can enforce runAsNonRoot.
USER 1000
ENV MLSERVER_HTTP_PORT=8080 \
    MLSERVER_GRPC_PORT=8081 \
    MLSERVER_METRICS_PORT=8082
EXPOSE 8080 8081 8082
# /mnt/models holds no model-settings.json, so MLServer builds the one model from the environment.
CMD ["mlserver", "start", "/mnt/models"]
