"""The GitOps half, offline: generated Seldon manifests plus clusters/ pass `validate`, and every rule bites.

Each test builds a throwaway repository (the real clusters/ and freshly rendered seldon/) in
tmp_path, so no registry, cluster or previous `mlops sync` is needed; kubectl must be on PATH.
"""

from __future__ import annotations

import copy
import difflib
import importlib.metadata
import json
import os
import random
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import python_output

from mlops.check import cluster, plaintext
from mlops.check.validate import KUBECTL_MISSING, default_crds_dir, validate
from mlops.domain.registry import ResolvedVariant
from mlops.domain.spec import DeploymentSpec
from mlops.render import seldon
from mlops.supervise.serve import mlserver_command
from runtimes.contract import SELDON_DIR, SERVER_MODULE, VARIANT_WEIGHT

ROOT = Path(__file__).resolve().parents[1]
CRDS = default_crds_dir(ROOT)
ALIAS_VERSION = "7"  # what the fake registry resolves every alias to

ISSUER = "https://login.example.org/"
JWT = {"issuer": ISSUER, "jwks_uri": f"{ISSUER}keys", "audiences": ["models"]}
SPEC = {
    "environments": {
        "dev": {"auth": "none"},
        "stage": {"replicas": 2, "auth": {"jwt": JWT}},
        "prod": {"replicas": 3, "cpu": "1", "memory": "1Gi", "auth": {"jwt": JWT}, "tls": {"credential_name": "ingress-cert"}},
    },
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
        m: [ResolvedVariant(m, n, str(v.version or ALIAS_VERSION), v.alias, v.weight, v.shadow) for n, v in model.variants.items()]
        for m, model in spec.models.items()
    }


def render(spec_data: dict = SPEC) -> dict[str, str]:
    spec = DeploymentSpec.model_validate(spec_data)
    return seldon.render(spec, fake_resolve(spec), seldon.SERVING_IMAGE)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "clusters", tmp_path / "clusters")
    (tmp_path / "model-settings").mkdir()
    for rel in ("Dockerfile", "model-settings/settings.json"):  # the image, whose ENV, USER and settings the pods run with
        shutil.copy(ROOT / rel, tmp_path / rel)
    for rel, text in render().items():
        path = tmp_path / SELDON_DIR / rel
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
    # Every predictor serves the public name (Seldon's A/B pattern); the variant is in MLSERVER_MODEL_EXTRA.
    assert {p["graph"]["name"] for p in preds} == {c["name"] for p in preds for c in p["componentSpecs"][0]["spec"]["containers"]} == {"iris"}
    assert container["name"] == graph["name"] == "iris"
    assert container["image"] == seldon.SERVING_IMAGE
    assert {e["name"]: e["value"] for e in container["env"]} == {
        "MLSERVER_MODEL_NAME": "iris",
        "MLSERVER_MODEL_VERSION": ALIAS_VERSION,
        "MLSERVER_MODEL_IMPLEMENTATION": "runtimes.registry_sklearn.RegistrySKLearnRuntime",
        "MLSERVER_MODEL_URI": f"models:/iris/{ALIAS_VERSION}",
        "MLSERVER_MODEL_EXTRA": json.dumps({"alias": "champion", "registered_model": "iris", "shadow": False, "variant": "champion"}),
    }
    assert pod["spec"]["securityContext"]["runAsUser"] == seldon.IMAGE_UID
    assert container["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}}]
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}
    assert pod["metadata"]["labels"] == {"mlops/model": "iris", "mlops/model-version": ALIAS_VERSION, "mlops/variant": "champion", "mlops/role": "live"}
    assert pod["metadata"]["annotations"]["mlops/registry-uri"] == f"models:/iris/{ALIAS_VERSION}"
    dev = {d["metadata"]["name"]: d for d in kustomize(repo / "seldon/overlays/dev")}
    assert [p.get("traffic") for p in dev["iris"]["spec"]["predictors"]] == [90, 10, None]


def test_every_file_is_marked_generated_and_rendering_is_deterministic(tmp_path):
    """Processes with other hash seeds in other folders render the same text as this one."""
    files = render()
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from {Path(__file__).stem} import render; print(json.dumps(render()))"
    others = [json.loads(python_output(code, tmp_path / seed, seed)) for seed in ("1", "2")]
    assert others == [files, files], [rel for rel in sorted(files) if not others[0].get(rel) == others[1].get(rel) == files[rel]]
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
    # prod overrides the weights, so only the environments using the defaults change: one line per
    # predictor's traffic, and one per variant's recorded weight (the rule the dashboards compare with).
    assert sorted(diffs) == [f"overlays/{env}/{name}" for env in ("dev", "stage") for name in ("iris.yaml", seldon.WEIGHTS_FILE)]
    for rel, lines in diffs.items():
        if rel.endswith(seldon.WEIGHTS_FILE):
            assert len(lines) == 4 and all(f"record: {VARIANT_WEIGHT}, expr: vector(" in line and "model: iris," in line for line in lines), lines
            assert sorted(line[:1] + line.split("vector(")[1].split(")")[0] for line in lines) == ["+25", "+75", "-10", "-90"], lines
        else:
            assert len(lines) == 4 and all("/traffic," in line for line in lines), lines


def break_traffic(repo):
    edit(repo / "seldon/overlays/prod/iris.yaml", "/spec/predictors/0/traffic, value: 100}", "/spec/predictors/0/traffic, value: 90}")


def pin_to_alias(repo):
    edit(repo / "seldon/base/iris.yaml", "value: models:/iris/2", "value: models:/iris@challenger")


def use_latest_tag(repo):
    edit(repo / "seldon/base/wine.yaml", f"image: {seldon.SERVING_IMAGE}", "image: ghcr.io/example/mlops-serving:latest")


def add_plaintext_secret(repo):
    add_to_monitoring(
        repo, "secret.yaml", "apiVersion: v1\nkind: Secret\nmetadata:\n  name: grafana-admin\n  namespace: monitoring\nstringData:\n  admin-password: hunter2\n"
    )


def add_broken_dashboard(repo):
    add_to_monitoring(
        repo,
        "dashboards.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: model-dashboards\n  namespace: monitoring\n"
        '  labels:\n    grafana_dashboard: "1"\ndata:\n  models.json: \'{"title": "Models", "panels": [\'\n',
    )


def add_unknown_kind(repo):
    add_to_monitoring(repo, "widget.yaml", "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: gadget\n  namespace: monitoring\n")


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
        (add_unknown_kind, "clusters/base/monitoring (Widget/gadget): kind: unknown kind Widget in example.com/v1"),
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


# --- what Seldon's operator, its executor and Istio make of the manifests (mlops/check/cluster.py) --


def per_variant_model_names(repo):
    """The champion predictor serves `iris-champion` again, as before the A/B fix."""
    path = repo / "seldon/base/iris.yaml"
    text = path.read_text()
    for old, new in (("value: iris\n", "value: iris-champion\n"), ("          name: iris\n", "          name: iris-champion\n"),
                     ("      name: iris\n      type: MODEL\n    name: champion", "      name: iris-champion\n      type: MODEL\n    name: champion"),
                     ("path: /v2/models/iris/ready", "path: /v2/models/iris-champion/ready")):  # fmt: skip
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)


def set_port_env(repo):
    edit(repo / "seldon/base/wine.yaml", "        - env:\n", "        - env:\n          - name: MLSERVER_HTTP_PORT\n            value: '8080'\n")


def chart_default_metrics_port(repo):
    edit(repo / "clusters/base/infrastructure/seldon-core.yaml", "metricsPortName: model-metrics", "metricsPortName: metrics")


def drop_gateway(repo):
    for env in SPEC["environments"]:
        path = repo / "seldon/overlays" / env / seldon.ACCESS_FILE
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d["kind"] != "Gateway"]
        path.write_text(yaml.safe_dump_all(docs))


def gateway_selects_no_pods(repo):
    for env in SPEC["environments"]:
        edit(repo / "seldon/overlays" / env / seldon.ACCESS_FILE, "  selector:\n    istio: ingressgateway", "  selector:\n    istio: ingress")


def istio_disabled(repo):
    edit(repo / "clusters/base/infrastructure/seldon-core.yaml", "istio:\n      enabled: true", "istio:\n      enabled: false")


def pod_without_security_context(repo):
    edit(repo / "seldon/base/wine.yaml", "        securityContext:\n          runAsGroup: 1000\n          runAsNonRoot: true\n          runAsUser: 1000\n", "")


def second_pdb(repo):
    edit(
        repo / "seldon/overlays/prod/iris.yaml",
        "- {op: test, path: /spec/predictors/1/name, value: challenger}\n",
        "- {op: test, path: /spec/predictors/1/name, value: challenger}\n- {op: add, path: /spec/predictors/1/componentSpecs/0/pdbSpec, value: {maxUnavailable: 1}}\n",
    )


def short_grace(repo):
    edit(repo / "seldon/base/wine.yaml", "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: 20")


def hpa_without_cpu_request(repo):
    edit(
        repo / "seldon/overlays/dev/wine.yaml",
        "- {op: add, path: /spec/predictors/0/replicas, value: 1}",
        "- {op: add, path: /spec/predictors/0/componentSpecs/0/hpaSpec, value: {maxReplicas: 3, minReplicas: 1, metricsv2: [{type: Resource, resource: {name: cpu, target: {type: Utilization, averageUtilization: 70}}}]}}",
    )
    edit(repo / "seldon/overlays/dev/wine.yaml", "requests: {cpu: 250m, memory: 512Mi}", "requests: {memory: 512Mi}")


def test_autoscaling_and_disruption_budgets_follow_the_spec():
    data = copy.deepcopy(SPEC)
    data["environments"]["stage"] = {"autoscale": {"min_replicas": 2, "max_replicas": 5, "cpu_percent": 60}}
    files = render(data)
    stage = [yaml.safe_load(line[2:]) for line in files["overlays/stage/iris.yaml"].splitlines() if line.startswith("- ")]
    hpas = [op["value"] for op in stage if op["path"].endswith("/hpaSpec")]
    assert len(hpas) == 3 and hpas[0] == {
        "minReplicas": 2, "maxReplicas": 5,
        "metricsv2": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}],
    }  # fmt: skip
    assert not [op for op in stage if op["path"].endswith("/replicas")], "the HPA owns the replica count"
    assert [op["path"] for op in stage if op["path"].endswith("/pdbSpec")] == ["/spec/predictors/0/componentSpecs/0/pdbSpec"]
    dev = files["overlays/dev/iris.yaml"]
    assert "pdbSpec" not in dev and "hpaSpec" not in dev, "one replica: no budget to keep, nothing to scale"
    with pytest.raises(ValueError, match="max_replicas \\(1\\) is below min_replicas \\(2\\)"):
        DeploymentSpec.model_validate({**data, "environments": {"dev": {"autoscale": {"min_replicas": 2, "max_replicas": 1}}}})
    with pytest.raises(ValueError, match="either 'replicas' or 'autoscale'"):
        DeploymentSpec.model_validate({**data, "environments": {"dev": {"replicas": 2, "autoscale": {"min_replicas": 2, "max_replicas": 3}}}})


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (per_variant_model_names, "clusters/dev (SeldonDeployment/iris): predictors serve different model names ['iris', 'iris-champion']"),
        (
            set_port_env,
            "clusters/dev (SeldonDeployment/wine): predictor 'champion': MLSERVER_HTTP_PORT is set in the manifest, so the operator drops the container's whole env",
        ),
        (
            chart_default_metrics_port,
            "clusters/dev (PodMonitor/mlserver): podMetricsEndpoints[0]: port 'model-metrics' path '/metrics' misses MLServer's metrics: iris/champion serves them on 6000",
        ),
        (
            drop_gateway,
            "clusters/dev (SeldonDeployment/iris): the VirtualService the operator makes binds to the Istio Gateway istio-system/seldon-gateway, which nothing here creates",
        ),
        (
            gateway_selects_no_pods,
            "clusters/dev (SeldonDeployment/iris): Gateway istio-system/seldon-gateway selects {'istio': 'ingress'}, which no Istio gateway chart release",
        ),
        (istio_disabled, "clusters/dev (HelmRelease/seldon-core-operator): values.istio.enabled is not true"),
        (pod_without_security_context, "clusters/dev (SeldonDeployment/wine): predictor 'champion': the pod runs as uid 8888, not the image's user 1000"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_each_cluster_rule_names_environment_object_and_cause(repo, mutate, expected):
    """A schema-valid change that would break the cluster once the operator and Istio act on it."""
    assert validate(repo, CRDS) == []
    mutate(repo)
    errors = validate(repo, CRDS)
    assert any(e.startswith(expected) for e in errors), "\n".join(errors)
    assert {e.split(" (", 1)[0] for e in errors} == {"clusters/dev", "clusters/prod", "clusters/stage"}


def access_docs(repo: Path, env: str, change) -> None:
    """Rewrite one environment's access objects with `change(docs)`."""
    path = repo / "seldon/overlays" / env / seldon.ACCESS_FILE
    docs = list(yaml.safe_load_all(path.read_text()))
    change(docs)
    path.write_text(yaml.safe_dump_all(docs))


def policy(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "AuthorizationPolicy")


def token_optional(repo):
    access_docs(repo, "prod", lambda docs: policy(docs)["spec"]["rules"][1].pop("from"))


def health_needs_token(repo):
    access_docs(repo, "stage", lambda docs: policy(docs)["spec"]["rules"].pop(0))


def strict_metrics_port(repo):
    access_docs(repo, "prod", lambda docs: [d["spec"].pop("portLevelMtls") for d in docs if d["metadata"]["name"] == "iris-metrics"])


def tls_key_in_git(repo):
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ingress-cert", "namespace": "istio-system"}, "type": "kubernetes.io/tls"}
    access_docs(repo, "prod", lambda docs: docs.append(secret))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            token_optional,
            "clusters/prod (SeldonDeployment/iris): the ingress verifies tokens but lets POST /seldon/models/iris/v2/models/iris/infer in without one",
        ),
        (health_needs_token, "clusters/stage (SeldonDeployment/iris): the ingress refuses GET /seldon/models/iris/v2/health/ready without a token"),
        (strict_metrics_port, "clusters/prod (SeldonDeployment/iris): predictor 'champion': mTLS is STRICT on metrics port 8082, so Prometheus"),
        (tls_key_in_git, "clusters/prod (SeldonDeployment/iris): Gateway istio-system/seldon-gateway: the TLS key Secret 'ingress-cert' is in Git"),
        (second_pdb, "clusters/prod (SeldonDeployment/iris): pdbSpec on predictors champion, challenger: each PDB the operator makes selects every pod"),
        (short_grace, "clusters/dev (SeldonDeployment/wine): predictor 'champion': terminationGracePeriodSeconds 20 leaves 10 s after the preStop sleep"),
        (
            hpa_without_cpu_request,
            "clusters/dev (SeldonDeployment/wine): predictor 'champion': hpaSpec scales on CPU utilization, which needs resources.requests.cpu",
        ),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_each_rollout_and_access_rule_names_environment_object_and_cause(repo, mutate, expected):
    mutate(repo)
    errors = validate(repo, CRDS)
    assert any(e.startswith(expected) for e in errors), "\n".join(errors)


def test_access_follows_the_spec_per_environment():
    """dev is open (but still mTLS inside), stage and prod take tokens of the issuer; prod answers HTTPS and redirects HTTP."""
    data = copy.deepcopy(SPEC)
    data["environments"]["stage"]["auth"]["allow_ips"] = ["203.0.113.0/24"]
    files = render(data)
    docs = {env: {d["kind"] + "/" + d["metadata"]["name"]: d for d in yaml.safe_load_all(files[f"overlays/{env}/{seldon.ACCESS_FILE}"])}
            for env in SPEC["environments"]}  # fmt: skip
    assert not any(k.startswith(("RequestAuthentication/", "AuthorizationPolicy/")) for k in docs["dev"])
    for env in SPEC["environments"]:
        assert docs[env]["PeerAuthentication/default"]["spec"] == {"mtls": {"mode": "STRICT"}}
        assert f"- {seldon.ACCESS_FILE}" in files[f"overlays/{env}/kustomization.yaml"]
    stage = cluster.Access.of(list(docs["stage"].values()), "istio-system", seldon.INGRESS_LABELS)
    assert stage.jwt_rules == [{"issuer": ISSUER, "jwksUri": f"{ISSUER}keys", "audiences": ["models"], "forwardOriginalToken": False}]
    user, listed, elsewhere = f"{ISSUER}/alice", "203.0.113.9", "198.51.100.7"
    infer = "/seldon/models/iris/v2/models/iris/infer"
    assert stage.allows(cluster.Request(infer, "POST", user, listed))
    assert not stage.allows(cluster.Request(infer, "POST", user, elsewhere)), "a token from outside the allow-list"
    assert not stage.allows(cluster.Request(infer, "POST", None, listed)), "no token"
    assert not stage.allows(cluster.Request(infer, "POST", "https://other.example/alice", listed)), "another issuer's token"
    assert stage.allows(cluster.Request("/seldon/models/iris/v2/models/iris/ready", "GET", None, elsewhere))
    assert stage.allows(cluster.Request("/inference.GRPCInferenceService/ModelReady", "POST", None, elsewhere))
    assert not stage.allows(cluster.Request("/inference.GRPCInferenceService/ModelInfer", "POST", None, listed))
    servers = {s["port"]["number"]: s for s in docs["prod"]["Gateway/seldon-gateway"]["spec"]["servers"]}
    assert servers[443]["tls"] == {"mode": "SIMPLE", "credentialName": "ingress-cert"} and servers[80]["tls"] == {"httpsRedirect": True}
    assert "tls" not in {s["port"]["number"]: s for s in docs["stage"]["Gateway/seldon-gateway"]["spec"]["servers"]}[80]


def test_spec_must_decide_who_may_call_each_environment():
    from mlops.check.validate import spec_problems

    data = copy.deepcopy(SPEC)
    assert spec_problems(DeploymentSpec.model_validate(data)) == []
    data["environments"]["dev"].pop("auth")
    data["environments"]["prod"] = {"auth": "none"}
    assert spec_problems(DeploymentSpec.model_validate(data)) == [
        "deployments.yaml: environments.dev.auth: not decided; write `auth: none` for an open ingress, or `auth: {jwt: {issuer, jwks_uri, audiences}}`",
        "deployments.yaml: environments.prod.auth: `none` is refused for prod: anyone who reaches the ingress could call every model; set `jwt`",
        "deployments.yaml: environments.prod.tls: prod needs TLS at the ingress (tokens must not cross in plaintext); name the certificate's Secret in `tls.credential_name`",
    ]


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ("open", "environments.dev.auth: must be 'none' or a mapping (got 'open')"),
        ({"jwt": {**JWT, "jwks_uri": "http://login.example.org/keys"}}, "environments.dev.auth.jwt.jwks_uri: must be an https:// URL"),
        ({"jwt": {**JWT, "audiences": []}}, "environments.dev.auth.jwt.audiences: List should have at least 1 item"),
        ({"jwt": JWT, "allow_ips": ["10.0.0.0/33"]}, "environments.dev.auth: allow_ips: '10.0.0.0/33' is not an address or network"),
        ({"allow_ips": ["10.0.0.0/8"]}, "environments.dev.auth.jwt: Field required"),
    ],
)
def test_bad_auth_is_refused_naming_the_field(tmp_path, auth, message):
    from mlops.domain.spec import SpecError, load_spec

    data = copy.deepcopy(SPEC)
    data["environments"]["dev"]["auth"] = auth
    path = tmp_path / "deployments.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert message in str(err.value)


def test_mlops_cluster_shows_what_the_pods_run(repo, capsys):
    from typer.testing import CliRunner

    from mlops.cli import app

    result = CliRunner().invoke(app, ["cluster", "prod"], env={"MLOPS_PROJECT_DIR": str(repo)})
    assert result.exit_code == 0, result.output
    shown = {d["seldonDeployment"]: d for d in yaml.safe_load(result.output)}
    iris = shown["models/iris"]
    assert iris["ingress"]["weights"] == {"champion": 100, "challenger": 0}
    assert iris["ingress"]["mirror"] == {"predictor": "candidate", "percent": 100.0}
    assert iris["ingress"]["grpc"] == {"headers": {"seldon": "iris", "namespace": "models"}, "model_name": "iris"}
    champion = iris["predictors"][0]
    assert champion["metrics"] == {"port": 8082, "path": "/metrics"}
    assert champion["env"]["MLSERVER_MODEL_NAME"] == "iris" and champion["env"]["MLSERVER_METRICS_PORT"] == "8082"
    bad = CliRunner().invoke(app, ["cluster", "qa"], env={"MLOPS_PROJECT_DIR": str(repo)})
    assert bad.exit_code == 1 and "no environment 'qa'" in bad.output and "dev, prod, stage" in bad.output


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
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLOPS_PROJECT_DIR": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "are valid" in proc.stdout


# --- plaintext secrets: the repository's files and the rendered clusters -------------------------
# Every planted secret is made up here at run time, so this file holds none for the scan to find.


def made_up(alphabet: str, n: int) -> str:
    return "".join(random.choice(alphabet) for _ in range(n))


UPPER_DIGITS = string.ascii_uppercase + string.digits
PLANTED = {
    # file: (text, line, problem)
    "deploy/id_rsa": (
        "-----BEGIN " + "RSA PRIVATE KEY-----\n" + made_up(string.ascii_letters, 64) + "\n-----END " + "RSA PRIVATE KEY-----\n",
        1,
        "private key block",
    ),
    "training/upload.py": (f"import boto3\n\nKEY_ID = '{'AKIA' + made_up(UPPER_DIGITS, 16)}'\n", 3, "AWS access key id AKIA"),
    "deploy/aws.ini": (f"[default]\naws_secret_access_key = {made_up(string.ascii_letters + string.digits + '/+', 40)}\n", 2, "AWS secret access key"),
    "docs/registry.md": (
        f"Use {'postgresql' + '://'}mlflow:{made_up(string.ascii_letters, 12)}@db.internal:5432/mlflow\n",
        1,
        "password in URL for user 'mlflow'",
    ),
    "clusters/base/values.yaml": (f"grafana:\n  admin:\n    password: {made_up(string.ascii_letters, 10)}\n", 3, "literal value for 'password'"),
    "model-settings/extra.json": (
        f'{{\n  "parameters": {{\n    "api_token": "{made_up(string.hexdigits, 32)}"\n  }}\n}}\n',
        3,
        "literal value for 'api_token'",
    ),
    "deploy/.env": (f"# local settings\nMLFLOW_TRACKING_PASSWORD={made_up(string.ascii_letters, 14)}\n", 2, "literal value for 'MLFLOW_TRACKING_PASSWORD'"),
    "deploy/pod.yaml": (
        f"spec:\n  containers:\n    - name: app\n      env:\n        - name: DB_PASSWORD\n          value: {made_up(string.ascii_letters, 10)}\n",
        6,
        "literal value for 'DB_PASSWORD'",
    ),
    "deploy/secret.yaml": (
        f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  config: {made_up(string.ascii_letters, 10)}\n",
        5,
        "plaintext Secret stringData in Git",
    ),
}
NOT_SECRETS = {
    "deploy/refs.yaml": (
        "password: ${DB_PASSWORD}\ntoken: ''\nexistingSecret: grafana-admin\npasswordKey: admin-password\ntokenTTL: 3600\n"
        "env:\n  - name: MLFLOW_TRACKING_PASSWORD\n    valueFrom: {secretKeyRef: {name: mlflow-credentials, key: password}}\n"
        "secret: '{{ .Values.secret }}'\nadmin-password: ENC[AES256_GCM,data:abc,type:str]\n"
    ),
    "docs/example.md": f"export MLOPS_BACKEND_STORE_URI={'postgresql' + '://'}mlflow:...@db.internal:5432/mlflow\n",
    "deploy/example.env": "API_KEY=\nDB_PASSWORD=<password>\n",
}


def git_repo(path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    return path


def test_committed_repository_holds_no_plaintext_secret():
    files = plaintext.repository_files(ROOT)
    assert {"README.md", "deployments.yaml", "model-settings/settings.json", "clusters/base/infrastructure/kube-prometheus-stack.yaml"} <= set(files)
    assert plaintext.scan_repository(ROOT) == []


def test_each_planted_secret_is_reported_with_file_and_line(tmp_path):
    repo = git_repo(tmp_path, {**{rel: text for rel, (text, _, _) in PLANTED.items()}, **NOT_SECRETS, ".gitignore": "local.env\n"})
    (repo / "local.env").write_text(f"TOKEN={made_up(string.ascii_letters, 20)}\n")  # ignored by git, as .venv is
    errors = plaintext.scan_repository(repo)
    for rel, (_, line, problem) in PLANTED.items():
        assert any(e.startswith(f"{rel}:{line}: {problem}") for e in errors), f"{rel}: {problem} not in\n" + "\n".join(errors)
    assert len(errors) == len(PLANTED), "\n".join(errors)


def test_mlops_validate_fails_on_a_planted_secret(repo, capsys):
    from mlops.check.validate import main

    git_repo(repo, {"deploy/.env": PLANTED["deploy/.env"][0]})
    assert main(repo, CRDS) == 1
    out = capsys.readouterr().out
    assert "deploy/.env:2: literal value for 'MLFLOW_TRACKING_PASSWORD'" in out and "1 problem(s)" in out


def add_config(repo, data: dict, env: list[dict] | None = None):
    objects = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app-config", "namespace": "monitoring"}, "data": data}]
    if env:
        pod = {"containers": [{"name": "app", "image": "ghcr.io/example/app:1.0.0", "env": env}]}
        objects.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "app", "namespace": "monitoring"},
                "spec": {"selector": {"matchLabels": {"app": "a"}}, "template": {"metadata": {"labels": {"app": "a"}}, "spec": pod}},
            }
        )
    add_to_monitoring(repo, "app.yaml", yaml.safe_dump_all(objects))


def test_rendered_clusters_are_scanned_for_secrets(repo):
    key_id = "ASIA" + made_up(UPPER_DIGITS, 16)
    add_config(
        repo,
        {
            "DB_PASSWORD": made_up(string.ascii_letters, 12),
            "registry": f"{'https' + '://'}ci:{made_up(string.ascii_letters, 12)}@mlflow.internal",
            "tls.key": "-----BEGIN " + "PRIVATE KEY-----\n" + made_up(string.ascii_letters, 40),
            "upload.sh": f"aws configure set aws_access_key_id {key_id}",
            "DB_USER": "app",
        },
        env=[{"name": "API_TOKEN", "value": made_up(string.hexdigits, 24)}, {"name": "LOG_LEVEL", "value": "info"}],
    )
    errors = validate(repo, CRDS)
    where = "clusters/base/monitoring (ConfigMap/app-config): "
    assert sorted(errors) == sorted(
        [
            f"{where}data.DB_PASSWORD: literal value for 'DB_PASSWORD': reference a Secret instead",
            f"{where}data.registry: password in URL for user 'ci'",
            f"{where}data['tls.key']: private key block",
            f"{where}data['upload.sh']: AWS access key id ASIA{key_id[4:8]}…",
            "clusters/base/monitoring (Deployment/app): spec.template.spec.containers[0].env[0].value: "
            "literal value for 'API_TOKEN': reference a Secret (secretKeyRef) instead",
        ]
    ), "\n".join(errors)


def test_image_serves_with_the_generated_server_settings():
    """The pods must run the settings the benchmark chose, from the serving lock's exact versions."""
    text = (ROOT / "Dockerfile").read_text()
    copies = dict(line.split()[1:3] for line in text.splitlines() if line.startswith("COPY "))
    cmd = json.loads(next(line.removeprefix("CMD ") for line in text.splitlines() if line.startswith("CMD ")))
    assert cmd[:4] == ["python", "-m", SERVER_MODULE, "start"], "the image must serve through the project's entry point, as mlops serve does"
    assert mlserver_command(Path(cmd[4]))[1:] == cmd[1:]
    assert copies["model-settings/settings.json"] == f"{cmd[4]}/settings.json"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")}
    for src in copies:
        assert (ROOT / src).exists() and src.split("/")[0] not in ignored, src
    pins = lambda name: dict(  # noqa: E731
        line.split("==") for line in (ROOT / name).read_text().splitlines() if "==" in line and not line.startswith(" ")
    )
    serving, full = pins("requirements-serving.lock"), pins("requirements.lock")
    assert "requirements-serving.lock" in copies and serving.items() <= full.items()
    assert "pytest" not in serving and "mlserver" in serving


def test_declared_trust_reaches_every_runtime_that_loads_the_model():
    """The spec's trust goes to the variant's pods, its local model-settings and the router's variants; only there."""
    from mlops.render.sync import render_model_settings

    data = copy.deepcopy(SPEC)
    data["models"]["wine"]["trust"] = {"allow_pickle": True, "skops_trusted_types": ["sklearn.tree._tree.Tree"]}
    spec = DeploymentSpec.model_validate(data)
    declared = {"allow_pickle": True, "skops_trusted_types": ["sklearn.tree._tree.Tree"]}
    sdep = yaml.safe_load(seldon.render(spec, fake_resolve(spec), seldon.SERVING_IMAGE)["base/wine.yaml"])
    (container,) = sdep["spec"]["predictors"][0]["componentSpecs"][0]["spec"]["containers"]
    extra = json.loads({e["name"]: e["value"] for e in container["env"]}[seldon.EXTRA_ENV])
    assert extra.items() >= declared.items()
    files = render_model_settings(fake_resolve(spec), spec)
    assert json.loads(files["wine-champion/model-settings.json"])["parameters"]["extra"].items() >= declared.items()
    assert json.loads(files["wine/model-settings.json"])["parameters"]["extra"]["runtime"] == {"registered_model": "wine", **declared}
    assert "allow_pickle" not in json.loads(files["iris-champion/model-settings.json"])["parameters"]["extra"]
    iris = yaml.safe_load(seldon.render(spec, fake_resolve(spec), seldon.SERVING_IMAGE)["base/iris.yaml"])
    assert "allow_pickle" not in iris["spec"]["predictors"][0]["componentSpecs"][0]["spec"]["containers"][0]["env"][4]["value"]
