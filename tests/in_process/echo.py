"""A model that shows what reached it, for the tests that compare the edges with MLServer's own roads."""

from __future__ import annotations

from mlserver.errors import InferenceError
from mlserver.model import MLModel
from mlserver.types import InferenceResponse, Parameters, ResponseOutput


class Echo(MLModel):
    """A request header comes back as a response header and as a BYTES output; `x-fail` is a client error, `x-crash` a bug."""

    async def predict(self, payload):
        headers = payload.parameters.headers or {}
        if "x-fail" in headers:
            raise InferenceError(f"asked to fail: {headers['x-fail']}")
        if "x-crash" in headers:
            raise RuntimeError("a bug")
        return InferenceResponse(
            model_name=self.name,
            outputs=[ResponseOutput(name="echo", shape=[1], datatype="BYTES", data=[headers.get("x-test", "")])],
            parameters=Parameters(headers={"x-echo": headers.get("x-test", "")}),
        )
