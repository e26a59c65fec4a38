"""A stand-in for the cluster's ingress path: Istio's ingress gateway plus each predictor's Seldon executor.

Neither Istio nor Seldon's Go executor can run here, so this process reproduces what they do with a
request on its way to the real MLServer pods (`tests/cluster.py` starts those as the operator would
run them). It is configured from `mlops.cluster.derive()` of the generated manifests, nothing else.

Istio 1.26.8 (the VirtualService seldon-core v1.18.2 writes, operator/controllers/
seldondeployment_controller.go 236-411), only when the VirtualService's Gateway exists:
- REST: a URI prefix `/seldon/<namespace>/<deployment>/` rewritten to `/`; no match is a 404.
- gRPC: a path matching `.*tensorflow.*|.*seldon.protos.*|.*inference.*` with the headers
  `seldon: <deployment>` and `namespace: <namespace>`; no match is UNIMPLEMENTED (Envoy's 404).
- Each request goes to one live predictor drawn at random by weight (Envoy's weighted clusters), and a
  copy to the shadow predictor (mirror; its answer is dropped, the Host gets a `-shadow` suffix).

Seldon Core 1.18.2's executor, protocol v2 (executor/api/rest/server.go 185-191; predictor/
predictor_process.go 87-92, 470-484; api/rest/client.go 266-280; api/grpc/kfserving/server.go 36-136):
- REST routes `POST /v2/models/{name}/infer` and `/v2/models/infer` (the graph's name), forwarding
  the body to `/v2/models/<name>/infer` on the model unchanged; `GET /v2/models/{name}/ready` and
  `GET /v2/models/{name}` only for the graph node's name (else 500 "Failed to find model"); `GET
  /v2/health/ready` as a TCP check of the model's port; anything else 404. Headers pass on but
  Content-Type, which it sets from the request. The answer keeps the model's status and body, HTML-escaped
  (json.HTMLEscape, api/rest/client.go 67-89), and of its headers only Content-Type, on a 200 alone
  (server.go 80-117; on an error Go's http sniffs the body instead).
- gRPC: ModelInfer forwards model_name unchanged; ModelReady and ModelMetadata only for the graph
  node's name (else UNKNOWN "Failed to find model"); ServerLive, ServerReady, ServerMetadata and the
  rest panic "Not Implemented", and with no recovery interceptor (api/grpc/server.go 57-61) the panic
  ends the executor: the caller's connection drops (UNAVAILABLE here).

Istio 1.26.8 security at the gateway, from the RequestAuthentications and AuthorizationPolicies that
select it (mlops.cluster.Access, which also holds the policy semantics `mlops validate` checks with):
- Envoy's jwt_authn as Istio configures it (pilot/pkg/security/authn/policy_applier.go 142-275): the
  token from `Authorization: Bearer` (gRPC metadata `authorization`); none passes with no principal
  (allow_missing); one that fails (issuer not configured, signature not from the issuer's JWKS,
  audience not listed, expired) is a 401 "Jwt verification fails"; a valid one gives the request
  principal `<iss>/<sub>`;
- then the RBAC filters (pilot/pkg/security/authz/builder/builder.go 114-135): DENY, then ALLOW
  policies on path, method, request principal and the peer address (remoteIpBlocks with no trusted
  proxies): a refusal is a 403 "RBAC: access denied";
- over gRPC both are local replies, which Envoy maps to UNAUTHENTICATED and PERMISSION_DENIED.
The issuer's JWKS comes in the config, inlined, as istiod inlines it after fetching the jwksUri.

Run: python cluster_standin.py CONFIG.json; prints "ready" once both ports listen.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys

import grpc
import jwt
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from tritonclient.grpc import service_pb2

from mlops.cluster import Access, Request

SERVICE = "/inference.GRPCInferenceService/"
V2_INFER = re.compile(r"^/v2/models/([^/]+)/infer$")
V2_READY = re.compile(r"^/v2/models/([^/]+)/ready$")
V2_META = re.compile(r"^/v2/models/([^/]+)$")
SNIFFED = "text/plain; charset=utf-8"
HOP = {"host", "content-length", "transfer-encoding", "connection", "content-type"}


def _html_escape(data: bytes) -> bytes:
    """Go's json.HTMLEscape, which the executor applies to every uncompressed body it passes back."""
    for raw, escaped in ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"), ("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029")):
        data = data.replace(raw, escaped)
    return data


class Predictor:
    def __init__(self, name: str, cfg: dict):
        self.name, self.graph, self.http, self.grpc = name, cfg["graph"], cfg["http"], cfg["grpc"]
        self.channel = grpc.aio.insecure_channel(self.grpc, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])


class Deployment:
    def __init__(self, cfg: dict):
        self.prefix, self.headers, self.grpc_path = cfg["http_prefix"], cfg["grpc_headers"], re.compile(cfg["grpc_path"])
        self.predictors = {n: Predictor(n, c) for n, c in cfg["predictors"].items()}
        self.routes = [(self.predictors[n], w) for n, w in cfg["routes"]]
        self.mirror = (self.predictors[cfg["mirror"][0]], cfg["mirror"][1]) if cfg.get("mirror") else None

    def pick(self) -> Predictor:
        live = [(p, w) for p, w in self.routes if w > 0]
        return random.choices([p for p, _ in live], weights=[w for _, w in live])[0]

    def mirrored(self) -> Predictor | None:
        if self.mirror and random.random() * 100 < self.mirror[1]:
            return self.mirror[0]
        return None


class Denied(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status, self.text = status, text


class Gate:
    """The gateway's jwt_authn and RBAC filters."""

    def __init__(self, config: dict):
        self.access = Access(config["jwt_rules"], config["deny"], config["allow"])
        self.keys = {r["issuer"]: (r, jwt.PyJWKSet.from_dict(r["jwks"]) if r["jwks"]["keys"] else None) for r in config["jwt_rules"]}
        # forwardOriginalToken false (the default): the verified token is removed before the request goes on
        self.strips = bool(config["jwt_rules"]) and not any(r.get("forwardOriginalToken") for r in config["jwt_rules"])

    def principal(self, authorization: str | None) -> str | None:
        if not self.keys or not authorization or not authorization.startswith("Bearer "):
            return None
        token = authorization.removeprefix("Bearer ")
        try:
            issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
            rule, keys = self.keys.get(issuer, (None, None))
            if rule is None or keys is None:
                raise Denied(401, "Jwt issuer is not configured")
            kid = jwt.get_unverified_header(token).get("kid")
            key = next((k for k in keys.keys if kid is None or k.key_id == kid), None)
            if key is None:
                raise Denied(401, "Jwt verification fails")
            claims = jwt.decode(token, key.key, algorithms=[key.algorithm_name or "RS256"], audience=rule.get("audiences") or None,
                                issuer=issuer, options={"verify_aud": bool(rule.get("audiences"))})  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise Denied(401, "Jwt is expired") from None
        except jwt.InvalidAudienceError:
            raise Denied(401, "Audiences in Jwt are not allowed") from None
        except jwt.PyJWTError:
            raise Denied(401, "Jwt verification fails") from None
        return f"{claims['iss']}/{claims.get('sub', '')}"

    def check(self, path: str, method: str, authorization: str | None, peer: str) -> None:
        """Raises Denied as the gateway would answer, before any route."""
        if not self.access.allows(Request(path, method, self.principal(authorization), peer)):
            raise Denied(403, "RBAC: access denied")


class Standin:
    def __init__(self, config: dict):
        self.deployments = [Deployment(d) for d in config["deployments"] if d.get("gateway_ok")]
        self.gate = Gate(config["access"])
        self.session: ClientSession | None = None
        self.background: set[asyncio.Task] = set()

    def _later(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # --- REST --------------------------------------------------------------------------------------

    async def rest(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        try:
            self.gate.check(path, request.method, request.headers.get("Authorization"), request.remote)
        except Denied as exc:
            return web.Response(status=exc.status, text=exc.text)
        dep = next((d for d in self.deployments if path.startswith(d.prefix)), None)
        if dep is None:
            return web.Response(status=404)  # Envoy: no route
        path = "/" + path[len(dep.prefix) :]
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if not (self.gate.strips and k.lower() == "authorization")}
        shadow = dep.mirrored()
        if shadow is not None:
            self._later(self._executor(shadow, request.method, path, {**headers, "Host": f"{request.host}-shadow"}, body))
        return await self._executor(dep.pick(), request.method, path, headers, body)

    async def _executor(self, pred: Predictor, method: str, path: str, headers: dict, body: bytes) -> web.Response:
        if m := V2_INFER.match(path):
            name = m.group(1)
        elif path == "/v2/models/infer":
            name = pred.graph
        elif (m := V2_READY.match(path) or V2_META.match(path)) and method == "GET":
            name = m.group(1)
            if name != pred.graph:
                return web.json_response({"status": {"code": -1, "info": f"Failed to find model {name}", "status": "FAILURE"}}, status=500)
            return await self._forward(pred, "GET", path, headers, None)
        elif path == "/v2/health/ready" and method == "GET":
            host, port = pred.http.rsplit(":", 1)
            try:
                _, writer = await asyncio.open_connection(host, int(port))
                writer.close()
                return web.Response(status=200)
            except OSError:
                return web.Response(status=503)
        else:
            return web.Response(status=404, text="404 page not found\n")
        if method != "POST":
            return web.Response(status=405)
        return await self._forward(pred, "POST", f"/v2/models/{name}/infer", headers, body)

    async def _forward(self, pred: Predictor, method: str, path: str, headers: dict, body: bytes | None) -> web.Response:
        out = {k: v for k, v in headers.items() if k.lower() not in HOP}
        if body is not None:
            out["Content-Type"] = headers.get("Content-Type", "application/json")
        async with self.session.request(method, f"http://{pred.http}{path}", data=body, headers=out) as r:
            data = await r.read()
            ctype = r.headers.get("Content-Type", SNIFFED) if r.status == 200 else SNIFFED
            if not r.headers.get("Content-Encoding"):
                data = _html_escape(data)
            return web.Response(status=r.status, body=data, headers={"Content-Type": ctype})

    # --- gRPC --------------------------------------------------------------------------------------

    def grpc_handler(self):
        standin = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                method = details.method
                meta = dict(details.invocation_metadata)
                dep = next(
                    (d for d in standin.deployments if d.grpc_path.fullmatch(method) and all(meta.get(k) == v for k, v in d.headers.items())),
                    None,
                )

                async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                    peer = context.peer().split(":")[1] if context.peer().startswith("ipv4:") else context.peer()
                    try:
                        standin.gate.check(method, "POST", meta.get("authorization"), peer)
                    except Denied as exc:
                        code = grpc.StatusCode.UNAUTHENTICATED if exc.status == 401 else grpc.StatusCode.PERMISSION_DENIED
                        await context.abort(code, exc.text)
                    if dep is None:
                        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no route (Envoy 404)")
                    dropped = ("content-type", "user-agent", "te") + (("authorization",) if standin.gate.strips else ())
                    forwarded = [(k, v) for k, v in details.invocation_metadata if not k.startswith(":") and k not in dropped]
                    shadow = dep.mirrored()
                    if shadow is not None:
                        standin._later(standin._grpc_executor(shadow, method, request, forwarded, None))
                    return await standin._grpc_executor(dep.pick(), method, request, forwarded, context)

                return grpc.unary_unary_rpc_method_handler(handle)

        return Handler()

    async def _grpc_executor(self, pred: Predictor, method: str, request: bytes, metadata, context) -> bytes:
        verb = method.removeprefix(SERVICE)
        try:
            if verb in ("ModelReady", "ModelMetadata"):
                msg = (service_pb2.ModelReadyRequest if verb == "ModelReady" else service_pb2.ModelMetadataRequest).FromString(request)
                if msg.name != pred.graph:
                    if context is not None:
                        await context.abort(grpc.StatusCode.UNKNOWN, f"Failed to find model {msg.name}")
                    return b""
            elif verb != "ModelInfer":
                if context is not None:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"executor crashed: panic: Not Implemented ({verb})")
                return b""
            call = pred.channel.unary_unary(method)
            return await call(request, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if context is None:
                return b""
            await context.abort(exc.code(), exc.details() or "")


async def main(config_path: str) -> None:
    config = json.loads(open(config_path).read())
    standin = Standin(config)
    standin.session = ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=60))
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", standin.rest)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", config["http_port"]).start()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    server.add_generic_rpc_handlers((standin.grpc_handler(),))
    server.add_insecure_port(f"127.0.0.1:{config['grpc_port']}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
