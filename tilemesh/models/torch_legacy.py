"""Read torch's legacy (pre-1.6, non-zip) ``.pth`` state_dict files without torch.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names. This reader
uses a restricted unpickler that resolves only the four globals a plain state_dict needs
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``,
``torch.LongStorage``) to inert local stand-ins, and refuses every other global before anything
is called, so a checkpoint can never run code.

Layout of the legacy format (what ``torch.save(..., _use_new_zipfile_serialization=False)``
writes), every part read in order:

1. a pickled magic number ``0x1950a86a20f9469cfc6c``;
2. a pickled protocol version, ``1001``;
3. a pickled ``sys_info`` dict (we require ``little_endian``);
4. the object pickle itself, whose persistent ids are
   ``('storage', <storage class>, key, location, numel, view_metadata)``;
5. a pickled list of every storage key, in the order their data follows;
6. for each key: an 8-byte little-endian element count, then the raw little-endian elements.
   ``LongStorage`` elements are 8 bytes even though ``sys_info`` claims ``long=4``.

The result is an ordered dict ``name -> numpy array`` (float32 or int64), owning its memory.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


class CheckpointError(ValueError):
    """The file is not a legacy torch state_dict this reader accepts (or it is damaged)."""


class _Inert:
    """Base of the stand-ins a checkpoint may name.

    No ``__dict__`` and a refusing ``__setstate__``: a pickle's BUILD opcode could otherwise
    rewrite these shared objects and change how later checkpoints in the process are read.
    """

    __slots__ = ()

    def __setstate__(self, state):
        raise CheckpointError(f"checkpoint tries to modify {self!r}, which a state_dict never does")


class _StorageType(_Inert):
    """Stand-in for ``torch.FloatStorage`` / ``torch.LongStorage``: only names a dtype."""

    __slots__ = ("torch_name", "dtype")

    def __init__(self, torch_name: str, dtype: str):
        self.torch_name = torch_name
        self.dtype = np.dtype(dtype)

    def __repr__(self):
        return self.torch_name

    def __call__(self, *args, **kwargs):
        # A state_dict only ever names storage classes inside persistent ids; a pickle that
        # calls one is not a state_dict.
        raise CheckpointError(f"checkpoint tries to call {self.torch_name}, which a state_dict never does")


class _AllowedCallable(_Inert):
    __slots__ = ("name", "function")

    def __init__(self, name: str, function):
        self.name = name
        self.function = function

    def __repr__(self):
        return self.name

    def __call__(self, *args):
        return self.function(*args)


_STORAGE_TYPES = {
    "FloatStorage": _StorageType("torch.FloatStorage", "<f4"),
    "LongStorage": _StorageType("torch.LongStorage", "<i8"),
}


@dataclass(frozen=True)
class _StorageRef:
    key: str
    type: _StorageType
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage bytes come after the pickle; materialised once they are read."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _is_int_tuple(value) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *extra):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: checks its arguments, builds nothing."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError("_rebuild_tensor_v2 called without a storage")
    if type(storage_offset) is not int or not _is_int_tuple(size) or not _is_int_tuple(stride):
        raise CheckpointError("_rebuild_tensor_v2 called with malformed offset, size or stride")
    if len(size) != len(stride) or storage_offset < 0 or any(v < 0 for v in size + stride):
        raise CheckpointError(f"tensor geometry is invalid: offset {storage_offset}, size {size}, stride {stride}")
    # Elements spanned from the offset: the last index's position plus one (none if any size is 0).
    extent = 0 if 0 in size else 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if storage_offset + extent > storage.numel:
        raise CheckpointError(
            f"tensor of size {size} at offset {storage_offset} overruns its storage of {storage.numel} elements"
        )
    return _TensorRef(storage, storage_offset, size, stride)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _AllowedCallable("collections.OrderedDict", OrderedDict),
    ("torch._utils", "_rebuild_tensor_v2"): _AllowedCallable("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch", "FloatStorage"): _STORAGE_TYPES["FloatStorage"],
    ("torch", "LongStorage"): _STORAGE_TYPES["LongStorage"],
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allowed globals; with ``allow_globals=False`` (header parts) none at all."""

    def __init__(self, file, *, allow_globals: bool):
        super().__init__(file)
        self._allow_globals = allow_globals
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module, name):
        target = _ALLOWED_GLOBALS.get((module, name)) if self._allow_globals else None
        if target is None:
            raise CheckpointError(
                f"checkpoint refers to {module}.{name}, which a state_dict does not need: refusing to load it"
            )
        return target

    def persistent_load(self, pid):
        if not self._allow_globals:
            raise CheckpointError("unexpected persistent id outside the state_dict pickle")
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"persistent id names no known storage type: {storage_type!r:.80}")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise CheckpointError(f"malformed storage reference {pid!r:.80}")
        if view_metadata is not None:
            raise CheckpointError("storage views are not supported")
        ref = _StorageRef(key, storage_type, numel)
        known = self.storages.setdefault(key, ref)
        if known != ref:
            raise CheckpointError(f"storage {key} is referenced with two different types or sizes")
        return known


def _load_part(stream: io.BytesIO, what: str, *, allow_globals: bool = False):
    unpickler = _RestrictedUnpickler(stream, allow_globals=allow_globals)
    try:
        value = unpickler.load()
    except CheckpointError:
        raise
    except EOFError as exc:
        raise CheckpointError(f"checkpoint is truncated: it ends inside the {what}") from exc
    except Exception as exc:  # any malformed pickle: report it as one kind of error
        raise CheckpointError(f"checkpoint's {what} is not a valid pickle ({type(exc).__name__}: {exc})") from exc
    return value, unpickler.storages


def load_state_dict_bytes(data: bytes) -> OrderedDict[str, np.ndarray]:
    """Parse a legacy torch checkpoint held in memory; see the module docstring for the layout."""
    if data[:4] == b"PK\x03\x04":
        raise CheckpointError("this is torch's zip checkpoint format; only the legacy format is supported")
    stream = io.BytesIO(data)
    magic, _ = _load_part(stream, "magic number")
    if magic != MAGIC_NUMBER:
        raise CheckpointError("not a legacy torch checkpoint (wrong magic number)")
    protocol, _ = _load_part(stream, "protocol version")
    if protocol != PROTOCOL_VERSION:
        raise CheckpointError(f"unsupported legacy protocol version {protocol!r:.40}")
    sys_info, _ = _load_part(stream, "sys_info header")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise CheckpointError("only little-endian checkpoints are supported")

    result, storages = _load_part(stream, "state_dict", allow_globals=True)
    if not isinstance(result, dict):
        raise CheckpointError(f"checkpoint holds a {type(result).__name__}, not a state_dict")

    keys, _ = _load_part(stream, "storage key list")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)) or len(set(keys)) != len(keys):
        raise CheckpointError("storage key list is malformed")
    if set(keys) != set(storages):
        raise CheckpointError("storage key list does not match the storages the state_dict uses")

    arrays: dict[str, np.ndarray] = {}
    offset = stream.tell()
    view = memoryview(data)
    for key in keys:
        ref = storages[key]
        if offset + 8 > len(data):
            raise CheckpointError(f"checkpoint is truncated: storage {key} has no length header")
        numel = int.from_bytes(view[offset : offset + 8], "little")
        offset += 8
        if numel != ref.numel:
            raise CheckpointError(f"storage {key} holds {numel} elements, the state_dict expects {ref.numel}")
        nbytes = numel * ref.type.dtype.itemsize
        if offset + nbytes > len(data):
            raise CheckpointError(
                f"checkpoint is truncated: storage {key} needs {nbytes} bytes, {len(data) - offset} remain"
            )
        arrays[key] = np.frombuffer(data, dtype=ref.type.dtype, count=numel, offset=offset)
        offset += nbytes
    if offset != len(data):
        raise CheckpointError(f"checkpoint has {len(data) - offset} unexpected bytes after the last storage")

    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, value in result.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise CheckpointError(f"state_dict entry {name!r:.80} is not a tensor")
        storage = arrays[value.storage.key]
        itemsize = storage.itemsize
        strided = np.lib.stride_tricks.as_strided(
            storage[value.offset :] if storage.size else storage,
            shape=value.shape,
            strides=tuple(s * itemsize for s in value.stride),
            writeable=False,
        )
        # Copy: the result must own its memory, not pin the whole file's bytes.
        out[name] = np.array(strided, dtype=storage.dtype.newbyteorder("="), copy=True)
    return out

