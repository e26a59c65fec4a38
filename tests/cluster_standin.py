"""A stand-in for the cluster's ingress path: Istio's ingress gateway plus each predictor's Seldon executor.

Neither Istio nor Seldon's Go executor can run here, so this process reproduces what they do with a
request on its way to the real MLServer pods (`tests/cluster.py` starts those as the operator would
run them). It is configured from `mlops.check.cluster.derive()` of the generated manifests, nothing else.

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
  the body to `/v2/models/<name>/infer` on the model; `GET /v2/models/{name}/ready` and
  `GET /v2/models/{name}` only for the graph node's name (else 500 "Failed to find model"); `GET
  /v2/health/ready` as a TCP check of the model's port; anything else 404 "404 page not found" (gorilla
  mux's; there is no V2 feedback route: `/v2/models/{name}/feedback` is such a 404). Headers pass on but
  Content-Type, which it sets from the request. The answer keeps the model's status and body, HTML-escaped
  (json.HTMLEscape, api/rest/client.go 67-89), and of its headers only Content-Type, on a 200 alone
  (server.go 80-117; on an error Go's http sniffs the body instead).
- Before forwarding an inference body it chains it for the graph's MODEL node (predictor_process.go
  95-113 calls api/rest/kfserving.go 10-36 through client.go 343-353): the body (gunzipped if
  Content-Encoding says gzip) must be JSON (json.Unmarshal: one value, nothing after it but white space)
  and an object: one with `inputs` goes on unchanged, request `parameters` included; one with only
  `outputs` goes on re-encoded with `outputs` renamed `inputs`; anything else is a 500 whose body is a
  SeldonMessage status naming Go's error (server.go 94-116, client.go 53-65), e.g. tritonclient's
  binary tensor data after the JSON header, "invalid character '\\x00' after top-level value"
  (SeldonIO/seldon-core#3969). JSON that is not an object panics the handler (`m :=
  f.(map[string]interface{})`): Go's http recovers and closes the connection unanswered. Go's words are
  reproduced for trailing data and an empty body; other syntax errors get the same form, naming the byte.
- gRPC: ModelInfer forwards the request message as it is, model_name and request `parameters`
  included (api/grpc/kfserving/server.go 76-88, client.go 71-90; the executor's ModelInferRequest
  declares `parameters`, grpc_service.proto 633, and Go's protobuf keeps fields it does not know, such as
  MLServer's double_param); ModelReady and ModelMetadata only for the graph
  node's name (else UNKNOWN "Failed to find model"); ServerLive, ServerReady, ServerMetadata and the
  rest panic "Not Implemented", and with no recovery interceptor (api/grpc/server.go 57-61) the panic
  ends the executor: the caller's connection drops (UNAVAILABLE here).

Istio 1.26.8 security at the gateway, from the RequestAuthentications and AuthorizationPolicies that
select it (mlops.check.cluster.Access, which also holds the policy semantics `mlops validate` checks with):
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
import gzip
import json
import random
import re
import sys

import grpc
import jwt
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from tritonclient.grpc import service_pb2

from mlops.check.cluster import Access, Request
from mlops.render.seldon import GRPC_PATHS

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


class Panic(Exception):
    """The executor's handler panicked: Go's http recovers, logs and closes the connection unanswered."""


class Refused(Exception):
    """The executor answers a 500 with this error before calling the model."""


def _go_quote_char(c: int) -> str:
    """encoding/json's quoteChar: the byte its syntax errors name."""
    if c in (0x27, 0x22):
        return "'\\''" if c == 0x27 else "'\"'"
    special = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r", 0x5C: "\\\\"}
    if c in special:
        return f"'{special[c]}'"
    if chr(c).isprintable():
        return f"'{chr(c)}'"
    return f"'\\x{c:02x}'" if c < 0x80 else f"'\\u{c:04x}'"


def chain_kfserving(body: bytes, encoding: str | None) -> bytes:
    """What api/rest/kfserving.go 10-36 makes of a REST V2 body before the model gets it; raises Refused
    (a 500) or Panic as the executor fails."""
    try:
        data = gzip.decompress(body) if encoding == "gzip" else body
    except (OSError, EOFError):
        raise Refused("gzip: invalid header") from None
    text = data.decode("utf-8", errors="surrogateescape")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        raise Refused("unexpected end of JSON input")
    try:
        value, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text):
            raise Refused("unexpected end of JSON input") from None
        bad = text[exc.pos].encode("utf-8", errors="surrogateescape")[0]
        raise Refused(f"invalid character {_go_quote_char(bad)} looking for beginning of value") from None
    rest = text[end:]
    if rest.strip(" \t\r\n"):
        after = rest[len(rest) - len(rest.lstrip(" \t\r\n")) :]
        raise Refused(f"invalid character {_go_quote_char(after[0].encode('utf-8', errors='surrogateescape')[0])} after top-level value")
    if not isinstance(value, dict):
        raise Panic(f"interface conversion: interface {{}} is {type(value).__name__}, not map[string]interface {{}}")
    if "inputs" in value:
        return body
    if "outputs" in value:
        value["inputs"] = value.pop("outputs")
        return _html_escape(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())  # json.Marshal
    raise Refused("Failed to convert kfserving response so it could be chained to new input")


def _seldon_error(message: str) -> web.Response:
    """respondWithError with no payload: a SeldonMessage status, HTML-escaped, Content-Type sniffed."""
    status = {"status": {"code": 500, "info": message, "status": "FAILURE"}}
    return web.Response(status=500, body=_html_escape(json.dumps(status, separators=(",", ":")).encode()), headers={"Content-Type": SNIFFED})


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
            self._later(self._mirror(shadow, request.method, path, {**headers, "Host": f"{request.host}-shadow"}, body))
        try:
            return await self._executor(dep.pick(), request.method, path, headers, body)
        except Panic:
            if request.transport is not None:
                request.transport.close()
            raise

    async def _mirror(self, pred: Predictor, method: str, path: str, headers: dict, body: bytes) -> None:
        """Istio's mirrored copy: its answer, or the executor failing on it, reaches no one."""
        try:
            await self._executor(pred, method, path, headers, body)
        except Panic:
            pass

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
        try:
            body = chain_kfserving(body, headers.get("Content-Encoding"))
        except Refused as exc:
            return _seldon_error(str(exc))
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
        verb = method.removeprefix(GRPC_PATHS)
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
