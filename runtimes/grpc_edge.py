"""The edge of MLServer 1.7.1's gRPC server: a short road for `ModelInfer`, through MLServer's own data plane.

The counterpart of runtimes/rest.py. MLServer's `ModelInfer` (mlserver/grpc/servicers.py 68-79) turns
each tensor's `raw_input_contents` into Python numbers with a `struct` format built per request, builds
pydantic objects around them, and packs the answer's outputs back with `struct` in the same way
(mlserver/raw.py, grpc/converters.py 149-172 and 369-402). Here raw input tensors are read with one
`numpy.frombuffer` each and raw outputs written with one `tobytes`, and the request, the answer and
every error still pass through what MLServer uses:

- the data plane: `DataPlane.infer`, so model lookup, ids and MLServer's model metrics are its own;
- request headers from the call's metadata, response headers as trailing metadata (servicers.py 118-132);
- errors: `handle_mlserver_error`, so an `MLServerError` is its mapped status code and anything else INTERNAL;
- metrics: the handler is registered under MLServer's own server, inside its interceptors, so
  `grpc_server_started_total`, `grpc_server_handled_total` and `grpc_server_handling_seconds` count it.

What the short road does not read exactly as MLServer would (typed `contents`, BYTES, raw entries that
do not match their inputs one to one, a size that does not add up) is read by MLServer's converter, and
an answer with outputs it does not write (BYTES, NaN, typed contents) is written by MLServer's, so the
client gets MLServer's answer or MLServer's error for it. `MLOPS_GRPC_FAST_PATH=0` turns the short road off.
tests/in_process/test_grpc_fast_path.py sends one request set both ways and requires the same bytes back
and the same metric increments.

Several servers listen on the one gRPC port (`MLOPS_GRPC_LISTENERS`, 16 by default), all on the one
event loop and data plane. grpc.aio takes up a server's calls one at a time: its accept loop asks gRPC
core for the next call only once the event loop has taken the last one (grpc/grpc,
src/python/grpcio/grpc/_cython/_cygrpc/aio/server.pyx.pxi, `AioServer._server_main_loop`, commit
04ce44b). With one server the calls of all connections reached Python one per loop turn and were
predicted one at a time while the loop was busy (runtimes/batching.py had nothing to stack). Each
server here is built as MLServer builds its own (grpc/server.py 71-86: its servicers, interceptors,
options) and binds the port with SO_REUSEPORT (`grpc.so_reuseport`), so the kernel spreads connections
over them and up to one call per server is taken up per turn. Calls multiplexed on one connection
still come one per turn.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc.converters import (
    InferRequestedOutputTensorConverter,
    ModelInferRequestConverter,
    ModelInferResponseConverter,
    ParametersConverter,
    _merge_map,
)
from mlserver.grpc.dataplane_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from mlserver.grpc.model_repository_pb2_grpc import add_ModelRepositoryServiceServicer_to_server
from mlserver.grpc.server import DefaultGrpcWorkers, GRPCServer
from mlserver.grpc.servicers import InferenceServicer
from mlserver.grpc.utils import handle_mlserver_error, to_headers
from mlserver.handlers import DataPlane
from mlserver.types import InferenceRequest, InferenceResponse, RequestInput, TensorData
from mlserver.utils import insert_headers

from .binary import NUMPY
from .contract import GRPC_FAST_PATH as SWITCH
from .contract import GRPC_INFER_METHOD, GRPC_LISTENERS_DEFAULT, GRPC_SERVICE, switched_off
from .contract import GRPC_LISTENERS as LISTENERS
from .signature import datatype_of

logger = logging.getLogger("mlserver.grpc")

SERVICE, METHOD = GRPC_SERVICE, GRPC_INFER_METHOD


def _enabled() -> bool:
    if switched_off(SWITCH):
        logger.info("gRPC inference through MLServer's own servicer (%s=%s)", SWITCH, os.environ[SWITCH])
        return False
    logger.info("gRPC inference fast path on for %s/%s", SERVICE, METHOD)
    return True


def listeners() -> int:
    """How many servers listen on the gRPC port (module docstring)."""
    value = os.environ.get(LISTENERS, str(GRPC_LISTENERS_DEFAULT))
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{LISTENERS}={value!r}: set it to the number of gRPC servers to listen on the port, 1 or more")
    return int(value)


def install(server: GRPCServer) -> None:
    """Answer `ModelInfer` on the short road, on as many servers as `listeners()`, in the gRPC server MLServer
    builds when it starts.

    MLServer builds its `grpc.aio` server in `GRPCServer.start` (grpc/server.py 111-114); this wraps that
    instance's builder, and registers the short road under MLServer's own method name after MLServer's
    servicer: grpcio 1.85 answers a registered method with the handler registered last for it
    (tests/in_process/test_grpc_fast_path.py shows it does). Interceptors apply to it as to any method.
    """
    create = server._create_server
    count = listeners()

    def create_server():
        servers = [create(), *(_twin(server) for _ in range(count - 1))]
        if _enabled():
            infer = ModelInfer(server._data_plane, server._inference_servicer)
            handler = grpc.unary_unary_rpc_method_handler(
                infer, request_deserializer=pb.ModelInferRequest.FromString, response_serializer=pb.ModelInferResponse.SerializeToString
            )
            for aio_server in servers:
                aio_server.add_registered_method_handlers(SERVICE, {METHOD: handler})
        if count > 1:
            logger.info("gRPC: %d servers listening on port %d (%s)", count, server._settings.grpc_port, LISTENERS)
            server._server = Listeners(servers)
        return server._server

    server._create_server = create_server  # this instance only


def _twin(server: GRPCServer) -> grpc.aio.Server:
    """One more server as MLServer builds its own (grpc/server.py 71-86), on the same port.

    Not MLServer's builder again: it makes a new PromServerInterceptor each time, whose metrics the
    Prometheus registry already holds (a second registration is refused)."""
    twin = grpc.aio.server(
        ThreadPoolExecutor(max_workers=DefaultGrpcWorkers),
        interceptors=list(server._interceptors),  # the same instances: one set of grpc_server_* metrics
        options=[*server._get_options(), ("grpc.so_reuseport", 1)],
    )
    add_GRPCInferenceServiceServicer_to_server(server._inference_servicer, twin)
    add_ModelRepositoryServiceServicer_to_server(server._model_repository_servicer, twin)
    twin.add_insecure_port(f"{server._settings.host}:{server._settings.grpc_port}")
    return twin


class Listeners:
    """The servers on the gRPC port as the one server that MLServer's `start` and `stop` (grpc/server.py
    111-126) and the drain (runtimes/drain.py) drive: starting, waiting and stopping reach all of them at once."""

    def __init__(self, servers: list[grpc.aio.Server]):
        self.servers = servers

    async def start(self) -> None:
        await asyncio.gather(*(s.start() for s in self.servers))

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return all(await asyncio.gather(*(s.wait_for_termination(timeout) for s in self.servers)))

    async def stop(self, grace: float | None) -> None:
        await asyncio.gather(*(s.stop(grace) for s in self.servers))


class ModelInfer:
    """`ModelInfer` on the short road (module docstring)."""

    def __init__(self, data_plane: DataPlane, servicer: InferenceServicer):
        self._data_plane = data_plane
        self._servicer = servicer  # MLServer's, for its trailing metadata

    @handle_mlserver_error
    async def __call__(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        payload = read(request)
        if payload is None:
            payload = ModelInferRequestConverter.to_types(request)
        insert_headers(payload, to_headers(context))
        result = await self._data_plane.infer(payload=payload, name=request.model_name, version=request.model_version)
        self._servicer._SetTrailingMetadata(result, context)
        if request.raw_input_contents and (response := write_raw(result)) is not None:
            return response
        return ModelInferResponseConverter.from_types(result, use_raw=bool(request.raw_input_contents))


def read(request: pb.ModelInferRequest) -> InferenceRequest | None:
    """The request as MLServer's converter reads it, for numeric tensors sent as raw_input_contents; else None."""
    raw = request.raw_input_contents
    if not raw or len(raw) != len(request.inputs):
        return None
    inputs = []
    for tensor, blob in zip(request.inputs, raw, strict=True):
        dtype = NUMPY.get(tensor.datatype)
        if dtype is None or tensor.contents.ListFields() or any(d < 0 for d in tensor.shape):
            return None
        if len(blob) != math.prod(tensor.shape) * np.dtype(dtype).itemsize:
            return None  # MLServer's converter names the mismatch (runtimes/mlserver_patches.py)
        values = np.frombuffer(blob, dtype=dtype)
        inputs.append(
            RequestInput.model_construct(
                name=tensor.name,
                shape=list(tensor.shape),
                datatype=tensor.datatype,
                parameters=ParametersConverter.to_types(tensor.parameters),
                data=TensorData(root=values.tolist()),
            )
        )
    payload = InferenceRequest.model_construct(id=request.id, parameters=ParametersConverter.to_types(request.parameters), inputs=inputs)
    if request.outputs:
        payload.outputs = [InferRequestedOutputTensorConverter.to_types(out) for out in request.outputs]
    return payload


def write_raw(result: InferenceResponse) -> pb.ModelInferResponse | None:
    """The answer as MLServer writes it for a raw request, outputs in raw_output_contents; None for outputs it
    writes otherwise (BYTES, NaN, which MLServer's codecs hand over as None, a size unlike the shape)."""
    blobs, tensors = [], []
    for out in result.outputs:
        name = datatype_of(out)
        dtype = NUMPY.get(name)
        if dtype is None:
            return None
        try:
            values = np.asarray(getattr(out.data, "root", out.data), dtype=dtype)
        except (TypeError, ValueError):
            return None
        if values.size != math.prod(out.shape) or (values.dtype.kind == "f" and np.isnan(values).any()):
            return None  # MLServer's packing refuses a size that does not match the shape
        blobs.append(values.tobytes())
        tensor = pb.ModelInferResponse.InferOutputTensor(name=out.name, shape=out.shape, datatype=name, contents=pb.InferTensorContents())
        if out.parameters:
            _merge_map(tensor.parameters, ParametersConverter.from_types(out.parameters))
        tensors.append(tensor)
    response = pb.ModelInferResponse(model_name=result.model_name, outputs=tensors, raw_output_contents=blobs)
    if result.model_version is not None:
        response.model_version = result.model_version
    if result.id is not None:
        response.id = result.id
    if result.parameters:
        _merge_map(response.parameters, ParametersConverter.from_types(result.parameters))
    return response
