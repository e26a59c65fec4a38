"""Offline checks of everything Flux would apply, so a broken manifest fails in review, not in a cluster.

Renders every `clusters/<env>` entry point with `kubectl kustomize`, then every path its Flux
Kustomizations point at (`spec.path`, relative to the project root), and checks each object:

- schema: core kinds against the Kubernetes OpenAPI schemas of `kubernetes-validate`, custom
  resources against the upstream CRDs in the CRD directory; unknown fields and unknown kinds fail,
  because the API server or Flux would reject or silently drop them;
- project rules: live traffic sums to 100, models pinned to registry versions, no `latest`
  images, no plaintext Secrets, Grafana dashboards that Grafana can load;
- cluster behaviour, per environment (mlops/check/cluster.py): what Seldon's operator and executor and
  Istio make of it: every predictor serves the name clients call, no env the operator would drop,
  the PodMonitor scrapes where MLServer serves metrics, a Gateway that the routes bind to;
- secrets (mlops/check/plaintext.py): no password, key or token in plaintext in any rendered object and,
  from `mlops validate`, in any file of the repository.

Each error reads `<rendered path> (<Kind>/<name>): <field>: <problem>`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from runtimes.contract import SELDON_DIR, SPEC_FILE

from ..domain.spec import NO_AUTH, PRODUCTION, DeploymentSpec, SpecError, load_spec
from . import cluster, plaintext

KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the clusters run
CRDS_ENV = "MLOPS_CRDS_DIR"
KUBECTL_MISSING = "kubectl with built-in kustomize is required to render the manifests; install kubectl (>= 1.27) and put it on PATH"
PINNED_MODEL = re.compile(r"^models:/[^/@]+/\d+$")
FLUX_KUSTOMIZATION = ("kustomize.toolkit.fluxcd.io", "Kustomization")


@dataclass(frozen=True)
class Obj:
    source: str  # the rendered kustomize path, relative to the project root
    data: dict

    @property
    def where(self) -> str:
        name = (self.data.get("metadata") or {}).get("name", "?")
        return f"{self.source} ({self.data.get('kind', '?')}/{name})"


def default_crds_dir(root: Path) -> Path:
    return Path(os.environ.get(CRDS_ENV) or root.resolve().parent / "shared" / "crds")


def _field(path) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_$][\w$-]*", p):
            out += f".{p}" if out else p
        else:
            out += f"[{p!r}]"
    return out or "(object)"


def _group_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


# --- schemas -------------------------------------------------------------------------------------


def _jsonschema(node):
    """A CRD structural schema as strict JSON Schema: no unknown fields, int-or-string, nullable."""
    if isinstance(node, list):
        return [_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=4)
def _load_crds(crds_dir: str) -> dict[tuple[str, str, str], dict]:
    """{(group, version, kind): JSON Schema} for every served version of every CRD in the directory."""
    schemas = {}
    for path in sorted(Path(crds_dir).glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for v in spec["versions"]:
                if v.get("served", True):
                    schema = _jsonschema(v["schema"]["openAPIV3Schema"])
                    # The API server accepts these at the root of every object, declared or not (Istio's CRDs leave them out).
                    for implicit in ("apiVersion", "kind", "metadata"):
                        schema.setdefault("properties", {}).setdefault(implicit, {"type": "object"} if implicit == "metadata" else {"type": "string"})
                    schemas[(spec["group"], v["name"], spec["names"]["kind"])] = schema
    return schemas


def _schema_errors(data: dict, crds: dict, crds_dir: Path):
    api_version, kind = data.get("apiVersion"), data.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        yield "apiVersion", "every object needs apiVersion and kind"
        return
    if not isinstance((data.get("metadata") or {}).get("name"), str):
        yield "metadata.name", "missing"
    if kind == "Secret":
        data = {k: v for k, v in data.items() if k != "sops"}  # Flux decrypts SOPS files before applying them
    group, version = _group_version(api_version)
    schema = crds.get((group, version, kind))
    if schema is not None:
        for err in sorted(jsonschema.Draft7Validator(schema).iter_errors(data), key=lambda e: _field(e.absolute_path)):
            path = list(err.absolute_path)
            if err.validator == "additionalProperties":
                for name in sorted(set(err.instance) - set(err.schema.get("properties", {}))):
                    yield _field([*path, name]), "unknown field"
            else:
                yield _field(path), err.message
        return
    try:
        kubernetes_validate.validate(data, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        yield _field(err.path), err.message
    except kubernetes_validate.SchemaNotFoundError:
        yield "kind", f"unknown kind {kind} in {api_version}: no Kubernetes {KUBERNETES_VERSION} schema and no CRD in {crds_dir}"


# --- project rules -------------------------------------------------------------------------------


def _containers(data: dict):
    for path, node in plaintext.walk(data):
        if len(path) >= 2 and path[-2] in ("containers", "initContainers", "ephemeralContainers") and isinstance(node, dict):
            yield path, node


def _check_images(data: dict):
    for path, container in _containers(data):
        image = container.get("image")
        if not isinstance(image, str) or "@" in image:  # a digest pins the image whatever the tag says
            continue
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if tag == "latest":
            yield _field([*path, "image"]), f"image '{image}' uses the tag 'latest'; pin a version"
        elif not tag:
            yield _field([*path, "image"]), f"image '{image}' has no tag (which means 'latest'); pin a version"


def _check_model_refs(data: dict):
    uris = {}  # container name -> MLSERVER_MODEL_URI
    for path, container in _containers(data):
        for i, env in enumerate(container.get("env") or []):
            if isinstance(env, dict) and env.get("name") == "MLSERVER_MODEL_URI":
                uris[container.get("name")] = value = env.get("value")
                if not PINNED_MODEL.match(str(value)):
                    yield (
                        _field([*path, "env", i, "value"]),
                        f"MLSERVER_MODEL_URI '{value}' is not pinned: use models:/<name>/<version>, not an alias or 'latest'",
                    )
    if data.get("kind") != "SeldonDeployment":
        return
    for p, predictor in enumerate((data.get("spec") or {}).get("predictors") or []):
        nodes = [(["spec", "predictors", p, "graph"], predictor.get("graph") or {})]
        while nodes:
            path, node = nodes.pop()
            nodes += [([*path, "children", i], c) for i, c in enumerate(node.get("children") or []) if isinstance(c, dict)]
            uri = node.get("modelUri")
            if uri is not None and not PINNED_MODEL.match(str(uri)):
                yield _field([*path, "modelUri"]), f"modelUri '{uri}' is not pinned: use models:/<name>/<version>, not an alias or 'latest'"
            elif uri is None and node.get("type", "MODEL") == "MODEL" and node.get("name") not in uris:
                yield _field(path), f"model '{node.get('name')}' has no registry reference: set MLSERVER_MODEL_URI on its container"


def _check_traffic(data: dict):
    if data.get("kind") != "SeldonDeployment":
        return
    live = [p for p in (data.get("spec") or {}).get("predictors") or [] if not p.get("shadow")]
    total = sum(p.get("traffic") or 0 for p in live if isinstance(p.get("traffic") or 0, int))
    if live and total != 100:
        yield "spec.predictors[].traffic", f"non-shadow traffic sums to {total}, must be 100"


def _check_secret(data: dict):
    if data.get("kind") == "Secret" and data.get("apiVersion") == "v1" and "sops" not in data:
        for key in ("data", "stringData"):
            if data.get(key):
                yield key, "plaintext Secret in Git: reference a Secret that lives in the cluster, or encrypt it with SOPS"


def _check_dashboard(data: dict):
    labels = (data.get("metadata") or {}).get("labels") or {}
    if data.get("kind") != "ConfigMap" or labels.get("grafana_dashboard") != "1":
        return
    if not data.get("data"):
        yield "data", "a grafana_dashboard ConfigMap needs dashboard JSON in data"
    for key, text in (data.get("data") or {}).items():
        try:
            board = json.loads(text)
        except (TypeError, ValueError) as exc:
            yield _field(["data", key]), f"not valid JSON: {exc}"
            continue
        if not isinstance(board, dict) or not isinstance(board.get("title"), str) or not isinstance(board.get("panels"), list):
            yield _field(["data", key]), "not a Grafana dashboard: needs a 'title' string and a 'panels' list"


def _check_plaintext_secrets(data: dict):
    for path, problem in plaintext.check_object(data):
        yield _field(path), problem


RULES = (_check_traffic, _check_model_refs, _check_images, _check_secret, _check_dashboard, _check_plaintext_secrets)


# --- rendering -----------------------------------------------------------------------------------


def _kustomize(kubectl: str, path: Path) -> list[dict] | str:
    """The rendered objects, or kubectl's complaint."""
    try:
        proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "timed out"
    if proc.returncode:
        message = " ".join(proc.stderr.split())
        klog = re.search(r'err="(.*)"', message)  # kubectl logs failures as `... "command failed" err="..."`
        return (klog.group(1) if klog else message) or f"exit status {proc.returncode}"
    return [d for d in yaml.load_all(proc.stdout, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


def _flux_target(root: Path, obj: Obj) -> tuple[Path | None, str | None]:
    """The directory a Flux Kustomization applies from this repository, or the reason it cannot."""
    spec = obj.data.get("spec") or {}
    if (spec.get("sourceRef") or {}).get("kind") != "GitRepository" or not isinstance(spec.get("path"), str):
        return None, None
    target = (root / spec["path"]).resolve()
    if not target.is_relative_to(root):
        return None, f"{obj.where}: spec.path: '{spec['path']}' is outside the repository"
    if not (target / "kustomization.yaml").is_file():
        missing = "has no kustomization.yaml" if target.exists() else "does not exist"
        if target.is_relative_to(root / SELDON_DIR):
            missing += " (`mlops sync` writes it)"
        return None, f"{obj.where}: spec.path: '{spec['path']}' {missing}"
    return target, None


def _render(root: Path, kubectl: str) -> tuple[list[Obj], list[str]]:
    """Entry points first, then the Flux paths they name, a wave at a time (kubectl runs in parallel)."""
    wave = sorted(d for d in (root / "clusters").glob("*") if (d / "kustomization.yaml").is_file())
    if not wave:
        return [], [f"clusters: no cluster entry points (clusters/<env>/kustomization.yaml) under {root}"]
    objects, errors, seen = [], [], set()
    with ThreadPoolExecutor(max_workers=8) as pool:
        while wave:
            seen.update(wave)
            next_wave = []
            for path, docs in zip(wave, pool.map(lambda p: _kustomize(kubectl, p), wave), strict=True):
                rel = path.relative_to(root).as_posix()
                if isinstance(docs, str):
                    errors.append(f"{rel}: kubectl kustomize failed: {docs}")
                    continue
                for doc in docs:
                    obj = Obj(rel, doc)
                    objects.append(obj)
                    if (_group_version(str(doc.get("apiVersion")))[0], doc.get("kind")) == FLUX_KUSTOMIZATION:
                        target, error = _flux_target(root, obj)
                        errors += [error] if error else []
                        next_wave += [target] if target and target not in seen else []
            wave = list(dict.fromkeys(next_wave))
    return objects, errors


def environments(root: Path, objects: list[Obj]) -> dict[str, list[Obj]]:
    """{env: what Flux applies there}: clusters/<env>, then every path its Flux Kustomizations name."""
    by_source: dict[str, list[Obj]] = {}
    for obj in objects:
        by_source.setdefault(obj.source, []).append(obj)
    out = {}
    for entry in sorted(s for s in by_source if re.fullmatch(r"clusters/[^/]+", s)):
        seen, todo = set(), [entry]
        while todo:
            source = todo.pop()
            if source in seen:
                continue
            seen.add(source)
            for obj in by_source.get(source, []):
                if (_group_version(str(obj.data.get("apiVersion")))[0], obj.data.get("kind")) == FLUX_KUSTOMIZATION:
                    target, _ = _flux_target(root, obj)
                    todo += [target.relative_to(root).as_posix()] if target else []
        out[entry.removeprefix("clusters/")] = [o for s in sorted(seen) for o in by_source.get(s, [])]
    return out


def _run(root: Path, crds_dir: Path | None) -> tuple[list[str], list[Obj]]:
    root = root.resolve()
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return [KUBECTL_MISSING], []
    crds_dir = Path(crds_dir) if crds_dir else default_crds_dir(root)
    if not crds_dir.is_dir():
        return [f"CRD directory {crds_dir} not found; point {CRDS_ENV} at the upstream CRDs"], []
    crds = _load_crds(str(crds_dir.resolve()))
    objects, errors = _render(root, kubectl)
    for obj in objects:
        # The project rules trust the object's shape, so they only see objects the schema accepts.
        problems = list(_schema_errors(obj.data, crds, crds_dir)) or [p for rule in RULES for p in rule(obj.data)]
        errors += [f"{obj.where}: {field}: {msg}" for field, msg in problems]
    spec = root / SPEC_FILE
    if spec.is_file():
        try:
            errors += spec_problems(load_spec(spec))
        except SpecError as exc:
            errors.append(str(exc))
    if not errors:  # the cluster model trusts shapes the schemas accepted
        for env, objs in environments(root, objects).items():
            errors += [f"clusters/{env} ({where}): {p}" for where, p in cluster.problems([o.data for o in objs], root)]
    return errors, objects


def spec_problems(spec: DeploymentSpec) -> list[str]:
    """Decisions the spec must state: who may call each environment; prod only with tokens and TLS."""
    out = []
    for name, env in sorted(spec.environments.items()):
        where = f"{SPEC_FILE}: environments.{name}"
        if env.auth is None:
            out.append(f"{where}.auth: not decided; write `auth: {NO_AUTH}` for an open ingress, or `auth: {{jwt: {{issuer, jwks_uri, audiences}}}}`")
        elif name == PRODUCTION and env.auth == NO_AUTH:
            out.append(f"{where}.auth: `{NO_AUTH}` is refused for {PRODUCTION}: anyone who reaches the ingress could call every model; set `jwt`")
        if name == PRODUCTION and env.tls is None:
            out.append(
                f"{where}.tls: {PRODUCTION} needs TLS at the ingress (tokens must not cross in plaintext); name the certificate's Secret in `tls.credential_name`"
            )
    return out


def rendered_environments(root: Path) -> dict[str, list[dict]]:
    """{env: every object Flux applies there}, rendered without validation (for `mlops cluster`)."""
    root = root.resolve()
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError(KUBECTL_MISSING)
    objects, errors = _render(root, kubectl)
    if errors:
        raise RuntimeError("\n".join(errors))
    return {env: [o.data for o in objs] for env, objs in environments(root, objects).items()}


def validate(root: Path, crds_dir: Path | None = None) -> list[str]:
    """Error lines for everything Flux would apply from `root`; empty when all is well."""
    return _run(root, crds_dir)[0]


def main(root: Path, crds_dir: Path | None = None) -> int:
    """Print the errors and a summary; the exit status for `mlops validate`."""
    from rich.console import Console

    console = Console(soft_wrap=True, highlight=False)
    errors, objects = _run(root, crds_dir)
    files = plaintext.repository_files(root.resolve())
    errors += plaintext.scan_repository(root.resolve(), files)
    for line in errors:
        console.print(f"✗ {line}", style="red", markup=False)
    paths = len({o.source for o in objects})
    scope = f"{len(objects)} objects from {paths} kustomize paths and {len(files)} repository files"
    if errors:
        console.print(f"{len(errors)} problem(s) in {scope}", style="bold red", markup=False)
        return 1
    console.print(f"✓ {scope} are valid, with no plaintext secret", style="green", markup=False)
    spec = root / SPEC_FILE
    if spec.is_file():
        for note in cluster.local_only(load_spec(spec)):
            console.print(f"note: {note}", style="yellow", markup=False)
    return 0
