"""The registry-native runtime loads only what skops and MLmodel vouch for."""

from __future__ import annotations

import asyncio
import pickle
import shutil

import pytest
import yaml
from mlserver.settings import ModelParameters, ModelSettings
from sklearn.linear_model import LogisticRegression

from runtimes.artifacts import ModelLoadError, load_estimator
from runtimes.registry_sklearn import RegistrySKLearnRuntime


def artifact_dirs(project):
    return sorted(p.parent for p in (project / ".mlops" / "artifacts").rglob("MLmodel"))


def tree_model_dir(project):
    for d in artifact_dirs(project):
        if "sklearn.tree._tree.Tree" in (d / "MLmodel").read_text():
            return d
    raise AssertionError("no tree model was trained")


def load_runtime(uri: str, **extra) -> RegistrySKLearnRuntime:
    """Raises what stops the load; MLServer's load() turns it into a not-ready model (tests/test_reliability.py)."""
    settings = ModelSettings(name="m", implementation=RegistrySKLearnRuntime, parameters=ModelParameters(uri=uri, extra=extra))
    runtime = RegistrySKLearnRuntime(settings)
    asyncio.run(runtime.load_model())
    return runtime


def test_pickle_only_artifact_is_refused_unless_allowed(tmp_path):
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(LogisticRegression().fit([[0], [1]], [0, 1])))
    with pytest.raises(ModelLoadError, match=r"model.pkl: refusing to load a pickle \(it can run arbitrary code\)"):
        load_runtime(str(tmp_path))
    assert load_runtime(str(tmp_path), allow_pickle=True)._model.predict([[1]])[0] == 1


def test_cloudpickle_flavor_is_refused(trained, tmp_path):
    model_dir = shutil.copytree(artifact_dirs(trained)[0], tmp_path / "m")
    meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    meta["flavors"]["sklearn"]["serialization_format"] = "cloudpickle"
    (model_dir / "MLmodel").write_text(yaml.safe_dump(meta))
    with pytest.raises(ModelLoadError, match="refusing to load a cloudpickle artifact"):
        load_estimator(model_dir)


def test_skops_type_not_recorded_as_trusted_is_refused_by_name(trained, tmp_path):
    model_dir = shutil.copytree(tree_model_dir(trained), tmp_path / "m")
    meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    meta["flavors"]["sklearn"]["skops_trusted_types"] = []
    (model_dir / "MLmodel").write_text(yaml.safe_dump(meta))
    with pytest.raises(ModelLoadError, match=r"untrusted skops type\(s\) sklearn.tree._tree.Tree"):
        load_estimator(model_dir)
    assert load_estimator(model_dir, extra_trusted=["sklearn.tree._tree.Tree"]) is not None


def test_corrupt_artifact_names_the_file(trained, tmp_path):
    model_dir = shutil.copytree(artifact_dirs(trained)[0], tmp_path / "m")
    (model_dir / "model.skops").write_bytes(b"not a zip file")
    with pytest.raises(ModelLoadError, match=r"model.skops: cannot load skops file"):
        load_estimator(model_dir)
    with pytest.raises(ModelLoadError, match="model artifact not found"):
        load_runtime(str(tmp_path / "missing"))
