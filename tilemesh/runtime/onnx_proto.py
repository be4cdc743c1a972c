"""A minimal protobuf writer for the subset of ONNX that tilemesh's task models use, with no dependency.

Pyodide 0.27.7 has neither `onnx` nor (offline) `protobuf`, yet every browser must build ONNX models for its
tasks when it adopts a plan (`task_model`). The ONNX schema is a handful of messages; this module writes them
field by field with the wire format's two primitives (varints and length-delimited fields), generic over op
type and attributes: a node is (op_type, inputs, outputs, attrs), and an attribute's ONNX type follows from its
Python value (int, float, str, bytes, a sequence of ints or of floats).

Tests parse every model with the real `onnx` package, run `onnx.checker` and compare onnxruntime's results
with the numpy reference (tests/test_task_model.py). Field numbers are those of onnx/onnx.proto (proto2).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# TensorProto.DataType
FLOAT, INT64 = 1, 7
_DTYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}
# AttributeProto.AttributeType
_A_FLOAT, _A_INT, _A_STRING, _A_FLOATS, _A_INTS = 1, 2, 3, 6, 7


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values go as their 64-bit two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(fnum: int, wtype: int) -> bytes:
    return _varint((fnum << 3) | wtype)


def _int(fnum: int, v: int) -> bytes:
    return _key(fnum, 0) + _varint(int(v))


def _bytes(fnum: int, v: bytes | bytearray | memoryview) -> bytes:
    v = bytes(v)
    return _key(fnum, 2) + _varint(len(v)) + v


def _str(fnum: int, v: str) -> bytes:
    return _bytes(fnum, v.encode())


def _float(fnum: int, v: float) -> bytes:
    return _key(fnum, 5) + struct.pack("<f", float(v))


@dataclass(frozen=True)
class External:
    """Where a weight lives in a file the session is given separately (ONNX external data)."""

    location: str
    offset: int
    length: int


@dataclass
class Initializer:
    name: str
    dims: tuple[int, ...]
    dtype: np.dtype
    data: bytes | None = None  # raw little-endian data, or None with `external`
    external: External | None = None

    @classmethod
    def from_array(cls, name: str, a: np.ndarray) -> Initializer:
        a = np.asarray(a)
        dt = a.dtype.newbyteorder("=")
        if np.dtype(dt) not in _DTYPES:
            raise TypeError(f"initializer {name}: dtype {a.dtype} is not supported")
        data = np.ascontiguousarray(a, dt.newbyteorder("<")).tobytes()
        return cls(name, tuple(int(d) for d in a.shape), np.dtype(dt), data)


def _tensor(t: Initializer) -> bytes:
    out = b"".join(_int(1, d) for d in t.dims) + _int(2, _DTYPES[np.dtype(t.dtype)]) + _str(8, t.name)
    if t.external is not None:
        e = t.external
        for k, v in (("location", e.location), ("offset", str(e.offset)), ("length", str(e.length))):
            out += _bytes(13, _str(1, k) + _str(2, v))
        out += _int(14, 1)  # data_location = EXTERNAL
    else:
        out += _bytes(9, t.data or b"")
    return out


def _attribute(name: str, v) -> bytes:
    out = _str(1, name)
    if isinstance(v, bool | int | np.integer):
        return out + _int(3, int(v)) + _int(20, _A_INT)
    if isinstance(v, float | np.floating):
        return out + _float(2, float(v)) + _int(20, _A_FLOAT)
    if isinstance(v, str | bytes):
        return out + _bytes(4, v.encode() if isinstance(v, str) else v) + _int(20, _A_STRING)
    if isinstance(v, Sequence | np.ndarray) and len(v) > 0:
        vals = list(v)
        if all(isinstance(x, bool | int | np.integer) for x in vals):
            return out + b"".join(_int(8, int(x)) for x in vals) + _int(20, _A_INTS)
        if all(isinstance(x, int | float | np.integer | np.floating) for x in vals):
            return out + b"".join(_float(7, float(x)) for x in vals) + _int(20, _A_FLOATS)
    raise TypeError(f"attribute {name}: cannot write value {v!r}")


@dataclass
class OnnxNode:
    op_type: str
    inputs: Sequence[str]
    outputs: Sequence[str]
    attrs: Mapping = field(default_factory=dict)
    name: str = ""
    domain: str = ""


def _node(n: OnnxNode) -> bytes:
    out = b"".join(_str(1, t) for t in n.inputs) + b"".join(_str(2, t) for t in n.outputs)
    if n.name:
        out += _str(3, n.name)
    out += _str(4, n.op_type)
    for k in sorted(n.attrs):
        out += _bytes(5, _attribute(k, n.attrs[k]))
    if n.domain:
        out += _str(7, n.domain)
    return out


def _value_info(name: str, shape: Iterable[int | None] | None, elem_type: int = FLOAT) -> bytes:
    tensor_type = _int(1, elem_type)
    if shape is not None:  # None: rank and shape unknown
        tensor_type += _bytes(2, b"".join(_bytes(1, _int(1, d) if d is not None else b"") for d in shape))
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def model_bytes(nodes: Sequence[OnnxNode], inputs: Mapping[str, Sequence[int]], outputs: Mapping[str, Sequence],
                initializers: Sequence[Initializer] = (), *, opset: int = 17, ir_version: int = 8,
                name: str = "tilemesh") -> bytes:
    """A serialized ModelProto: float32 graph `inputs`/`outputs` (name -> shape; None for an unknown dim, or
    instead of the shape when even the rank is unknown)."""
    g = b"".join(_bytes(1, _node(n)) for n in nodes) + _str(2, name)
    g += b"".join(_bytes(5, _tensor(t)) for t in initializers)
    g += b"".join(_bytes(11, _value_info(t, s)) for t, s in inputs.items())
    g += b"".join(_bytes(12, _value_info(t, s)) for t, s in outputs.items())
    return (_int(1, ir_version) + _str(2, "tilemesh") + _bytes(7, g)
            + _bytes(8, _str(1, "") + _int(2, opset)))
