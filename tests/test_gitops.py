"""The GitOps half, offline: generated Seldon manifests plus clusters/ pass `validate`, and every rule bites.

Each test builds a throwaway repository (the real clusters/ and freshly rendered seldon/) in
tmp_path, so no registry, cluster or previous `mlops sync` is needed; kubectl must be on PATH.
"""

from __future__ import annotations

import copy
import os
import sys
import difflib
import importlib.metadata
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mlops import seldon
from mlops.registry import ResolvedVariant
from mlops.spec import DeploymentSpec
from mlops.validate import KUBECTL_MISSING, default_crds_dir, validate

ROOT = Path(__file__).resolve().parents[1]
CRDS = default_crds_dir(ROOT)
ALIAS_VERSION = "7"  # what the fake registry resolves every alias to

SPEC = {
    "environments": {"dev": {}, "stage": {"replicas": 2}, "prod": {"replicas": 3, "cpu": "1", "memory": "1Gi"}},
    "models": {
        "iris": {
            "variants": {
                "champion": {"alias": "champion", "weight": 90},
                "challenger": {"version": 2, "weight": 10},
                "candidate": {"version": 3, "shadow": True},
            },
            "environments": {"prod": {"weights": {"champion": 100, "challenger": 0}}},
        },
        "wine": {"variants": {"champion": {"version": 1, "weight": 100}}},
    },
}


def fake_resolve(spec: DeploymentSpec) -> dict[str, list[ResolvedVariant]]:
    return {
        m: [
            ResolvedVariant(m, n, str(v.version or ALIAS_VERSION), v.alias, v.weight, v.shadow)
            for n, v in model.variants.items()
        ]
        for m, model in spec.models.items()
    }


def render(spec_data: dict = SPEC) -> dict[str, str]:
    spec = DeploymentSpec.model_validate(spec_data)
    return seldon.render(spec, fake_resolve(spec), seldon.SERVING_IMAGE)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "clusters", tmp_path / "clusters")
    for rel, text in render().items():
        path = tmp_path / seldon.OUTPUT_DIR / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def kustomize(path: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def add_to_monitoring(repo: Path, name: str, text: str) -> None:
    (repo / "clusters/base/monitoring" / name).write_text(text)
    edit(repo / "clusters/base/monitoring/kustomization.yaml", "resources:\n", f"resources:\n  - {name}\n")


def test_generated_repository_is_valid(repo):
    assert validate(repo, CRDS) == []


def test_seldon_deployment_serves_the_pinned_version_with_project_image(repo):
    sdeps = {d["metadata"]["name"]: d for d in kustomize(repo / "seldon/overlays/prod")}
    iris = sdeps["iris"]
    assert iris["apiVersion"] == "machinelearning.seldon.io/v1" and iris["spec"]["protocol"] == "v2"
    assert iris["metadata"]["namespace"] == seldon.NAMESPACE
    preds = iris["spec"]["predictors"]
    assert [(p["name"], p.get("traffic"), p.get("shadow", False), p["replicas"]) for p in preds] == [
        ("champion", 100, False, 3),
        ("challenger", 0, False, 3),
        ("candidate", None, True, 3),
    ]
    champion = preds[0]
    graph = champion["graph"]
    assert graph["type"] == "MODEL" and "modelUri" not in graph and "implementation" not in graph
    pod = champion["componentSpecs"][0]
    (container,) = pod["spec"]["containers"]
    assert container["name"] == graph["name"] == "iris-champion"
    assert container["image"] == seldon.SERVING_IMAGE
    assert {e["name"]: e["value"] for e in container["env"]} == {
        "MLSERVER_MODEL_NAME": "iris-champion",
        "MLSERVER_MODEL_VERSION": ALIAS_VERSION,
        "MLSERVER_MODEL_IMPLEMENTATION": "runtimes.registry_sklearn.RegistrySKLearnRuntime",
        "MLSERVER_MODEL_URI": f"models:/iris/{ALIAS_VERSION}",
    }
    assert container["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}}]
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}
    assert pod["metadata"]["labels"] == {"mlops/model": "iris", "mlops/model-version": ALIAS_VERSION, "mlops/variant": "champion"}
    assert pod["metadata"]["annotations"]["mlops/registry-uri"] == f"models:/iris/{ALIAS_VERSION}"
    dev = {d["metadata"]["name"]: d for d in kustomize(repo / "seldon/overlays/dev")}
    assert [p.get("traffic") for p in dev["iris"]["spec"]["predictors"]] == [90, 10, None]


def test_every_file_is_marked_generated_and_rendering_is_deterministic():
    files = render()
    assert files == render()
    assert all(text.startswith(seldon.HEADER) for text in files.values())
    assert {"base/kustomization.yaml", "base/iris.yaml", "overlays/prod/kustomization.yaml", "overlays/prod/wine.yaml"} <= set(files)


def test_serving_image_is_tagged_with_the_project_version():
    assert seldon.SERVING_IMAGE.rsplit(":", 1)[1] == importlib.metadata.version("mlops-platform")


@pytest.mark.parametrize("image", ["ghcr.io/example/mlops-serving:latest", "ghcr.io/example/mlops-serving", "localhost:5000/serving"])
def test_render_refuses_unpinned_image(image):
    spec = DeploymentSpec.model_validate(SPEC)
    with pytest.raises(ValueError, match="must name a version tag"):
        seldon.render(spec, fake_resolve(spec), image)


def test_changing_one_weight_changes_only_traffic_lines():
    changed = copy.deepcopy(SPEC)
    changed["models"]["iris"]["variants"]["champion"]["weight"] = 75
    changed["models"]["iris"]["variants"]["challenger"]["weight"] = 25
    before, after = render(), render(changed)
    assert before.keys() == after.keys()
    diffs = {
        rel: [line for line in difflib.ndiff(before[rel].splitlines(), after[rel].splitlines()) if line[:1] in "+-"]
        for rel in before
        if before[rel] != after[rel]
    }
    # prod overrides the weights, so only the environments using the defaults change.
    assert sorted(diffs) == ["overlays/dev/iris.yaml", "overlays/stage/iris.yaml"]
    for lines in diffs.values():
        assert len(lines) == 4 and all("/traffic," in line for line in lines), lines


def break_traffic(repo):
    edit(repo / "seldon/overlays/prod/iris.yaml", "/spec/predictors/0/traffic, value: 100}", "/spec/predictors/0/traffic, value: 90}")


def pin_to_alias(repo):
    edit(repo / "seldon/base/iris.yaml", "value: models:/iris/2", "value: models:/iris@challenger")


def use_latest_tag(repo):
    edit(repo / "seldon/base/wine.yaml", f"image: {seldon.SERVING_IMAGE}", "image: ghcr.io/example/mlops-serving:latest")


def add_plaintext_secret(repo):
    add_to_monitoring(repo, "secret.yaml", "apiVersion: v1\nkind: Secret\nmetadata:\n  name: grafana-admin\n  namespace: monitoring\nstringData:\n  admin-password: hunter2\n")


def add_broken_dashboard(repo):
    add_to_monitoring(
        repo,
        "dashboards.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: model-dashboards\n  namespace: monitoring\n"
        '  labels:\n    grafana_dashboard: "1"\ndata:\n  models.json: \'{"title": "Models", "panels": [\'\n',
    )


def add_unknown_kind(repo):
    add_to_monitoring(repo, "gateway.yaml", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: seldon-gateway\n  namespace: istio-system\n")


def misspell_seldon_field(repo):
    edit(repo / "seldon/base/wine.yaml", "type: MODEL\n", "type: MODEL\n      modelURI: models:/wine/1\n")


def mistype_core_field(repo):
    edit(repo / "clusters/base/infrastructure/namespaces.yaml", "istio-injection: enabled", "istio-injection: true")


def drop_overlay(repo):
    shutil.rmtree(repo / "seldon/overlays/stage")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (break_traffic, "seldon/overlays/prod (SeldonDeployment/iris): spec.predictors[].traffic: non-shadow traffic sums to 90, must be 100"),
        (
            pin_to_alias,
            "seldon/overlays/dev (SeldonDeployment/iris): spec.predictors[1].componentSpecs[0].spec.containers[0].env[3].value: "
            "MLSERVER_MODEL_URI 'models:/iris@challenger' is not pinned",
        ),
        (
            use_latest_tag,
            "seldon/overlays/stage (SeldonDeployment/wine): spec.predictors[0].componentSpecs[0].spec.containers[0].image: "
            "image 'ghcr.io/example/mlops-serving:latest' uses the tag 'latest'",
        ),
        (add_plaintext_secret, "clusters/base/monitoring (Secret/grafana-admin): stringData: plaintext Secret in Git"),
        (add_broken_dashboard, "clusters/base/monitoring (ConfigMap/model-dashboards): data['models.json']: not valid JSON"),
        (add_unknown_kind, "clusters/base/monitoring (Gateway/seldon-gateway): kind: unknown kind Gateway in networking.istio.io/v1"),
        (misspell_seldon_field, "seldon/overlays/dev (SeldonDeployment/wine): spec.predictors[0].graph.modelURI: unknown field"),
        (mistype_core_field, "clusters/prod/infrastructure (Namespace/models): metadata.labels.istio-injection: True is not of type 'string'"),
        (drop_overlay, "clusters/stage (Kustomization/apps): spec.path: './seldon/overlays/stage' does not exist"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_each_rule_names_file_object_and_field(repo, mutate, expected):
    mutate(repo)
    errors = validate(repo, CRDS)
    assert any(e.startswith(expected) for e in errors), "\n".join(errors)
    # Nothing else is reported: the same object, field and problem, once per path that renders it.
    same = expected.split(" (", 1)[1]
    assert all(e.split(" (", 1)[1].startswith(same) for e in errors), "\n".join(errors)


def test_sops_encrypted_secret_and_real_dashboard_pass(repo):
    add_to_monitoring(
        repo,
        "secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: grafana-admin\n  namespace: monitoring\n"
        "stringData:\n  admin-password: ENC[AES256_GCM,data:abc,iv:def,tag:ghi,type:str]\n"
        "sops:\n  age:\n    - recipient: age1example\n  version: 3.9.0\n",
    )
    add_to_monitoring(
        repo,
        "dashboards.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: model-dashboards\n  namespace: monitoring\n"
        '  labels:\n    grafana_dashboard: "1"\ndata:\n  models.json: \'{"title": "Models", "panels": []}\'\n',
    )
    assert validate(repo, CRDS) == []


def test_missing_kubectl_is_explained(repo, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert validate(repo, CRDS) == [KUBECTL_MISSING]


def test_committed_repository_is_valid():
    """What CI's `mlops validate` checks: the clusters and generated manifests as committed."""
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("mlops")), "validate"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLOPS_PROJECT_DIR": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "are valid" in proc.stdout
