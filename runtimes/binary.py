"""The binary tensor data extension of V2 REST, as Triton and KServe implement it.

A request whose `Inference-Header-Content-Length: N` header is set carries N bytes of JSON, then the
raw data of each input whose `parameters.binary_data_size` says so, in input order: numbers
little-endian in row-major order, BYTES as 4-byte little-endian lengths each followed by the
element's bytes. An answer holds outputs in the same form when the request asks for them with
`parameters.binary_data_output: true` or an output's `parameters.binary_data: true` (tritonclient's
defaults), and then carries the same header. Anything that does not add up is a BinaryError (400).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import orjson

HEADER = "inference-header-content-length"
NUMPY = {
    "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
    "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip


class BinaryError(ValueError):
    """The request's binary parts do not match its header; the message says where."""


def _strings(raw: bytes, name: str) -> list[str]:
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BinaryError(f"input '{name}': BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise BinaryError(f"input '{name}': a BYTES element of {size} bytes runs past binary_data_size")
        try:
            out.append(raw[offset : offset + size].decode())
        except UnicodeDecodeError:
            raise BinaryError(f"input '{name}': a BYTES element is not UTF-8 text") from None
        offset += size
    return out


def read_request(body: bytes, header_length: str) -> dict:
    """The V2 JSON request, with each binary input's data decoded into its `data`."""
    try:
        n = int(header_length)
    except ValueError:
        raise BinaryError(f"Inference-Header-Content-Length '{header_length}' is not a number of bytes") from None
    if not 0 < n <= len(body):
        raise BinaryError(f"Inference-Header-Content-Length is {n}, the body has {len(body)} bytes")
    try:
        request = orjson.loads(body[:n])
    except orjson.JSONDecodeError as exc:
        raise BinaryError(f"the first {n} bytes (Inference-Header-Content-Length) are not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BinaryError("the JSON header must be a V2 inference request with an 'inputs' list")
    offset = n
    for inp in request["inputs"]:
        params = inp.get("parameters") if isinstance(inp, dict) else None
        size = params.pop("binary_data_size", None) if isinstance(params, dict) else None
        if size is None:
            continue
        name, datatype, shape = inp.get("name"), inp.get("datatype"), inp.get("shape") or []
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise BinaryError(f"input '{name}': binary_data_size {size} does not fit the {len(body) - offset} bytes left in the body")
        raw = body[offset : offset + size]
        offset += size
        if datatype == "BYTES":
            inp["data"] = _strings(raw, name)
            continue
        if datatype not in NUMPY:
            raise BinaryError(f"input '{name}': datatype {datatype!r} has no binary form")
        dtype = np.dtype(NUMPY[datatype])
        if size != math.prod(shape) * dtype.itemsize:
            raise BinaryError(f"input '{name}': {size} bytes, but shape {shape} of {datatype} takes {math.prod(shape) * dtype.itemsize}")
        inp["data"] = np.frombuffer(raw, dtype=dtype).tolist()
    if offset != len(body):
        raise BinaryError(f"{len(body) - offset} bytes after the last binary input are not claimed by any binary_data_size")
    return request


def wanted(request: dict) -> set[str] | bool:
    """The outputs to answer in binary: True for all, or their names."""
    params = request.get("parameters") or {}
    if isinstance(params, dict) and params.get("binary_data_output"):
        return True
    return {str(o.get("name")) for o in request.get("outputs") or [] if isinstance(o, dict) and (o.get("parameters") or {}).get("binary_data")}


def write_response(response: dict, binary: set[str] | bool) -> tuple[bytes, int | None]:
    """The answer's body, and the JSON header's length when any output went binary."""
    blobs = []
    for out in response.get("outputs") or []:
        if isinstance(binary, set) and out.get("name") not in binary:
            continue
        data = out.pop("data", None)
        if out.get("datatype") == "BYTES":
            items = [d if isinstance(d, bytes) else str(d).encode() for d in np.asarray(data, dtype=object).reshape(-1)]
            raw = b"".join(struct.pack("<I", len(b)) + b for b in items)
        else:
            raw = np.asarray(data, dtype=NUMPY[out["datatype"]]).tobytes()
        out.setdefault("parameters", {})["binary_data_size"] = len(raw)
        blobs.append(raw)
    header = orjson.dumps(response)
    return (header + b"".join(blobs), len(header)) if blobs else (header, None)
