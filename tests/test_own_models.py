"""Models teams register with their own jobs: DataFrame signatures, a categorical column, custom pyfunc.

The example job in training/clinic_job.py logs a Pipeline (scaler + one-hot encoder) from a DataFrame
into the project's registry with MLflow's own API; a custom `mlflow.pyfunc.PythonModel` with
`code_paths` is logged beside it, twice: once for a model whose spec declares trust, once for one
that does not. Then sync, serve, and call them with tritonclient over REST and gRPC, next to stock
MLServer with `mlserver_mlflow.MLflowRuntime` on the same version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import REPO, Server, free_port, mlops, stop_group
from tritonclient.utils import InferenceServerException

from mlops.supervise.processes import wait_for

COLUMNS = ["radius", "texture", "perimeter", "clinic"]
ROWS = {"radius": [14.1, 20.6, 9.5], "texture": [19.3, 29.3, 12.4], "perimeter": [91.9, 140.1, 60.3], "clinic": ["north", "east", "south"]}
SPEC_ADDITION = """
  cancer:
    variants:
      champion: {alias: champion, weight: 100}
  doubler:
    variants:
      champion: {alias: champion, weight: 100}
    trust:
      allow_pickle: true
  untrusted:
    variants:
      champion: {alias: champion, weight: 100}
"""
PYFUNC = """
import mlflow, sys
from pathlib import Path
sys.path.insert(0, {code!r})
import offsets

class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        import offsets
        return model_input["x"] * 2 + offsets.OFFSET

mlflow.set_experiment("pyfunc")
client = mlflow.MlflowClient()
for name in ("doubler", "untrusted"):
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=Doubler(), code_paths=[{code!r} + "/offsets.py"],
            signature=mlflow.models.infer_signature(__import__("pandas").DataFrame({{"x": [1.0]}}), [2.0]),
            registered_model_name=name,
        )
    client.set_registered_model_alias(name, "champion", info.registered_model_version)
"""


def _registry_env(project: Path) -> dict:
    from mlops.domain.registry import default_registry

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        env["MLFLOW_TRACKING_URI"] = default_registry(project).tracking_uri
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return env


@pytest.fixture(scope="module")
def own(trained, tmp_path_factory):
    """The trained project plus the example job's model and two custom pyfunc models, served."""
    import shutil

    project = tmp_path_factory.mktemp("own") / "project"
    shutil.copytree(trained, project, symlinks=True)
    env = _registry_env(project)
    job = subprocess.run(
        [sys.executable, "-m", "training.clinic_job"], cwd=project, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300
    )
    assert job.returncode == 0, job.stderr[-3000:]
    code = project / "code"
    code.mkdir()
    (code / "offsets.py").write_text("OFFSET = 0.5\n")
    logged = subprocess.run([sys.executable, "-c", PYFUNC.format(code=str(code))], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert logged.returncode == 0, logged.stderr[-3000:]
    (project / "deployments.yaml").write_text((project / "deployments.yaml").read_text() + SPEC_ADDITION)
    mlops(project, "sync", check=True)
    srv = Server(project)
    try:
        srv.wait_ready_models(["cancer", "cancer-champion", "doubler"])
        yield project, srv, env
    finally:
        srv.stop()


def _inputs(module, rows: dict, binary: bool | None = None) -> list:
    out = []
    for name in COLUMNS:
        values = np.array(rows[name], dtype=object if name == "clinic" else np.float64)
        inp = module.InferInput(name, [len(values)], "BYTES" if name == "clinic" else "FP64")
        if binary is None:
            inp.set_data_from_numpy(values)
        else:
            inp.set_data_from_numpy(values, binary_data=binary)
        out.append(inp)
    return out


def _expected(env: dict, method: str = "predict") -> list:
    code = (
        "import json, mlflow.sklearn, pandas as pd\n"
        "m = mlflow.sklearn.load_model('models:/cancer@champion')\n"
        f"print(json.dumps(getattr(m, {method!r})(pd.DataFrame({json.dumps(ROWS)})).tolist()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_metadata_lists_one_input_per_column(own):
    _, srv, _ = own
    rest = httpclient.InferenceServerClient(srv.url)
    for name in ("cancer", "cancer-champion"):
        inputs = rest.get_model_metadata(name)["inputs"]
        assert [(i["name"], i["datatype"], i["shape"]) for i in inputs] == [
            ("radius", "FP64", [-1, 1]), ("texture", "FP64", [-1, 1]), ("perimeter", "FP64", [-1, 1]), ("clinic", "BYTES", [-1, 1])
        ], name  # fmt: skip
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc}")
    assert [(i.name, i.datatype) for i in grpc.get_model_metadata("cancer").inputs] == [
        ("radius", "FP64"),
        ("texture", "FP64"),
        ("perimeter", "FP64"),
        ("clinic", "BYTES"),
    ]


def test_rest_and_grpc_answers_equal_the_models_own_predictions(own):
    _, srv, env = own
    expected, proba = _expected(env), _expected(env, "predict_proba")
    rest = httpclient.InferenceServerClient(srv.url)
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc}")
    for name in ("cancer", "cancer-champion"):
        got = rest.infer(name, _inputs(httpclient, ROWS, binary=False), outputs=[httpclient.InferRequestedOutput("predict", binary_data=False)])
        assert got.as_numpy("predict").reshape(-1).tolist() == expected, name
        got = grpc.infer(
            name, _inputs(grpcclient, ROWS), outputs=[grpcclient.InferRequestedOutput("predict"), grpcclient.InferRequestedOutput("predict_proba")]
        )
        assert got.as_numpy("predict").reshape(-1).tolist() == expected, name
        assert np.allclose(got.as_numpy("predict_proba"), proba), name
    assert rest.infer("cancer", _inputs(httpclient, ROWS, binary=False)).get_response()["parameters"]["variant"] == "champion"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda rows: rows.pop("clinic"), "missing input(s) 'clinic' BYTES (string)"),
        (lambda rows: rows.update(colour=[1.0, 2.0, 3.0]), "unknown input(s) 'colour'"),
        (lambda rows: rows.update(clinic=[1.0, 2.0, 3.0]), "input 'clinic' has datatype FP64; the model expects BYTES (string)"),
        (lambda rows: rows.update(radius=["a", "b", "c"]), "input 'radius' has datatype BYTES; the model expects FP64 (double)"),
        (lambda rows: rows.update(texture=[1.0, 2.0]), "input 'texture' has 2 rows"),
    ],
    ids=["missing", "extra", "string-as-number", "number-as-string", "short"],
)
def test_every_bad_column_gets_a_400_naming_it(own, change, message):
    _, srv, _ = own
    rows = {k: list(v) for k, v in ROWS.items()}
    change(rows)
    inputs = []
    for name, values in rows.items():
        is_text = isinstance(values[0], str)
        inp = httpclient.InferInput(name, [len(values)], "BYTES" if is_text else "FP64")
        inp.set_data_from_numpy(np.array(values, dtype=object if is_text else np.float64), binary_data=False)
        inputs.append(inp)
    with pytest.raises(InferenceServerException) as err:
        httpclient.InferenceServerClient(srv.url).infer("cancer", inputs)
    assert err.value.status() == "400" and message in err.value.message(), err.value.message()
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc}")
    assert grpc.is_model_ready("cancer"), "the server keeps serving"


def test_one_row_major_tensor_is_refused_when_a_column_is_a_string(own):
    _, srv, _ = own
    inp = httpclient.InferInput("input-0", [1, 4], "FP64")
    inp.set_data_from_numpy(np.array([[1.0, 2.0, 3.0, 4.0]]), binary_data=False)
    with pytest.raises(InferenceServerException, match="unknown input"):
        httpclient.InferenceServerClient(srv.url).infer("cancer", [inp])


def test_custom_pyfunc_is_served_only_with_declared_trust(own):
    project, srv, _ = own
    inp = httpclient.InferInput("x", [2], "FP64")
    inp.set_data_from_numpy(np.array([1.0, 3.0]), binary_data=False)
    assert httpclient.InferenceServerClient(srv.url).infer("doubler", [inp]).as_numpy("predict").reshape(-1).tolist() == [2.5, 6.5]
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://{srv.url}/v2/models/untrusted/ready", timeout=10)
    assert "deployments.yaml models.untrusted.trust.allow_pickle: true" in srv.output()


def test_stock_mlflow_runtime_gives_identical_predictions_and_input_names(own, tmp_path):
    """MLServer's own MLflow runtime on the same version: same input names, same answers."""
    _, srv, env = own
    settings = tmp_path / "stock"
    (settings / "cancer").mkdir(parents=True)
    (settings / "cancer" / "model-settings.json").write_text(
        json.dumps({"name": "cancer", "implementation": "mlserver_mlflow.MLflowRuntime", "parameters": {"uri": "models:/cancer/1"}})
    )
    ports = free_port(), free_port(), free_port()
    stock_env = {
        **env,
        "MLSERVER_HTTP_PORT": str(ports[0]),
        "MLSERVER_GRPC_PORT": str(ports[1]),
        "MLSERVER_METRICS_PORT": str(ports[2]),
        "MLSERVER_METRICS_DIR": str(tmp_path / "m"),
    }
    log = open(tmp_path / "stock.log", "w+")
    mlserver = str(Path(sys.executable).with_name("mlserver"))
    proc = subprocess.Popen([mlserver, "start", str(settings)], env=stock_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        stock = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        ready = wait_for(f"http://127.0.0.1:{ports[0]}/v2/models/cancer/ready", proc, timeout=120)
        log.seek(0)
        assert ready, log.read()[-3000:]
        ours = httpclient.InferenceServerClient(srv.url)
        assert [i["name"] for i in stock.get_model_metadata("cancer")["inputs"]] == [i["name"] for i in ours.get_model_metadata("cancer")["inputs"]]
        theirs = stock.infer("cancer", _inputs(httpclient, ROWS, binary=False)).get_response()["outputs"][0]["data"]
        mine = ours.infer("cancer", _inputs(httpclient, ROWS, binary=False)).as_numpy("predict").reshape(-1).tolist()
        assert [int(x) for x in theirs] == mine
    finally:
        stop_group(proc)
        log.close()
