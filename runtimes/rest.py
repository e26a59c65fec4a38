"""A short road for V2 REST inference, through MLServer 1.7.1's own data plane.

Before it reached a model, each REST inference crossed Starlette's error middleware,
starlette_exporter's Prometheus middleware, Starlette's routing, FastAPI's dependency solving and a
second validation of the response: about a third of the server's CPU (py-spy, README
"Performance"). `POST /v2/models/{name}[/versions/{version}]/infer` now goes from uvicorn straight
to MLServer's `DataPlane.infer`, keeping what a client and an SRE see:

- the request: parsed as MLServer parses it (orjson, then `InferenceRequest`), HTTP headers inserted as it does;
- the answer: the response serialised as FastAPI serialises it, with the headers the data plane sets;
- errors: `{"error": ...}` with the `MLServerError`'s status; anything else is uvicorn's 500;
- metrics: `rest_server_requests_total`, `rest_server_request_duration_seconds` and
  `rest_server_requests_in_progress`, same names and labels as starlette_exporter's.

It also takes what MLServer 1.7.1 cannot: the binary tensor data extension (runtimes/binary.py),
which tritonclient uses by default, and a V2 JSON body sent as curl's default form type (read as
JSON, or a 400 that says to set the header, instead of FastAPI's dump about dictionaries).

Any other request this path cannot take exactly as MLServer would (a JSON body that does not parse
as an `InferenceRequest`, another content type or encoding, a root path) goes through MLServer's
app, so its answer, including FastAPI's 422 detail, is MLServer's own. So does every request when the server
adds middleware this path does not reproduce (GZip, CORS, tracing), or when
MLOPS_REST_FAST_PATH=0.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time

import orjson
from fastapi import FastAPI
from mlserver.codecs.json import encode_to_json_bytes
from mlserver.errors import MLServerError
from mlserver.rest.endpoints import Endpoints
from mlserver.types import InferenceRequest
from mlserver.utils import extract_headers, insert_headers
from pydantic import ValidationError
from starlette_exporter import PrometheusMiddleware

from . import binary

logger = logging.getLogger("mlserver.rest")

SWITCH = "MLOPS_REST_FAST_PATH"
INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
ROUTES = ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer")
FORM = "application/x-www-form-urlencoded"
_ATTR = "_mlops_fast_infer"  # per app: the FastInfer, or False where MLServer's stack must answer
_closing = False  # set for good by close_connections(): every answer from then on closes its connection


class FastInfer:
    def __init__(self, data_plane, exporter: PrometheusMiddleware | None, mlserver_app):
        self._data_plane = data_plane
        self._exporter = exporter
        self._mlserver_app = mlserver_app  # what answers the requests this path hands back
        self._in_progress = exporter.requests_in_progress.labels("POST", exporter.app_name) if exporter else None
        self._children: dict[tuple[str, int], tuple] = {}  # (route, status) -> labelled counter, histogram
        # Behind Seldon's executor (the operator sets SELDON_EXECUTOR_ENABLED) binary outputs would not reach the
        # client: it passes on no response header but Content-Type and HTML-escapes the body (seldon-core
        # v1.18.2 executor/api/rest/server.go 80-92, client.go 67-89). JSON outputs do, and tritonclient reads them.
        self._binary_outputs = os.environ.get("SELDON_EXECUTOR_ENABLED", "").lower() != "true"

    @classmethod
    def of(cls, app: FastAPI, mlserver_app) -> FastInfer | None:
        """The fast path for MLServer's REST app; None for another app or one whose stack it cannot reproduce."""
        endpoints = (getattr(r, "endpoint", None) for r in app.router.routes)
        endpoint = next((e for e in endpoints if getattr(e, "__func__", None) is Endpoints.infer), None)
        if endpoint is None:
            return None
        if os.environ.get(SWITCH, "1").lower() in ("0", "false", "off"):
            logger.info("REST inference through MLServer's full stack (%s=%s)", SWITCH, os.environ[SWITCH])
            return None
        exporter = None
        for middleware in app.user_middleware:
            if middleware.cls is not PrometheusMiddleware:
                logger.info("REST inference through MLServer's full stack: %s is configured", getattr(middleware.cls, "__name__", middleware.cls))
                return None
            exporter = PrometheusMiddleware(app, **middleware.kwargs)  # type: ignore[arg-type]  # starlette keeps them as **kwargs
        logger.info("REST inference fast path on for POST /v2/models/*/infer")
        return cls(endpoint.__self__._data_plane, exporter, mlserver_app)

    async def __call__(self, scope, receive, send, match: re.Match, headers: dict[str, str]) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        refused = None  # a 400 this path answers itself: MLServer's app could not read the body at all
        binary_outputs: set[str] | bool = False
        try:  # as MLServer reads it: orjson (no NaN, no 1e999), then the model from Python objects
            if (length := headers.get(binary.HEADER)) is not None:
                request = binary.read_request(body, length)
            else:
                request = orjson.loads(body)
            payload = InferenceRequest.model_validate(request)
            binary_outputs = binary.wanted(request) if self._binary_outputs else False
        except binary.BinaryError as exc:
            refused = f"binary tensor data: {exc}"
        except (orjson.JSONDecodeError, ValidationError) as exc:
            if binary.HEADER in headers:
                refused = f"not a V2 inference request: {str(exc).splitlines()[0]}"
            elif _media(headers) == FORM:
                refused = "the body is not a V2 JSON inference request; send it with Content-Type: application/json"
            else:
                return await self._mlserver_app(scope, _replay(body, receive), send)

        name, version = match.groups()
        start = time.perf_counter()
        status = 500
        if self._in_progress:
            self._in_progress.inc()
        try:
            extra = None
            raw = [(b"content-type", b"application/json")]
            if refused is not None:
                content, status = encode_to_json_bytes({"error": refused}), 400
            else:
                insert_headers(payload, headers)
                try:
                    response = await self._data_plane.infer(payload, name, version)
                    extra = extract_headers(response)
                    answer = response.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True)
                    if binary_outputs:
                        content, header_length = binary.write_response(answer, binary_outputs)
                        if header_length is not None:
                            raw = [(b"content-type", b"application/octet-stream"), (binary.HEADER.encode(), str(header_length).encode())]
                    else:
                        content = encode_to_json_bytes(answer)
                    status = 200
                except MLServerError as exc:
                    content = encode_to_json_bytes({"error": str(exc)})
                    status = exc.status_code
            raw.append((b"content-length", str(len(content)).encode()))
            if extra:
                raw += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in extra.items()]
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": content})
        finally:
            if self._in_progress:
                self._in_progress.dec()
                self._observe(ROUTES[version is not None], status, time.perf_counter() - start)

    def _observe(self, route: str, status: int, seconds: float) -> None:
        assert self._exporter is not None  # called only where requests are counted
        children = self._children.get((route, status))
        if children is None:
            labels = ("POST", route, str(status), self._exporter.app_name)
            children = self._children[(route, status)] = (
                self._exporter.request_count.labels(*labels),
                self._exporter.request_time.labels(*labels),
            )
        children[0].inc()
        children[1].observe(seconds)


def _replay(body: bytes, receive):
    """The request as MLServer's app would have read it: the body once, then the connection's own events."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def _takes(scope) -> tuple[re.Match, dict[str, str]] | None:
    """The route match and the request headers (as MLServer passes them on) of a request this path answers."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
        return None
    match = INFER.fullmatch(scope["path"])
    if match is None:
        return None
    headers: dict[str, str] = {}
    for k, v in scope["headers"]:  # as dict(starlette Headers): the first of repeated names
        headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
    if "content-encoding" in headers:
        return None
    media = _media(headers)
    # JSON; curl's default form type (a V2 body sent without -H 'Content-Type: application/json'),
    # which MLServer would answer with FastAPI's dump about dictionaries; binary tensor data, whatever type it names.
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json")) or media == FORM or binary.HEADER in headers):
        return None
    return match, headers


def _media(headers: dict[str, str]) -> str:
    return headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()


def close_connections() -> None:
    """From now on each answer says `Connection: close`, and uvicorn closes the connection after it
    (the drain, runtimes/drain.py): a client learns before its next request that it must reconnect."""
    global _closing
    _closing = True


def _closing_send(send):
    async def closing(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
        await send(message)

    return closing


def apply() -> None:
    """Route MLServer's REST inference through FastInfer; other apps and paths are untouched."""
    original = FastAPI.__call__
    if getattr(original, "mlops_patched", False):
        return

    async def call(self, scope, receive, send):
        if _closing and scope["type"] == "http":
            send = _closing_send(send)
        fast = self.__dict__.get(_ATTR)
        if fast is None:
            fast = self.__dict__[_ATTR] = FastInfer.of(self, functools.partial(original, self)) or False
        if fast and (taken := _takes(scope)):
            return await fast(scope, receive, send, *taken)
        return await original(self, scope, receive, send)

    call.mlops_patched = True  # type: ignore[attr-defined]
    FastAPI.__call__ = call  # type: ignore[method-assign]
