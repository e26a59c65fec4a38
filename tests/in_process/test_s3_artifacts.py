"""s3:// artifacts: the runtime loads a model through MLflow's artifact download from an S3 API.

`moto_server` stands in for S3: a local HTTP server speaking the S3 API, which boto3 (what MLflow
downloads s3:// artifacts with) calls as it would AWS; MLFLOW_S3_ENDPOINT_URL points MLflow at it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, in_registry
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest, RequestInput, RequestOutput

from mlops.supervise.processes import wait_for
from runtimes.artifacts import ModelLoadError
from runtimes.registry_sklearn import RegistrySKLearnRuntime

BUCKET = "models"
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3]])


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on a free local port, with MLflow and boto3 pointed at it."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(f"{endpoint}/moto-api/", proc, 60, interval=0.2), f"moto_server did not start (exit code {proc.poll()})"
        for name, value in {
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def load(uri: str) -> RegistrySKLearnRuntime:
    runtime = RegistrySKLearnRuntime(ModelSettings(name="iris-s3", implementation=RegistrySKLearnRuntime, parameters=ModelParameters(uri=uri)))
    asyncio.run(runtime.load_model())
    return runtime


def predict(runtime: RegistrySKLearnRuntime) -> dict[str, np.ndarray]:
    outputs = ["predict", "predict_proba"]
    req = InferenceRequest(
        inputs=[RequestInput(name="input-0", shape=list(ROWS.shape), datatype="FP64", data=ROWS.reshape(-1).tolist())],
        outputs=[RequestOutput(name=o) for o in outputs],
    )
    response = asyncio.run(runtime.predict(req))
    return {o.name: np.asarray(o.data.root).reshape(o.shape) for o in response.outputs}


def test_model_loads_from_s3_and_answers_as_the_local_artifact(trained, s3):
    import boto3

    local = Path(in_registry(trained, "print(client.get_model_version_download_uri('iris', '1'))").removeprefix("file://"))
    client = boto3.client("s3", endpoint_url=s3)
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"iris/1/{path.relative_to(local).as_posix()}")

    got, expected = predict(load(f"s3://{BUCKET}/iris/1")), predict(load(str(local)))
    for name in ("predict", "predict_proba"):
        np.testing.assert_array_equal(got[name], expected[name])

    with pytest.raises(ModelLoadError, match=rf"cannot fetch model artifact s3://{BUCKET}/iris/9"):
        load(f"s3://{BUCKET}/iris/9")
