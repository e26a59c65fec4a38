"""What Seldon Core 1.18.2's operator and executor, and Istio, make of the rendered manifests.

Schema-valid manifests can still fail once the operator has defaulted them and the executor and
Istio route through them. This module derives, offline, what they will run, from their source
(SeldonIO/seldon-core tag v1.18.2, istio/istio tag 1.26.8, SeldonIO/MLServer tag 1.7.1; paths and
lines below), so that `mlops validate` can check it, `mlops cluster` can show it, and the tests
can start real MLServer processes exactly as the pods run and route to them as the cluster does.

The operator, for each predictor's container that a graph node names (same name):
- defaulting (operator/apis/machinelearning.seldon.io/v1/defaults.go): keeps declared ports named
  http/grpc (87-95); otherwise numbers them per container name from 9000 and 9500 (160-230); adds a
  port named by the chart's `predictiveUnit.metricsPortName` (env PREDICTIVE_UNIT_METRICS_PORT_NAME,
  default "metrics") at 6000, 6001, ... for each container that lacks one (57-67, 185-194);
- the container env (operator/controllers/seldondeployment_controller.go): PREDICTIVE_UNIT_SERVICE_PORT
  (839-845); the http/grpc ports as PREDICTIVE_UNIT_*_SERVICE_PORT and MLSERVER_*_PORT (935-963), a
  model URI and parameters (915-933), through utils.SetEnvVar(..., false), which returns nil when the
  name is already set, dropping the container's whole env (operator/utils/utils.go 108-129); then it
  appends MLSERVER_MODEL_NAME = the container name and the predictor's identity (857-865), and, when
  the container has the metrics port, MLSERVER_METRICS_PORT = that port and MLSERVER_METRICS_ENDPOINT
  = the executor's prometheus path, "/prometheus" by default (867-877; seldondeployment_engine.go 154-157);
- probes and a preStop sleep only where the container has none (815-833); the chart's
  defaultUserID (8888) as the pod's runAsUser only where the pod sets no securityContext
  (security.go 18-30; seldondeployment_controller.go 1030-1032);
- one VirtualService per SeldonDeployment on the chart's `istio.gateway` (236-411): HTTP by URI
  prefix `/seldon/<namespace>/<name>/` rewritten to `/` (271-274), gRPC by the path regex
  `.*tensorflow.*|.*seldon.protos.*|.*inference.*` (constants.go 8) and the headers `seldon: <name>`
  and `namespace: <namespace>` (279-283), each to the live predictors with weight = traffic (381-400)
  and mirrored to a shadow predictor (346-377).

Kubernetes gives a container's `env` precedence over the image's ENV, and the last of two entries
with one name wins. MLServer 1.7.1 reads `settings.json` (mlserver/cli/serve.py 29) and fills what it
leaves out from MLSERVER_* (pydantic-settings), so a field the image's settings.json sets beats the
operator's env: its `metrics_endpoint` "/metrics" wins over "/prometheus", while the metrics port,
which settings.json leaves to the env (so `mlops serve --metrics-port` works), is the operator's.

The executor (executor/api/rest/server.go 185-191) routes only `POST /v2/models/{name}/infer`,
`POST /v2/models/infer`, `GET /v2/models/{name}/ready`, `GET /v2/models/{name}` and
`GET /v2/health/ready`. It calls `/v2/models/<name from the client's path>/infer` on the model
(predictor_process.go 87-92, rest/client.go 266-280; gRPC forwards model_name unchanged,
grpc/kfserving/server.go 76-88), and answers ready and metadata only for a graph node of that name
(predictor_process.go 470-484). So every predictor of an A/B deployment serves the same model name.
Before forwarding a REST inference body it parses it as JSON and needs an object with `inputs` (api/rest/
kfserving.go 10-36, called through predictor_process.go 95-113): request `parameters` pass, so feedback sent
as an inference request reaches the pod (runtimes/feedback.py), while tritonclient's binary tensor data
(bytes after the JSON header) is a 500; gRPC passes the ModelInferRequest as it is, parameters included.

Prometheus, as prometheus-operator v0.93.0 configures it from the PodMonitor (`scrape_config`,
`stored_series`), gives a variant pod's series the pod's labels as target labels; `podmonitor_problems`
checks that MLServer's series are stored with the pod's model and variant, and feedback series with the
variant they name (which may be another pod's).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from runtimes.contract import DRAIN_SECONDS, FEEDBACK, INFER_SUCCESS, METRICS_PORT, MODEL_SETTINGS_DIR

from ..render import seldon

# seldon-core-operator chart defaults (helm-charts/seldon-core-operator/values.yaml at v1.18.2: 17-20,
# 41, 61-62, 122-125) and the operator's constants (operator/constants/constants.go 20-21, 45-46).
CHART = "seldon-core-operator"
CHART_DEFAULTS = {
    "istio": {"enabled": False, "gateway": "istio-system/seldon-gateway"},
    "defaultUserID": "8888",
    "executor": {"port": 8000, "prometheus": {"path": "/prometheus"}},
    "predictiveUnit": {"httpPort": 9000, "grpcPort": 9500, "metricsPortName": "metrics"},
}
FIRST_METRICS_PORT = 6000
GRPC_PATH_REGEX = ".*tensorflow.*|.*seldon.protos.*|.*inference.*"
# Names the operator sets with SetEnvVar(..., override=false): one already in the manifest drops the whole env.
TRAP_ENV = ("PREDICTIVE_UNIT_HTTP_SERVICE_PORT", "MLSERVER_HTTP_PORT", "PREDICTIVE_UNIT_GRPC_SERVICE_PORT", "MLSERVER_GRPC_PORT")
PRE_STOP_SECONDS = 10  # the operator's `/bin/sleep 10` preStop hook (seldondeployment_controller.go 830-833)
ISTIO_GATEWAY_CHART = "gateway"  # istio/istio manifests/charts/gateway
SETTINGS_FILE = Path(MODEL_SETTINGS_DIR) / "settings.json"  # copied into the image as /app/server/settings.json
DOCKERFILE = "Dockerfile"


def merge(base: dict, over: dict) -> dict:
    """Helm's values merge: maps merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


@dataclass(frozen=True)
class Chart:
    """The seldon-core-operator values that change what the operator makes (defaults merged)."""

    found: bool
    istio_enabled: bool
    gateway: str  # namespace/name
    metrics_port_name: str
    prometheus_path: str
    default_user: int | None

    @classmethod
    def of(cls, objects: list[dict]) -> Chart:
        releases = [o for o in objects if o.get("kind") == "HelmRelease" and _chart_name(o) == CHART]
        values = merge(CHART_DEFAULTS, (releases[0].get("spec") or {}).get("values") or {}) if releases else CHART_DEFAULTS
        user = str(values.get("defaultUserID") or "")
        return cls(
            found=bool(releases),
            istio_enabled=bool(values["istio"].get("enabled")),
            gateway=str(values["istio"].get("gateway") or ""),
            metrics_port_name=str(values["predictiveUnit"].get("metricsPortName") or "metrics"),
            prometheus_path=str(values["executor"]["prometheus"].get("path") or "/prometheus"),
            default_user=int(user) if user.isdigit() else None,
        )


def _chart_name(release: dict) -> str | None:
    return (((release.get("spec") or {}).get("chart") or {}).get("spec") or {}).get("chart")


@dataclass
class Container:
    """A model container as the operator leaves it in the pod spec."""

    name: str
    image: str
    env: list[tuple[str, str]]  # in pod-spec order, after the operator; values from secrets are left out
    ports: dict[str, int]
    run_as_user: int | None  # None: the image's USER
    probes: dict[str, dict]  # liveness/readiness as the pod runs them: ours, or the operator's TCP defaults
    pre_stop_seconds: int  # the operator's preStop sleep, where the manifest has no lifecycle; else 0
    grace_seconds: int = 30  # the pod's terminationGracePeriodSeconds (Kubernetes' default 30)
    dropped_env: list[str] = field(default_factory=list)  # manifest env the operator threw away, and why

    @property
    def readiness_path(self) -> str | None:
        return (self.probes["readiness"].get("httpGet") or {}).get("path")

    def environment(self, image_env: dict[str, str]) -> dict[str, str]:
        """What the process sees: the image's ENV, then the pod's env in order (the last of a name wins)."""
        out = dict(image_env)
        out.update(self.env)
        return out


@dataclass
class Predictor:
    name: str
    traffic: int
    shadow: bool
    graph_name: str
    labels: dict[str, str]  # the pod's labels from componentSpecs metadata
    container: Container | None  # the container paired with the graph's root node


@dataclass
class Deployment:
    """One SeldonDeployment: its predictors' model containers and the Istio route in front of them."""

    name: str
    namespace: str
    gateway: str
    hosts: list[str]
    predictors: list[Predictor]

    @property
    def http_prefix(self) -> str:
        return f"/seldon/{self.namespace}/{self.name}/"

    @property
    def grpc_headers(self) -> dict[str, str]:
        return {"seldon": self.name, "namespace": self.namespace}

    @property
    def grpc_path(self) -> str:
        """The regex the gRPC route matches the method path with (Python's `re` reads it as Envoy does here)."""
        return GRPC_PATH_REGEX

    @property
    def routes(self) -> list[tuple[str, int]]:
        return [(p.name, p.traffic) for p in self.predictors if not p.shadow]

    @property
    def mirror(self) -> tuple[str, float] | None:
        """The last shadow predictor (each one overwrites the route's mirror), with its percentage."""
        shadows = [p for p in self.predictors if p.shadow]
        if not shadows:
            return None
        return shadows[-1].name, float(shadows[-1].traffic or 100)


def _set_env(env: list[tuple[str, str]], name: str, value: str, dropped: list[str]) -> list[tuple[str, str]]:
    """utils.SetEnvVar(env, var, override=false): a name already present leaves nil, the whole env gone."""
    if any(n == name for n, _ in env):
        dropped.append(f"{name} is set in the manifest, so the operator drops the container's whole env ({', '.join(n for n, _ in env)})")
        return []
    return [*env, (name, value)]


def _operator_container(con: dict, pod: dict, predictor: dict, sdep_name: str, chart: Chart, http: int, grpc: int, metrics: int) -> Container:
    """The graph's container after defaulting and createContainerService (line numbers in the module docstring).

    `http`/`grpc` are the ports the operator numbered for this container name, used where the container
    declares none; `metrics` the next metrics port, used where it declares none under the chart's name.
    """
    name = con.get("name", "")
    ports = {pt.get("name"): int(pt.get("containerPort")) for pt in con.get("ports") or [] if pt.get("name")}
    ports.setdefault(chart.metrics_port_name, metrics)
    http, grpc = ports.setdefault("http", http), ports.setdefault("grpc", grpc)
    env = [(e["name"], str(e.get("value", ""))) for e in con.get("env") or [] if "value" in e]
    dropped: list[str] = []
    if not any(n == "PREDICTIVE_UNIT_SERVICE_PORT" for n, _ in env):
        env.append(("PREDICTIVE_UNIT_SERVICE_PORT", str(http)))
    for var, value in zip(TRAP_ENV, (http, http, grpc, grpc), strict=True):
        env = _set_env(env, var, str(value), dropped)
    graph = predictor.get("graph") or {}
    if graph.get("parameters"):
        env = _set_env(env, "PREDICTIVE_UNIT_PARAMETERS", json.dumps(graph["parameters"]), dropped)
    if graph.get("modelUri"):
        env = _set_env(env, "MLSERVER_MODEL_URI", "/mnt/models", dropped)
    labels = {"version": predictor.get("name", ""), **(predictor.get("labels") or {})}
    env += [
        ("PREDICTIVE_UNIT_ID", name),
        ("MLSERVER_MODEL_NAME", name),
        ("PREDICTIVE_UNIT_IMAGE", con.get("image", "")),
        ("PREDICTOR_ID", predictor.get("name", "")),
        ("PREDICTOR_LABELS", json.dumps(labels, sort_keys=True, separators=(",", ":"))),
        ("SELDON_DEPLOYMENT_ID", sdep_name),
        ("SELDON_EXECUTOR_ENABLED", "true"),
    ]
    metrics_port = str(ports[chart.metrics_port_name])
    env += [
        ("PREDICTIVE_UNIT_METRICS_SERVICE_PORT", metrics_port),
        ("PREDICTIVE_UNIT_METRICS_ENDPOINT", chart.prometheus_path),
        ("MLSERVER_METRICS_PORT", metrics_port),
        ("MLSERVER_METRICS_ENDPOINT", chart.prometheus_path),
    ]
    probes = {
        kind: con.get(f"{kind}Probe") or {"tcpSocket": {"port": http}, "initialDelaySeconds": delay, "periodSeconds": 5}
        for kind, delay in (("liveness", 60), ("readiness", 20))
    }
    pod_sc = pod.get("securityContext")
    user = pod_sc.get("runAsUser") if pod_sc is not None else chart.default_user
    pre_stop = 0 if con.get("lifecycle") else PRE_STOP_SECONDS
    return Container(name, con.get("image", ""), env, ports, user, probes, pre_stop, int(pod.get("terminationGracePeriodSeconds", 30)), dropped)


def derive(sdep: dict, chart: Chart) -> Deployment:
    meta, spec = sdep.get("metadata") or {}, sdep.get("spec") or {}
    name, namespace = meta.get("name", "?"), meta.get("namespace") or seldon.NAMESPACE
    annotations = meta.get("annotations") or {}
    next_http, next_grpc, next_metrics = CHART_DEFAULTS["predictiveUnit"]["httpPort"], CHART_DEFAULTS["predictiveUnit"]["grpcPort"], FIRST_METRICS_PORT
    http_by_name: dict[str, int] = {}
    grpc_by_name: dict[str, int] = {}
    predictors = []
    for p in spec.get("predictors") or []:
        graph_name = (p.get("graph") or {}).get("name", "")
        found, pod_labels = None, {}
        for cspec in p.get("componentSpecs") or []:
            pod = cspec.get("spec") or {}
            for con in pod.get("containers") or []:
                cname = con.get("name", "")
                if cname not in http_by_name:  # numbered per container name, across predictors (defaults.go 218-222)
                    http_by_name[cname], next_http = next_http, next_http + 1
                    grpc_by_name[cname], next_grpc = next_grpc, next_grpc + 1
                if cname != graph_name:
                    continue
                found = _operator_container(con, pod, p, name, chart, http_by_name[cname], grpc_by_name[cname], next_metrics)
                if chart.metrics_port_name not in {pt.get("name") for pt in con.get("ports") or []}:
                    next_metrics += 1  # the port was added (defaults.go 57-67)
                pod_labels = (cspec.get("metadata") or {}).get("labels") or {}
        predictors.append(Predictor(p.get("name", ""), int(p.get("traffic") or 0), bool(p.get("shadow")), graph_name, pod_labels, found))
    gateway = annotations.get("seldon.io/istio-gateway", chart.gateway)
    hosts = [h.strip() for h in annotations.get("seldon.io/istio-host", "*").split(",")]
    return Deployment(name, namespace, gateway, hosts, predictors)


# --- the image ------------------------------------------------------------------------------------


def image_config(root: Path) -> tuple[dict[str, str], int | None]:
    """The serving image's ENV and numeric USER, read from the Dockerfile (`ENV A=1 \\` lines)."""
    path = root / DOCKERFILE
    if not path.is_file():
        return {}, None
    text = re.sub(r"\\\n", " ", path.read_text())
    env: dict[str, str] = {}
    user = None
    for line in text.splitlines():
        words = line.split(None, 1)
        if len(words) == 2 and words[0] == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", words[1])))
        elif len(words) == 2 and words[0] == "USER" and words[1].strip().isdigit():
            user = int(words[1])
    return env, user


def server_settings(root: Path) -> dict:
    path = root / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def served_metrics(container: Container, image_env: dict[str, str], settings: dict) -> tuple[int, str]:
    """Where MLServer serves its metrics in the pod: settings.json first, then the env, then its defaults."""
    env = container.environment(image_env)
    port = settings.get("metrics_port") or env.get("MLSERVER_METRICS_PORT") or METRICS_PORT
    path = settings.get("metrics_endpoint") or env.get("MLSERVER_METRICS_ENDPOINT") or "/metrics"
    return int(port), path


# --- checks ---------------------------------------------------------------------------------------


def _where(data: dict) -> str:
    meta = data.get("metadata") or {}
    return f"{data.get('kind', '?')}/{meta.get('name', '?')}"


def gateway_problems(objects: list[dict], dep: Deployment) -> list[str]:
    ns, _, name = dep.gateway.rpartition("/")
    ns = ns or dep.namespace
    gateways = [o for o in objects if o.get("kind") == "Gateway" and (o.get("metadata") or {}).get("name") == name
                and (o.get("metadata") or {}).get("namespace") == ns]  # fmt: skip
    if not gateways:
        return [f"the VirtualService the operator makes binds to the Istio Gateway {ns}/{name}, which nothing here creates: no request reaches the model"]
    gw = gateways[0].get("spec") or {}
    selector = gw.get("selector") or {}
    pods = [labels for _, labels in gateway_pods(objects)]
    problems = []
    if not any(selector and all(lbl.get(k) == v for k, v in selector.items()) for lbl in pods):
        problems.append(f"Gateway {ns}/{name} selects {selector}, which no Istio gateway chart release here labels its pods with ({pods or 'none'})")
    servers = [s for s in gw.get("servers") or [] if str((s.get("port") or {}).get("protocol", "")).upper() in ("HTTP", "HTTP2", "HTTPS")]
    hosts = {h.rpartition("/")[2] for s in servers for h in s.get("hosts") or []}
    if not servers:
        problems.append(f"Gateway {ns}/{name} has no HTTP server: neither REST nor gRPC (HTTP/2) gets in")
    elif not all(h in hosts or "*" in hosts for h in dep.hosts):
        problems.append(f"Gateway {ns}/{name} serves hosts {sorted(hosts)}, not the VirtualService's {dep.hosts}")
    secrets = {(o.get("metadata") or {}).get("name") for o in objects if o.get("kind") == "Secret"}
    for server in gw.get("servers") or []:
        tls = server.get("tls") or {}
        if str((server.get("port") or {}).get("protocol", "")).upper() == "HTTPS" and tls.get("mode", "SIMPLE") == "SIMPLE":
            if not tls.get("credentialName"):
                problems.append(f"Gateway {ns}/{name}: HTTPS port {server['port'].get('number')} names no tls.credentialName, so it has no certificate")
            elif tls["credentialName"] in secrets:
                problems.append(f"Gateway {ns}/{name}: the TLS key Secret {tls['credentialName']!r} is in Git; issue it in the cluster (cert-manager) instead")
    return problems


def gateway_pods(objects: list[dict]) -> list[tuple[str, dict[str, str]]]:
    """(namespace, labels) of the pods each Istio gateway chart release runs."""
    pods = []
    for release in (o for o in objects if o.get("kind") == "HelmRelease" and _chart_name(o) == ISTIO_GATEWAY_CHART):
        # istio 1.26.8 manifests/charts/gateway/templates/_helpers.tpl 1-7, 18-21: labels app=<name>, istio=<name minus "istio-">
        rel = release.get("spec") or {}
        gname = (rel.get("values") or {}).get("name") or rel.get("releaseName") or release["metadata"]["name"]
        labels = {"app": gname, "istio": gname.removeprefix("istio-"), **((rel.get("values") or {}).get("labels") or {})}
        pods.append((rel.get("targetNamespace") or release["metadata"].get("namespace", ""), labels))
    return pods


# --- access: Istio's authentication and authorization (istio/istio 1.26.8) ------------------------

ROOT_NAMESPACE = "istio-system"  # meshConfig.rootNamespace's default: policies there without a selector apply mesh-wide
UNKNOWN_CALLER = "192.0.2.1"  # an address no allow-list names (RFC 5737 documentation range)


def _selects(obj: dict, namespace: str, labels: dict[str, str]) -> bool:
    """A policy applies to the workloads of its namespace that its selector matches (all, without
    one); from the root namespace, to those of every namespace."""
    ns = (obj.get("metadata") or {}).get("namespace")
    match = (((obj.get("spec") or {}).get("selector") or {}).get("matchLabels")) or {}
    return ns in (namespace, ROOT_NAMESPACE) and all(labels.get(k) == v for k, v in match.items())


def _string_match(pattern: str, value: str | None) -> bool:
    """Istio's string match for principals and paths (pilot/pkg/security/authz/matcher/string.go 99-117):
    "*" is any non-empty value, a leading or trailing "*" a suffix or prefix, anything else exact."""
    if value is None:
        return False
    if pattern == "*":
        return value != ""
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _in_blocks(blocks: list[str], ip: str) -> bool:
    return any(ipaddress.ip_address(ip) in ipaddress.ip_network(b, strict=False) for b in blocks)


@dataclass(frozen=True)
class Request:
    path: str  # without the query string, as Envoy's path matcher reads it
    method: str
    principal: str | None  # "<iss>/<sub>" of a verified JWT; None without a token
    ip: str


# Source and operation fields this model evaluates (model.go 118-145 builds them); a rule using any
# other field (peer identities, hosts, ports, `when` conditions) is taken as not matching.
_SOURCE = {"requestPrincipals": lambda v, r: any(_string_match(p, r.principal) for p in v),
           "notRequestPrincipals": lambda v, r: not any(_string_match(p, r.principal) for p in v),
           "remoteIpBlocks": lambda v, r: _in_blocks(v, r.ip), "notRemoteIpBlocks": lambda v, r: not _in_blocks(v, r.ip),
           "ipBlocks": lambda v, r: _in_blocks(v, r.ip), "notIpBlocks": lambda v, r: not _in_blocks(v, r.ip)}  # fmt: skip
_OPERATION = {"paths": lambda v, r: any(_string_match(p, r.path) for p in v),
              "notPaths": lambda v, r: not any(_string_match(p, r.path) for p in v),
              "methods": lambda v, r: r.method in v, "notMethods": lambda v, r: r.method not in v}  # fmt: skip


def _all(fields: dict, known: dict, req: Request) -> bool:
    return all(k in known and known[k](v, req) for k, v in fields.items())


def _rule_matches(rule: dict, req: Request) -> bool:
    """Within a rule `from`, `to` and `when` are ANDed; the entries of each are ORed; a source's or an
    operation's fields are ANDed, the values of one field ORed (security/v1 AuthorizationPolicy)."""
    if rule.get("when"):
        return False
    froms, tos = rule.get("from"), rule.get("to")
    if froms and not any(_all(f.get("source") or {}, _SOURCE, req) for f in froms):
        return False
    return not tos or any(_all(t.get("operation") or {}, _OPERATION, req) for t in tos)


@dataclass
class Access:
    """What one workload's sidecar or gateway enforces on a request: the JWT rules of the
    RequestAuthentications and the AuthorizationPolicies that select it."""

    jwt_rules: list[dict]
    deny: list[dict]
    allow: list[dict]

    @classmethod
    def of(cls, objects: list[dict], namespace: str, labels: dict[str, str]) -> Access:
        def applying(kind: str) -> list[dict]:
            return [o.get("spec") or {} for o in objects if o.get("kind") == kind and _selects(o, namespace, labels)]

        policies = applying("AuthorizationPolicy")
        return cls(
            jwt_rules=[r for spec in applying("RequestAuthentication") for r in spec.get("jwtRules") or []],
            deny=[p for p in policies if p.get("action") == "DENY"],
            allow=[p for p in policies if p.get("action", "ALLOW") == "ALLOW"],
        )

    @classmethod
    def ingress(cls, objects: list[dict]) -> Access:
        """At the ingress gateway pods (the first gateway chart release's)."""
        pods = gateway_pods(objects)
        return cls.of(objects, *(pods[0] if pods else (ROOT_NAMESPACE, {})))

    def allows(self, req: Request) -> bool:
        """Envoy's RBAC filters as Istio builds them (pilot/pkg/security/authz/builder/builder.go
        114-135): DENY first; then, if any ALLOW policy applies, the request must match one of its
        rules (an ALLOW policy without rules matches nothing)."""
        if any(_rule_matches(r, req) for p in self.deny for r in p.get("rules") or []):
            return False
        return not self.allow or any(_rule_matches(r, req) for p in self.allow for r in p.get("rules") or [])


def peer_mtls(objects: list[dict], namespace: str, labels: dict[str, str], port: int) -> tuple[str, list[str]]:
    """The mTLS mode a pod's sidecar applies on `port`, and the workload policies in contention.

    pilot/pkg/security/authn/policy_applier.go 365-433 (ComposePeerAuthentication): PERMISSIVE, then
    the mesh's policy (root namespace, no selector), the namespace's, the workload's (a selector in
    its namespace; the oldest of several wins), each overriding when its mode is set; a port-level
    entry of the workload policy overrides the rest for that port."""
    pas = [o for o in objects if o.get("kind") == "PeerAuthentication"]

    def mode(mtls: dict | None) -> str | None:
        m = (mtls or {}).get("mode")
        return None if m in (None, "UNSET") else m

    def unselected(ns: str) -> list[dict]:
        return [o["spec"] for o in pas if o["metadata"].get("namespace") == ns and not ((o.get("spec") or {}).get("selector") or {}).get("matchLabels")]

    workload = [o for o in pas if o["metadata"].get("namespace") == namespace != ROOT_NAMESPACE
                and (sel := ((o.get("spec") or {}).get("selector") or {}).get("matchLabels"))
                and all(labels.get(k) == v for k, v in sel.items())]  # fmt: skip
    out = "PERMISSIVE"
    for spec in [*unselected(ROOT_NAMESPACE)[:1], *unselected(namespace)[:1], *(o["spec"] for o in workload[:1])]:
        out = mode(spec.get("mtls")) or out
    if workload:
        per_port = (workload[0]["spec"].get("portLevelMtls") or {}).get(str(port))
        if per_port is not None:
            out = mode(per_port) or out
    return out, [o["metadata"]["name"] for o in workload]


def access_problems(objects: list[dict], deployments: list[Deployment], image_env: dict[str, str], settings: dict) -> list[tuple[str, str]]:
    """Who gets in: health open to anyone (load balancers, uptime checks), a required token once the
    ingress verifies tokens, and metrics still scrapeable by a Prometheus outside the mesh."""
    out = []
    ingress = Access.ingress(objects)
    scraped = any(o.get("kind") == "PodMonitor" for o in objects)
    for dep in deployments:
        where = f"SeldonDeployment/{dep.name}"
        for name in sorted({p.graph_name for p in dep.predictors}):
            for path in (f"{dep.http_prefix}v2/health/ready", f"{dep.http_prefix}v2/models/{name}/ready"):
                if not ingress.allows(Request(path, "GET", None, UNKNOWN_CALLER)):
                    out.append((where, f"the ingress refuses GET {path} without a token: health and readiness must stay open"))
            infer = f"{dep.http_prefix}v2/models/{name}/infer"
            if ingress.jwt_rules and ingress.allows(Request(infer, "POST", None, UNKNOWN_CALLER)):
                out.append((where, (
                    f"the ingress verifies tokens but lets POST {infer} in without one: a RequestAuthentication only rejects "
                    "invalid tokens (pilot/pkg/security/authn/policy_applier.go 142-145, allow_missing); add an "
                    "AuthorizationPolicy that requires requestPrincipals"
                )))  # fmt: skip
        for p in dep.predictors:
            if p.container is None:
                continue
            port, _ = served_metrics(p.container, image_env, settings)
            mode, workload = peer_mtls(objects, dep.namespace, p.labels, port)
            if len(workload) > 1:
                out.append((where, f"predictor '{p.name}': PeerAuthentications {', '.join(workload)} all select its pods; Istio applies only the oldest"))
            if scraped and mode == "STRICT":
                out.append((where, (
                    f"predictor '{p.name}': mTLS is STRICT on metrics port {port}, so Prometheus (outside the mesh, no "
                    "sidecar) cannot scrape it; give the port a PERMISSIVE portLevelMtls in a PeerAuthentication that selects the pods"
                )))  # fmt: skip
    return out


def scaling_problems(sdep: dict) -> list[str]:
    """PDBs and HPAs as the operator makes them (seldondeployment_controller.go 189-232, 508-526)."""
    problems = []
    specs = [(p.get("name"), c) for p in (sdep.get("spec") or {}).get("predictors") or [] for c in p.get("componentSpecs") or []]
    with_pdb = [name for name, c in specs if c.get("pdbSpec")]
    if len(with_pdb) > 1:
        problems.append(
            f"pdbSpec on predictors {', '.join(with_pdb)}: each PDB the operator makes selects every pod of the "
            "SeldonDeployment, and the eviction API refuses pods under more than one, so node drains would stall; keep one"
        )
    for name, c in specs:
        hpa = c.get("hpaSpec")
        if hpa and any((m.get("resource") or {}).get("name") == "cpu" for m in hpa.get("metricsv2") or []):
            requests = [((con.get("resources") or {}).get("requests") or {}).get("cpu") for con in (c.get("spec") or {}).get("containers") or []]
            if not all(requests):
                problems.append(f"predictor '{name}': hpaSpec scales on CPU utilization, which needs resources.requests.cpu on every container")
    return problems


def deployment_problems(dep: Deployment, chart: Chart, image_env: dict[str, str], image_user: int | None, settings: dict) -> list[str]:
    problems = []
    names = {p.graph_name for p in dep.predictors}
    if len(names) > 1:
        problems.append(
            f"predictors serve different model names {sorted(names)}: the executor calls /v2/models/<the client's name> on "
            "whichever predictor Istio picked, so a client's name is missing from the others; give every predictor the same name"
        )
    for p in dep.predictors:
        con = p.container
        at = f"predictor '{p.name}'"
        if con is None:
            problems.append(f"{at}: no container is named like the graph node '{p.graph_name}', so the operator pairs none with it")
            continue
        problems += [f"{at}: {d}" for d in con.dropped_env]
        env = con.environment(image_env)
        if env.get("MLSERVER_MODEL_NAME") != p.graph_name:
            problems.append(f"{at}: MLServer would serve '{env.get('MLSERVER_MODEL_NAME')}', not the graph's '{p.graph_name}'")
        if con.readiness_path not in (None, f"/v2/models/{p.graph_name}/ready"):
            problems.append(f"{at}: readinessProbe asks {con.readiness_path}, but the pod serves '{p.graph_name}'")
        if con.grace_seconds < con.pre_stop_seconds + DRAIN_SECONDS:
            problems.append(
                f"{at}: terminationGracePeriodSeconds {con.grace_seconds} leaves {con.grace_seconds - con.pre_stop_seconds} s after the preStop sleep; "
                f"give MLServer at least {DRAIN_SECONDS} s to finish the requests it accepted"
            )
        if con.run_as_user not in (None, image_user):  # None: the image's USER
            problems.append(f"{at}: the pod runs as uid {con.run_as_user}, not the image's user {image_user}: set spec.securityContext.runAsUser")
        port, _ = served_metrics(con, image_env, settings)
        declared = {v: k for k, v in con.ports.items()}
        if declared.get(port) not in (chart.metrics_port_name, seldon.METRICS_PORT_NAME):
            problems.append(f"{at}: MLServer serves metrics on {port}, which no port named {seldon.METRICS_PORT_NAME!r} declares")
    return problems


# --- what Prometheus stores of a pod's series -----------------------------------------------------
#
# prometheus-operator v0.93.0 (pkg/prometheus/promcfg.go) makes one scrape job per PodMetricsEndpoint
# (generatePodMonitorConfig, 1447-1693): honor_labels from `honorLabels`, forced false when the
# Prometheus sets overrideHonorLabels (AddHonorLabels, 499-507; 1462); the target labels namespace,
# container and pod (1601-1614), one per podTargetLabels entry (1617-1625), job "<namespace>/<name>" of
# the PodMonitor (1632-1635), endpoint = the port's name (1645-1649), then the endpoint's `relabelings`
# (1660-1661); its `metricRelabelings` become metric_relabel_configs (1684-1690), actions lower-cased
# (2396-2433). Prometheus merges each scraped series with its target's labels (scrape/scrape.go
# mutateSampleLabels, 588-635 at v3.11.0, 665-721 at v2.42.0): with honor_labels false every target label
# is set and a scraped value of the same name moves to exported_<name>; with true the scraped value wins;
# metric_relabel_configs run last, on the merged labels (model/relabel/relabel.go 312-334 at v3.11.0: a
# replace whose result is empty deletes the target label).

KUBE_PROMETHEUS_STACK = "kube-prometheus-stack"


def _sanitize(label: str) -> str:
    """A Kubernetes label name as a Prometheus label name (the __meta_kubernetes_pod_label_* suffix)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _snake(relabeling: dict) -> dict:
    """A RelabelConfig of the CRD (camelCase) as Prometheus reads it (snake_case, lower-case action)."""
    out = {re.sub(r"([A-Z])", r"_\1", k).lower(): v for k, v in relabeling.items()}
    if "action" in out:
        out["action"] = str(out["action"]).lower()
    return out


def override_honor_labels(objects: list[dict]) -> bool:
    """kube-prometheus-stack's prometheus.prometheusSpec.overrideHonorLabels (default false)."""
    for release in (o for o in objects if o.get("kind") == "HelmRelease" and _chart_name(o) == KUBE_PROMETHEUS_STACK):
        values = (release.get("spec") or {}).get("values") or {}
        return bool(((values.get("prometheus") or {}).get("prometheusSpec") or {}).get("overrideHonorLabels"))
    return False


def scrape_config(podmonitor: dict, index: int = 0, override_honor: bool = False) -> dict:
    """The scrape job's label handling for one PodMetricsEndpoint, in Prometheus' own keys (the pod selection,
    a set of keep rules on the same meta labels, is left out)."""
    meta, spec = podmonitor.get("metadata") or {}, podmonitor.get("spec") or {}
    ep = (spec.get("podMetricsEndpoints") or [])[index]
    relabel_configs = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        *({"source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(label)}"], "target_label": _sanitize(label), "regex": "(.+)", "replacement": "${1}"}
          for label in spec.get("podTargetLabels") or []),
        {"target_label": "job", "replacement": f"{meta.get('namespace', '')}/{meta.get('name', '')}"},
        *([{"target_label": "endpoint", "replacement": ep["port"]}] if ep.get("port") else []),
        *(_snake(r) for r in ep.get("relabelings") or []),
    ]  # fmt: skip
    out = {"honor_labels": bool(ep.get("honorLabels")) and not override_honor, "relabel_configs": relabel_configs}
    if ep.get("metricRelabelings"):
        out["metric_relabel_configs"] = [_snake(r) for r in ep["metricRelabelings"]]
    return out


def _go_expand(match: re.Match, template: str) -> str:
    """Go's Regexp.Expand: $1, ${1}, $name, ${name} (a name takes every letter, digit and _ it can), $$."""

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(2)
        if name.isdigit():
            return (match.group(int(name)) or "") if int(name) <= match.re.groups else ""
        return match.groupdict().get(name) or ""

    return re.sub(r"\$\$|\$\{(\w+)\}|\$(\w+)", one, template)


def relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus' relabelling (model/relabel/relabel.go) of one label set; None when it is dropped.
    Actions replace, keep, drop, labelmap, labeldrop, labelkeep; regexes are anchored."""
    out = dict(labels)
    for rc in configs:
        action, regex = rc.get("action", "replace"), re.compile(rc.get("regex", "(.*)"))
        if action in ("labeldrop", "labelkeep"):
            out = {k: v for k, v in out.items() if bool(regex.fullmatch(k)) == (action == "labelkeep")}
            continue
        if action == "labelmap":
            for k, v in list(out.items()):
                if m := regex.fullmatch(k):
                    out[_go_expand(m, rc.get("replacement", "$1"))] = v
            continue
        value = rc.get("separator", ";").join(out.get(name, "") for name in rc.get("source_labels") or [])
        m = regex.fullmatch(value)
        if action == "keep" and m is None or action == "drop" and m is not None:
            return None
        if action == "replace" and m is not None:
            target, result = _go_expand(m, rc["target_label"]), _go_expand(m, rc.get("replacement", "$1"))
            if result:
                out[target] = result
            else:
                out.pop(target, None)
        elif action not in ("keep", "drop", "replace"):
            raise ValueError(f"relabel action {action!r} is not modelled")
    return {k: v for k, v in out.items() if v != ""}


def pod_meta(namespace: str, deployment: str, predictor: Predictor, port_name: str, address: str = "") -> dict[str, str]:
    """The Kubernetes service discovery's labels of a predictor's pod (one replica), for `stored_series`."""
    meta = {f"__meta_kubernetes_pod_label_{_sanitize(k)}": v for k, v in predictor.labels.items()}
    meta.update({
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": f"{deployment}-{predictor.name}-0",
        "__meta_kubernetes_pod_container_name": predictor.container.name if predictor.container else predictor.graph_name,
        "__meta_kubernetes_pod_container_port_name": port_name,
        "__address__": address,
    })  # fmt: skip
    return {k: v for k, v in meta.items() if v}


def stored_series(scrape: dict, meta: dict[str, str], exposed: dict[str, str]) -> dict[str, str] | None:
    """The labels Prometheus stores for a series the pod exposes (`exposed`, with __name__): the target's
    labels merged by honor_labels, then metric_relabel_configs; None when a rule drops it."""
    target = relabel(meta, scrape["relabel_configs"])
    if target is None:
        return None
    if "instance" not in target and target.get("__address__"):
        target["instance"] = target["__address__"]
    target = {k: v for k, v in target.items() if not k.startswith("__")}
    merged = dict(exposed)
    if scrape.get("honor_labels"):
        merged.update({k: v for k, v in target.items() if not exposed.get(k)})
    else:
        conflicts = sorted(((k, exposed[k]) for k in target if exposed.get(k)), key=lambda kv: len(kv[0]))
        merged.update(target)
        for name, value in conflicts:
            while merged.get(name := f"exported_{name}"):
                pass
            merged[name] = value
    return relabel(merged, scrape.get("metric_relabel_configs") or [])


def _label_problems(scrape: dict, dep: Deployment, port_name: str) -> list[str]:
    """A pod's MLServer series must be stored under the pod's model and variant (the dashboards' pod form),
    and the feedback it records under the variant the feedback names, which may be another pod's."""
    out = []
    live = [p.labels.get(f"{seldon.LABEL}variant", "") for p in dep.predictors if not p.shadow]
    for p in dep.predictors:
        if p.container is None:
            continue
        meta = pod_meta(dep.namespace, dep.name, p, port_name)
        model, own = p.labels.get(f"{seldon.LABEL}model"), p.labels.get(f"{seldon.LABEL}variant")
        served = stored_series(scrape, meta, {"__name__": INFER_SUCCESS, "model": p.graph_name})
        if served is None or (served.get("model"), served.get("variant")) != (model, own):
            got = "dropped" if served is None else f"model={served.get('model')!r} variant={served.get('variant')!r}"
            out.append(f"predictor '{p.name}': MLServer's series would be stored {got}, not under the pod's model={model!r} variant={own!r}")
        if p.shadow:
            continue  # a shadow records no feedback
        named = next((v for v in live if v != own), own)
        fb = stored_series(scrape, meta, {"__name__": f"{FEEDBACK}_total", "model": p.graph_name, "variant": named, "outcome": "correct"})
        exported = sorted(k for k in fb or {} if k.startswith("exported_") and k.endswith("variant"))
        if fb is None or fb.get("variant") != named or fb.get("model") != model or exported:
            got = "dropped" if fb is None else f"variant={fb.get('variant')!r}" + "".join(f" {k}={fb[k]!r}" for k in exported)
            out.append(
                f"predictor '{p.name}': feedback it records for variant {named!r} ({FEEDBACK}_total{{variant=\"{named}\"}}) would be stored {got}: "
                "with honor_labels false the pod's target label `variant` wins and the series' own moves to exported_variant "
                "(Prometheus scrape/scrape.go mutateSampleLabels); restore it in metricRelabelings"
            )
    return out


def podmonitor_problems(objects: list[dict], deployments: list[Deployment], image_env: dict[str, str], settings: dict) -> list[tuple[str, str]]:
    """Each PodMonitor endpoint that selects model pods must scrape where their MLServer serves metrics, and
    store the pods' series under the labels the dashboards read."""
    out = []
    override = override_honor_labels(objects)
    for pm in (o for o in objects if o.get("kind") == "PodMonitor"):
        selector = (pm.get("spec") or {}).get("selector") or {}
        keys = [e.get("key", "") for e in selector.get("matchExpressions") or []] + list(selector.get("matchLabels") or {})
        if not any(k.startswith(seldon.LABEL) for k in keys):
            continue
        for i, ep in enumerate(pm["spec"].get("podMetricsEndpoints") or []):
            scrape = scrape_config(pm, i, override)
            for dep in deployments:
                out += [(_where(pm), f"podMetricsEndpoints[{i}]: {dep.name} {problem}") for problem in _label_problems(scrape, dep, ep.get("port", ""))]
            missed = []
            for dep in deployments:
                for p in dep.predictors:
                    if p.container is None:
                        continue
                    port, path = served_metrics(p.container, image_env, settings)
                    if p.container.ports.get(ep.get("port")) != port or ep.get("path", "/metrics") != path:
                        missed.append(f"{dep.name}/{p.name} serves them on {port} at {path}")
            if missed:
                out.append(
                    (
                        _where(pm),
                        f"podMetricsEndpoints[{i}]: port '{ep.get('port')}' path '{ep.get('path', '/metrics')}' misses MLServer's metrics: {'; '.join(missed)}",
                    )
                )
    return out


def problems(objects: list[dict], root: Path) -> list[tuple[str, str]]:
    """One environment's rendered objects: (Kind/name, problem) for what would fail once the operator,
    the executor and Istio act on them."""
    sdeps = [o for o in objects if o.get("kind") == "SeldonDeployment"]
    if not sdeps:
        return []
    chart = Chart.of(objects)
    if not chart.found:
        return [(_where(sdeps[0]), f"no {CHART} HelmRelease: nothing turns SeldonDeployments into pods")]
    out = []
    if not chart.istio_enabled:
        out.append((f"HelmRelease/{CHART}", "values.istio.enabled is not true: the operator makes no VirtualService, so no traffic gets in or is split"))
    image_env, image_user = image_config(root)
    settings = server_settings(root)
    deployments = [derive(s, chart) for s in sdeps]
    for sdep, dep in zip(sdeps, deployments, strict=True):
        found = deployment_problems(dep, chart, image_env, image_user, settings) + scaling_problems(sdep)
        if chart.istio_enabled:
            found += gateway_problems(objects, dep)
        out += [(_where(sdep), p) for p in found]
    return out + podmonitor_problems(objects, deployments, image_env, settings) + access_problems(objects, deployments, image_env, settings)


def local_only(spec) -> list[str]:
    """What the spec asks for that the local router does and a cluster does not (README, "In a cluster")."""
    notes = []
    for name, model in sorted(spec.models.items()):
        if model.fallback:
            notes.append(
                f"models.{name}.fallback: local only; in a cluster Istio keeps sending a failed variant's share to its not-ready pods, which answer 503"
            )
    return notes


def describe(objects: list[dict], root: Path) -> list[dict]:
    """What each SeldonDeployment becomes, for `mlops cluster`."""
    chart = Chart.of(objects)
    image_env, _ = image_config(root)
    settings = server_settings(root)
    out = []
    for sdep in (o for o in objects if o.get("kind") == "SeldonDeployment"):
        dep = derive(sdep, chart)
        mirror = dep.mirror
        out.append({
            "seldonDeployment": f"{dep.namespace}/{dep.name}",
            "ingress": {
                "gateway": dep.gateway,
                "rest": f"http://<ingress>{dep.http_prefix}v2/models/{dep.predictors[0].graph_name if dep.predictors else '?'}/infer",
                "grpc": {"headers": dep.grpc_headers, "model_name": dep.predictors[0].graph_name if dep.predictors else "?"},
                "weights": dict(dep.routes),
                **({"mirror": {"predictor": mirror[0], "percent": mirror[1]}} if mirror else {}),
            },
            "predictors": [
                {
                    "name": p.name,
                    "model": p.graph_name,
                    **({
                        "ports": p.container.ports,
                        "metrics": dict(zip(("port", "path"), served_metrics(p.container, image_env, settings), strict=True)),
                        "runAsUser": p.container.run_as_user,
                        "probes": p.container.probes,
                        "preStop": ["/bin/sh", "-c", f"/bin/sleep {p.container.pre_stop_seconds}"] if p.container.pre_stop_seconds else None,
                        "terminationGracePeriodSeconds": p.container.grace_seconds,
                        "env": dict(p.container.env),
                    } if p.container else {}),
                }
                for p in dep.predictors
            ],
        })  # fmt: skip
    return out
