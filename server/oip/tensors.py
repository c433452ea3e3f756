"""Open Inference Protocol tensors: proto <-> typed `Tensor` values, in both data encodings.

A request carries each input's elements either in typed `contents` (one repeated field per
element type) or, for every input at once, in `raw_input_contents` (little-endian bytes; a
BYTES element is a 4-byte little-endian length then its bytes). Responses answer in the style
the request used, which is what clients such as tritonclient expect: they send raw inputs and
read only `raw_output_contents` back.

Only the element types bertrec's models use are supported (BYTES, INT32, INT64, FP32); any
other datatype is rejected with INVALID_ARGUMENT naming the tensor.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bertrec.oip.v2 import grpc_service_pb2 as pb
from bertrec.server.errors import InvalidArgument

BYTES, INT32, INT64, FP32 = "BYTES", "INT32", "INT64", "FP32"
# Little-endian numpy dtypes of the fixed-size element types.
NUMERIC: dict[str, np.dtype[Any]] = {
    INT32: np.dtype("<i4"),
    INT64: np.dtype("<i8"),
    FP32: np.dtype("<f4"),
}
# The typed `InferTensorContents` field that carries each datatype.
CONTENTS_FIELD = {BYTES: "bytes_contents", INT32: "int_contents", INT64: "int64_contents",
                  FP32: "fp32_contents"}  # fmt: skip
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Tensor:
    """One tensor: BYTES elements as a list of `bytes`, numeric ones as a numpy array.

    `data` is flat (row-major) for BYTES and has `shape` for numeric tensors.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]


@dataclass(frozen=True)
class Inputs:
    """The decoded inputs of a request, and whether it sent them raw."""

    tensors: list[Tensor]
    raw: bool


# Inputs have at most 2 dimensions; 8 leaves room and stays far below numpy's 64.
MAX_DIMS = 8
MAX_ELEMENTS = 2**31 - 1


def read_inputs(request: pb.ModelInferRequest) -> Inputs:
    """Decode every input of `request`.

    Raises:
        InvalidArgument: raw and typed contents mixed, a raw entry per input missing, an
            unsupported datatype, a bad shape, or data that does not match the shape.
    """
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    tensors = []
    for i, tensor in enumerate(request.inputs):
        shape = _shape(tensor.name, tensor.shape)
        _check_datatype(tensor.name, tensor.datatype)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"input {tensor.name!r} sets contents while the request uses raw_input_contents"
                )
            data = _from_raw(tensor.name, tensor.datatype, shape, raw[i])
        else:
            data = _from_contents(tensor.name, tensor.datatype, shape, tensor.contents)
        tensors.append(Tensor(tensor.name, tensor.datatype, shape, data))
    return Inputs(tensors, bool(raw))


def write_outputs(response: pb.ModelInferResponse, tensors: Sequence[Tensor], raw: bool) -> None:
    """Append `tensors` to `response`, in `raw_output_contents` if `raw`, else typed."""
    for tensor in tensors:
        out = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if raw:
            response.raw_output_contents.append(_to_raw(tensor))
        elif isinstance(tensor.data, list):
            out.contents.bytes_contents.extend(tensor.data)
        else:
            field = getattr(out.contents, CONTENTS_FIELD[tensor.datatype])
            field.extend(tensor.data.ravel().tolist())


def _shape(name: str, dims: Sequence[int]) -> tuple[int, ...]:
    if len(dims) > MAX_DIMS:
        raise InvalidArgument(f"input {name!r} has {len(dims)} dimensions, more than {MAX_DIMS}")
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r} has a negative dimension in shape {list(shape)}")
    # numpy refuses (ValueError) a shape whose non-zero dimensions multiply past its index range,
    # even with zero elements; no input of ours comes near 2**31 elements.
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} is too large")
    return shape


def _check_datatype(name: str, datatype: str) -> None:
    if datatype not in CONTENTS_FIELD:
        supported = ", ".join(CONTENTS_FIELD)
        raise InvalidArgument(f"input {name!r} has datatype {datatype!r}; supported: {supported}")


def _from_contents(
    name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> np.ndarray | list[bytes]:
    values = getattr(contents, CONTENTS_FIELD[datatype])
    _check_count(name, shape, len(values), f"{CONTENTS_FIELD[datatype]} values")
    if datatype == BYTES:
        return list(values)
    return np.asarray(values, dtype=NUMERIC[datatype]).reshape(shape)


def _from_raw(
    name: str, datatype: str, shape: tuple[int, ...], raw: bytes
) -> np.ndarray | list[bytes]:
    if datatype == BYTES:
        elements = _split_bytes(name, raw)
        _check_count(name, shape, len(elements), "raw BYTES elements")
        return elements
    dtype = NUMERIC[datatype]
    if len(raw) % dtype.itemsize:
        raise InvalidArgument(
            f"input {name!r}: {len(raw)} raw bytes is not a whole number of {datatype} elements"
        )
    _check_count(name, shape, len(raw) // dtype.itemsize, f"raw {datatype} elements")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _split_bytes(name: str, raw: bytes) -> list[bytes]:
    """The elements of a raw BYTES tensor: (4-byte little-endian length, bytes) repeated."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise InvalidArgument(f"input {name!r}: raw BYTES data ends inside a length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidArgument(
                f"input {name!r}: raw BYTES element {len(elements)} claims {length} bytes, "
                f"only {len(raw) - offset} left"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def _check_count(name: str, shape: tuple[int, ...], count: int, what: str) -> None:
    expected = math.prod(shape)
    if count != expected:
        raise InvalidArgument(
            f"input {name!r} has shape {list(shape)} ({expected} elements) but {count} {what}"
        )


def _to_raw(tensor: Tensor) -> bytes:
    if isinstance(tensor.data, list):
        return b"".join(_LENGTH.pack(len(e)) + e for e in tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=NUMERIC[tensor.datatype]).tobytes()
