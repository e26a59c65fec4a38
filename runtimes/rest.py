"""The edge of MLServer 1.7.1's REST app: a short road for V2 inference, through MLServer's own data plane.

`Edge` wraps the app instance MLServer builds (runtimes/server.py); uvicorn serves the wrapper, and
every other app in the process is left alone.

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

The edge answers feedback, `POST /v2/models/{name}/feedback` (runtimes/feedback.py), and takes what
MLServer 1.7.1 cannot, with or without the short road: the binary tensor
data extension (runtimes/binary.py), which tritonclient uses by default, and a V2 JSON body sent as
curl's default form type (read as JSON, or a 400 that says to set the header, instead of FastAPI's
dump about dictionaries). Without the short road such a request reaches MLServer's app as the JSON
request it carries, and is answered in JSON, which tritonclient reads as well.

Any other request the short road cannot take exactly as MLServer would (a JSON body that does not parse
as an `InferenceRequest`, another content type or encoding, a root path) goes through MLServer's
app, so its answer, including FastAPI's 422 detail, is MLServer's own. So does every request when the server
adds middleware the short road does not reproduce (GZip, CORS, tracing), or when MLOPS_REST_FAST_PATH=0.
"""

from __future__ import annotations

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

from . import binary, feedback
from .contract import REST_FAST_PATH as SWITCH
from .contract import switched_off

logger = logging.getLogger("mlserver.rest")

INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
ROUTES = ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer")
FEEDBACK = re.compile(r"/v2/models/([^/]+)/feedback")
FEEDBACK_ROUTE = "/v2/models/{model_name}/feedback"
FORM = "application/x-www-form-urlencoded"
_closing = False  # set for good by close_connections(): every answer from then on closes its connection


class Counted:
    """starlette_exporter's REST metrics, as MLServer's middleware labels them, for answers given here."""

    def __init__(self, exporter: PrometheusMiddleware):
        self._exporter = exporter
        self.in_progress = exporter.requests_in_progress.labels("POST", exporter.app_name)
        self._children: dict[tuple[str, int], tuple] = {}  # (route, status) -> labelled counter, histogram

    @classmethod
    def of(cls, app: FastAPI) -> Counted | None:
        for middleware in app.user_middleware:
            if middleware.cls is PrometheusMiddleware:
                return cls(PrometheusMiddleware(app, **middleware.kwargs))  # type: ignore[arg-type]  # starlette keeps them as **kwargs
        return None

    def observe(self, route: str, status: int, seconds: float) -> None:
        children = self._children.get((route, status))
        if children is None:
            labels = ("POST", route, str(status), self._exporter.app_name)
            children = self._children[(route, status)] = (
                self._exporter.request_count.labels(*labels),
                self._exporter.request_time.labels(*labels),
            )
        children[0].inc()
        children[1].observe(seconds)


def _data_plane(app: FastAPI):
    """The data plane behind MLServer's REST app; None for another app."""
    endpoints = (getattr(r, "endpoint", None) for r in app.router.routes)
    endpoint = next((e for e in endpoints if getattr(e, "__func__", None) is Endpoints.infer), None)
    return endpoint.__self__._data_plane if endpoint is not None else None


def _short_road(app: FastAPI) -> bool:
    """Whether the short road can answer as MLServer's stack would."""
    if switched_off(SWITCH):
        logger.info("REST inference through MLServer's full stack (%s=%s)", SWITCH, os.environ[SWITCH])
        return False
    for middleware in app.user_middleware:
        if middleware.cls is not PrometheusMiddleware:
            logger.info("REST inference through MLServer's full stack: %s is configured", getattr(middleware.cls, "__name__", middleware.cls))
            return False
    logger.info("REST inference fast path on for POST /v2/models/*/infer")
    return True


class Edge:
    """What uvicorn serves in place of MLServer's REST app instance, which it wraps (module docstring).

    Attributes it does not have are the app's: MLServer adds and removes custom handlers' routes on it.
    """

    def __init__(self, app: FastAPI):
        self.app = app
        self._plane = _data_plane(app)
        self._data_plane = self._plane if self._plane is not None and _short_road(app) else None  # the short road's
        self._counted = Counted.of(app)
        # Behind Seldon's executor (the operator sets SELDON_EXECUTOR_ENABLED) binary outputs would not reach the
        # client: it passes on no response header but Content-Type and HTML-escapes the body (seldon-core
        # v1.18.2 executor/api/rest/server.go 80-92, client.go 67-89). JSON outputs do, and tritonclient reads them.
        self._binary_outputs = os.environ.get("SELDON_EXECUTOR_ENABLED", "").lower() != "true"

    @property
    def fast(self) -> bool:
        return self._data_plane is not None

    def __getattr__(self, name: str):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if _closing and scope["type"] == "http":
            send = _closing_send(send)
        if self._plane is not None and (model := _feedback_for(scope)) is not None:
            return await self._feedback(model, receive, send)
        taken = _takes(scope)
        if taken is None or (self._data_plane is None and not _translated(taken[1])):
            return await self.app(scope, receive, send)
        match, headers = taken
        body = await _body(receive)
        if body is None:
            return
        refused = None  # a 400 given here: MLServer's app could not read the body at all
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
                return await self.app(scope, _replay(body, receive), send)
        if refused is None and self._data_plane is None:  # the JSON request it carries, to MLServer's own stack
            json_body = orjson.dumps(request)
            return await self.app(_as_json(scope, len(json_body)), _replay(json_body, receive), send)

        name, version = match.groups()
        start = time.perf_counter()
        status = 500
        counted = self._counted
        if counted:
            counted.in_progress.inc()
        try:
            extra = None
            raw = [(b"content-type", b"application/json")]
            if refused is not None:
                content, status = encode_to_json_bytes({"error": refused}), 400
            else:
                assert self._data_plane is not None  # taken above otherwise
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
            if counted:
                counted.in_progress.dec()
                counted.observe(ROUTES[version is not None], status, time.perf_counter() - start)

    async def _feedback(self, model_name: str, receive, send) -> None:
        """`POST /v2/models/{model}/feedback` (runtimes/feedback.py): `{"recorded": N}`, or an error naming the field."""
        body = await _body(receive)
        if body is None:
            return
        start = time.perf_counter()
        try:
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise feedback.FeedbackError(f"the body is not JSON: {exc}") from None
            fb = feedback.Feedback.read(data)
            model = await self._plane._model_registry.get_model(model_name)
            record = getattr(model, "record_feedback", None)
            if record is None:
                raise feedback.FeedbackError(f"model '{model_name}' takes no feedback: its runtime is not one of this project's", 404)
            content, status = encode_to_json_bytes({"recorded": record(fb), **({"id": fb.id} if fb.id is not None else {})}), 200
        except MLServerError as exc:
            content, status = encode_to_json_bytes({"error": str(exc)}), exc.status_code
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        if self._counted:
            self._counted.observe(FEEDBACK_ROUTE, status, time.perf_counter() - start)


def _feedback_for(scope) -> str | None:
    """The model a feedback request names; None for any other request."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
        return None
    match = FEEDBACK.fullmatch(scope["path"])
    return match.group(1) if match else None


async def _body(receive) -> bytes | None:
    """The whole request body; None if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _translated(headers: dict[str, str]) -> bool:
    """A request MLServer's app cannot read as sent: binary tensor data, or JSON sent as a form."""
    return binary.HEADER in headers or _media(headers) == FORM


def _as_json(scope, length: int):
    """The request's scope with the headers of the JSON body it now carries."""
    dropped = (b"content-type", b"content-length", binary.HEADER.encode())
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in dropped]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json"), (b"content-length", str(length).encode())]}


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
