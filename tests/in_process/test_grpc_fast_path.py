"""gRPC ModelInfer on the short road (runtimes/grpc_edge.py) answers as MLServer's own servicer does, call for call."""

from __future__ import annotations

import asyncio
import collections
import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import in_registry
from echo import Echo
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc.interceptors import PromServerInterceptor
from mlserver.grpc.server import GRPCServer
from mlserver.handlers import ModelRepositoryHandlers
from mlserver.model import MLModel
from mlserver.repository import SchemalessModelRepository
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceResponse, Parameters, ResponseOutput
from prometheus_client import REGISTRY

from mlops.supervise.processes import free_port
from runtimes import grpc_edge
from runtimes.contract import GRPC_INFER
from runtimes.registry_sklearn import RegistrySKLearnRuntime

LISTENERS = 16  # servers on the short road's port, and connections that call it at once
READ = grpc_edge.read  # the short road's own, whatever a test wraps it in
IRIS, ECHO, FLOATS = "grpc-iris", "grpc-echo", "grpc-floats"  # names of their own in the session's shared registry
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])
Tensor = pb.ModelInferRequest.InferInputTensor


class Floats(MLModel):
    """Answers the first input back, as float32 and as float64 with NaN where it is negative, with output parameters."""

    async def predict(self, payload):
        x = np.asarray(payload.inputs[0].data.root, dtype=np.float64)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                ResponseOutput(name="same", shape=[len(x)], datatype="FP32", data=x.astype(np.float32).tolist(), parameters=Parameters(unit="cm")),
                ResponseOutput(name="nan", shape=[len(x)], datatype="FP64", data=[None if v < 0 else v for v in x]),
            ],
        )


def raw(model: str, array: np.ndarray, datatype: str = "FP64", **fields) -> pb.ModelInferRequest:
    """A request as tritonclient's gRPC client builds it: every input in raw_input_contents."""
    dtype = {"FP64": "<f8", "FP32": "<f4", "INT64": "<i8", "FP16": "<f2"}[datatype]
    tensor = Tensor(name="input-0", datatype=datatype, shape=list(array.shape))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[array.astype(dtype).tobytes()], **fields)


def typed(model: str, array: np.ndarray) -> pb.ModelInferRequest:
    tensor = Tensor(name="input-0", datatype="FP64", shape=list(array.shape), contents=pb.InferTensorContents(fp64_contents=array.ravel()))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor])


def proba_outputs():
    return [pb.ModelInferRequest.InferRequestedOutputTensor(name="predict_proba")]


CASES = {  # name: (request, metadata, taken by the short road's reader)
    "prediction": (raw(IRIS, ROWS[:1]), (), True),
    "two rows, own id, probabilities": (raw(IRIS, ROWS, id="r-1", outputs=proba_outputs()), (), True),
    "versioned": (raw(IRIS, ROWS[:1], model_version="1"), (), True),
    "float32 input": (raw(IRIS, ROWS, "FP32"), (), True),
    "float16 input": (raw(IRIS, ROWS, "FP16"), (), True),
    "integer input": (raw(IRIS, np.array([[5, 3, 1, 0]]), "INT64"), (), True),
    "request parameters": (raw(IRIS, ROWS[:1], parameters={"routing_key": pb.InferParameter(string_param="user-7")}), (), True),
    "typed contents": (typed(IRIS, ROWS), (), False),
    "headers both ways, BYTES output": (raw(ECHO, ROWS[:1]), (("x-test", "first"),), True),
    "float32 output, NaN output, output parameters": (raw(FLOATS, np.array([1.5, -2.0, 3.25])), (), True),
    "unknown model": (raw("nope", ROWS[:1]), (), True),
    "unknown version": (raw(IRIS, ROWS[:1], model_version="9"), (), True),
    "wrong feature count": (raw(IRIS, np.array([[1.0, 2.0, 3.0]])), (), True),
    "model refuses": (raw(ECHO, ROWS[:1]), (("x-fail", "why"),), True),
    "a bug in a model": (raw(ECHO, ROWS[:1]), (("x-crash", "1"),), True),
    "raw size unlike the shape": (
        pb.ModelInferRequest(model_name=IRIS, inputs=[Tensor(name="input-0", datatype="FP64", shape=[1, 4])], raw_input_contents=[b"\0" * 24]),
        (),
        False,
    ),
    "more raw entries than inputs": (
        pb.ModelInferRequest(model_name=IRIS, inputs=[Tensor(name="input-0", datatype="FP64", shape=[1, 4])], raw_input_contents=[ROWS[0].tobytes()] * 2),
        (),
        False,
    ),
}


class Served:
    """One MLServer gRPC server (mlserver/grpc/server.py) built as `GRPCServer.start` builds it, started on `loop`.

    MLServer's PromServerInterceptor registers the grpc_server_* metrics in the default Prometheus registry,
    which holds each name once per process: each server's own collectors are read here, and taken out of
    the registry once built, so the next server can register its own.
    """

    def __init__(self, loop, server: GRPCServer):
        self.loop, self.port = loop, server._settings.grpc_port
        self.aio = loop.run_until_complete(_built(server))
        prom = next(i for i in server._interceptors if isinstance(i, PromServerInterceptor))._interceptor
        self.collectors = [*prom._metrics.values(), prom._grpc_server_handled_total_counter]
        for collector in self.collectors:
            REGISTRY.unregister(collector)
        loop.run_until_complete(self.aio.start())

    def counts(self) -> dict[tuple, float]:
        return {(s.name, *sorted(s.labels.items())): s.value for c in self.collectors for m in c.collect() for s in m.samples if s.name in COUNTED}

    def calls(self, requests: list[tuple[pb.ModelInferRequest, tuple]]) -> list[tuple]:
        """(status code, details, response bytes, trailing metadata) for each request, and the metric increments."""

        async def run():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                # the answer's bytes, as they left the server
                infer = channel.unary_unary(GRPC_INFER, request_serializer=pb.ModelInferRequest.SerializeToString)
                got = []
                for request, metadata in requests:
                    call = infer(request, metadata=metadata)
                    try:
                        body = await call
                    except grpc.aio.AioRpcError:
                        body = None
                    got.append((await call.code(), await call.details(), body, tuple(await call.trailing_metadata())))
                return got

        before = self.counts()
        got = self.loop.run_until_complete(run())
        after = self.counts()
        return got, {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


async def _built(server: GRPCServer):
    return server._create_server()  # grpc.aio binds a server to the loop it is built on


COUNTED = ("grpc_server_started_total", "grpc_server_handled_total", "grpc_server_handling_seconds_count")


@pytest.fixture(scope="module")
def servers(trained, mlserver_data_plane):
    """Over one data plane: MLServer's gRPC server as `mlserver start` builds it, the same with the short road,
    and the same with the short road switched off."""
    uri = in_registry(trained, "print(client.get_model_version_download_uri('iris', '1'))")
    settings, data_plane, registry = mlserver_data_plane
    loop = asyncio.new_event_loop()
    loop.run_until_complete(registry.load(ModelSettings(name=ECHO, implementation=Echo)))
    loop.run_until_complete(registry.load(ModelSettings(name=FLOATS, implementation=Floats)))
    iris = ModelSettings(name=IRIS, implementation=RegistrySKLearnRuntime, parameters=ModelParameters(uri=uri, version="1"))
    loop.run_until_complete(registry.load(iris))
    handlers = ModelRepositoryHandlers(repository=SchemalessModelRepository(""), model_registry=registry)
    built = {}
    for kind in ("mlserver", "short road", "switched off", "one listener"):
        server = GRPCServer(settings.model_copy(update={"host": "127.0.0.1", "grpc_port": free_port()}), data_plane, handlers)
        os.environ[grpc_edge.SWITCH] = "0" if kind == "switched off" else "1"
        os.environ[grpc_edge.LISTENERS] = "1" if kind == "one listener" else str(LISTENERS)
        try:
            if kind != "mlserver":
                grpc_edge.install(server)
            built[kind] = Served(loop, server)
        finally:
            del os.environ[grpc_edge.SWITCH], os.environ[grpc_edge.LISTENERS]
    yield built
    for served in built.values():
        loop.run_until_complete(served.aio.stop(None))
    loop.close()


@pytest.mark.parametrize("case", CASES)
def test_short_road_answers_and_counts_as_mlserver_does(servers, case, monkeypatch):
    request, metadata, read_here = CASES[case]
    taken = []
    monkeypatch.setattr(grpc_edge, "read", lambda r, _read=grpc_edge.read: taken.append(_read(r) is not None) or _read(r))

    (expected,), counted_full = servers["mlserver"].calls([(request, metadata)])
    assert not taken, "MLServer's own server must not reach the short road"
    (got,), counted_fast = servers["short road"].calls([(request, metadata)])

    assert got == expected
    assert counted_fast == counted_full and "grpc_server_started_total" in {k[0] for k in counted_fast}
    assert taken == [read_here], "the short road must answer the call, reading itself what it can read as MLServer does"


def test_answers_are_right_not_only_alike(servers):
    """The same bytes both ways would also pass if both were wrong: the predictions are iris's."""
    (ok, bad), _ = servers["short road"].calls([(raw(IRIS, ROWS, id="r-2"), ()), (raw(IRIS, np.array([[1.0, 2.0, 3.0]])), ())])
    assert ok[0] == grpc.StatusCode.OK
    response = pb.ModelInferResponse.FromString(ok[2])
    assert response.id == "r-2" and response.model_name == IRIS
    assert np.frombuffer(response.raw_output_contents[0], dtype="<i8").tolist() == [0, 2]
    assert bad[0] == grpc.StatusCode.INVALID_ARGUMENT and "has 3 features per row, the model expects 4" in bad[1]


def test_switched_off_it_is_mlservers_own_servicer(servers, monkeypatch):
    taken = []
    monkeypatch.setattr(grpc_edge, "read", lambda r: taken.append(r))
    (answer,), _ = servers["switched off"].calls([(raw(IRIS, ROWS[:1]), ())])
    assert answer[0] == grpc.StatusCode.OK and not taken


def taken_up_per_turn(served: Served, connections: int, monkeypatch) -> list[int]:
    """How many calls, sent at once on as many connections while the event loop was busy, reached the short
    road in each loop turn once it was free."""
    turns, entered = [0], []
    monkeypatch.setattr(grpc_edge, "read", lambda r: entered.append(turns[0]) or READ(r))
    channels = [grpc.insecure_channel(f"127.0.0.1:{served.port}", options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(connections)]
    for channel in channels:  # a connection of its own each
        grpc.channel_ready_future(channel).result(timeout=10)
    infer = [
        c.unary_unary(GRPC_INFER, request_serializer=pb.ModelInferRequest.SerializeToString, response_deserializer=pb.ModelInferResponse.FromString)
        for c in channels
    ]

    async def burst():
        loop = asyncio.get_running_loop()

        def tick():
            turns[0] += 1
            ticking[0] = loop.call_soon(tick)

        ticking = [loop.call_soon(tick)]
        with ThreadPoolExecutor(connections) as pool:
            sent = [loop.run_in_executor(pool, call, raw(IRIS, ROWS[:1])) for call in infer]
            time.sleep(0.5)  # the loop is busy while the calls reach gRPC core
            answers = await asyncio.gather(*sent)
        ticking[0].cancel()
        return answers

    try:
        answers = served.loop.run_until_complete(burst())
    finally:
        for channel in channels:
            channel.close()
    assert [np.frombuffer(a.raw_output_contents[0], dtype="<i8").tolist() for a in answers] == [[0]] * connections
    return list(collections.Counter(entered).values())


def test_calls_from_many_connections_are_taken_up_together(servers, monkeypatch):
    """grpc.aio hands a server's calls over one at a time (runtimes/grpc_edge.py): with one server on the port,
    calls sent together reach the data plane about one per loop turn; with one server per connection or so,
    most of them in the first turn. (A call can catch up with the one before it, hence not 1 against 16.)"""
    one = taken_up_per_turn(servers["one listener"], LISTENERS, monkeypatch)
    several = taken_up_per_turn(servers["short road"], LISTENERS, monkeypatch)
    assert sum(one) == sum(several) == LISTENERS
    assert max(several) >= max(one) + 3, (one, several)  # measured: 1 or 2 in a turn, against 8 to 12


@pytest.mark.parametrize("value", ["0", "two", "-1", ""])
def test_a_listener_count_that_is_not_a_number_of_servers_is_refused_by_name(value, monkeypatch):
    monkeypatch.setenv(grpc_edge.LISTENERS, value)
    with pytest.raises(ValueError, match=f"{grpc_edge.LISTENERS}={value!r}: set it to the number of gRPC servers"):
        grpc_edge.listeners()
