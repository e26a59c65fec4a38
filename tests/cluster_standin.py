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

Run: python cluster_standin.py CONFIG.json; prints "ready" once both ports listen.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys

import grpc
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from tritonclient.grpc import service_pb2

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


class Standin:
    def __init__(self, config: dict):
        self.deployments = [Deployment(d) for d in config["deployments"] if d.get("gateway_ok")]
        self.session: ClientSession | None = None
        self.background: set[asyncio.Task] = set()

    def _later(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # --- REST --------------------------------------------------------------------------------------

    async def rest(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        dep = next((d for d in self.deployments if path.startswith(d.prefix)), None)
        if dep is None:
            return web.Response(status=404)  # Envoy: no route
        path = "/" + path[len(dep.prefix):]
        body = await request.read()
        shadow = dep.mirrored()
        if shadow is not None:
            headers = dict(request.headers)
            headers["Host"] = f"{request.host}-shadow"
            self._later(self._executor(shadow, request.method, path, headers, body))
        return await self._executor(dep.pick(), request.method, path, dict(request.headers), body)

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
                    if dep is None:
                        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no route (Envoy 404)")
                    forwarded = [(k, v) for k, v in details.invocation_metadata if not k.startswith(":") and k not in ("content-type", "user-agent", "te")]
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
