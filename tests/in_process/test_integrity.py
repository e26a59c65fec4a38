"""A model's files are checked against the sha256 digests `mlops train` recorded on its registry version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
from conftest import in_registry, mlops, new_project
from test_runtime_safety import load_runtime

from runtimes.artifacts import ModelLoadError
from runtimes.integrity import TAG

SPEC = "models:\n  iris:\n    variants:\n      champion: {alias: champion, weight: 100}\n"


def test_tampered_artifact_is_refused_naming_the_file_and_both_digests(tmp_path, monkeypatch):
    project = new_project(tmp_path / "project", SPEC)
    mlops(project, "train", "-m", "iris", check=True)
    answer = in_registry(
        project,
        "import json; v = client.get_model_version_by_alias('iris', 'champion')\n"
        f"print(json.dumps([v.version, client.get_model_version_download_uri('iris', v.version), v.tags.get({TAG!r})]))",
    ).splitlines()[-1]
    version, location, recorded = json.loads(answer)
    digests = json.loads(recorded)
    model_dir = Path(url2pathname(urlparse(location).path))
    skops = model_dir / "model.skops"
    assert digests["model.skops"] == hashlib.sha256(skops.read_bytes()).hexdigest() and "MLmodel" in digests

    monkeypatch.setenv("MLFLOW_TRACKING_URI", in_registry(project, "print(client.tracking_uri)").splitlines()[-1])
    uri = f"models:/iris/{version}"
    assert load_runtime(uri)._model is not None, "untouched files load"
    skops.write_bytes(skops.read_bytes() + b"\0")
    tampered = hashlib.sha256(skops.read_bytes()).hexdigest()
    with pytest.raises(ModelLoadError) as err:
        load_runtime(uri)
    assert f"{skops}: sha256 {tampered} differs from the {digests['model.skops']} recorded at registration" in str(err.value)
