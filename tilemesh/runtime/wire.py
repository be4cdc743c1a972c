"""Tensor wire format: tiles and halos as self-describing chunks that fit one data-channel message each.

Every chunk carries the full fixed header, so the receiver can start reassembly from whichever chunk arrives
first and needs no per-link state beyond a `Reassembler`:

    offset size field
         0    4 magic b"TMWT"
         4    1 version (1)
         5    1 dtype code (1 = float32, 2 = float16, 3 = uint8: camera pixels), payload is little-endian
         6    1 ndim (0..4)
         7    1 flags (0: a tensor piece; FLAG_DIGEST: an overlap digest, see tilemesh.runtime.overlap)
         8    4 frame id (u32)
        12    4 tensor id (u32)
        16    4 plan id (u32; 0 for tensors outside any plan, e.g. diagnostics)
        20   16 region r0, r1, c0, c1 (i32; rows/cols of the full map this piece covers; may be negative)
        36   16 shape (u32 x 4, unused slots 0)
        52    4 stride: payload bytes per chunk (every chunk but the last carries exactly this many)
        56    4 chunk index
        60    4 chunk count
        64    4 CRC-32 of bytes 0..63 and the payload
        68      payload: bytes [index * stride, min(total, (index + 1) * stride)) of the tensor

SCTP already checksums packets; the CRC is there so that a bug anywhere between two numpy arrays (a JS slice
off by one, a reused buffer) fails loudly instead of feeding a neighbour a wrong halo. zlib's crc32 runs in C,
also in Pyodide. A message is identified by (frame, tensor, plan_id, region) within one sender's stream, so keep
one `Reassembler` per remote peer.
"""

from __future__ import annotations

import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

MAGIC = b"TMWT"
VERSION = 1
MAX_NDIM = 4
# Chunk size when the remote's SCTP maxMessageSize is not known: 256 KiB, what Chromium and aiortc 1.16 both
# advertise (16 KiB is what every browser accepts from every other). Below 1 KiB a max_message is refused.
DEFAULT_MAX_MESSAGE = 256 * 1024
MIN_MAX_MESSAGE = 1024
# Flags: a digest of `region` of `tensor` (tilemesh.runtime.overlap), not the tensor's values. No other bit is set.
FLAG_DIGEST = 1
FLAGS = FLAG_DIGEST

_HEAD = struct.Struct("<4sBBBBIII4i4IIII")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _CRC.size  # 68

# uint8 carries the camera frame's pixels: a quarter of float32 on the requesting phone's uplink.
DTYPES: dict[int, np.dtype] = {1: np.dtype("<f4"), 2: np.dtype("<f2"), 3: np.dtype("u1")}
_CODES = {dt: code for code, dt in DTYPES.items()}


class WireError(ValueError):
    """A chunk or message that does not follow the wire format (truncated, corrupted, inconsistent...)."""


@dataclass(frozen=True)
class TensorHeader:
    frame: int
    tensor: int
    plan_id: int
    region: tuple[int, int, int, int]
    dtype: np.dtype
    shape: tuple[int, ...]
    flags: int = 0

    @property
    def key(self) -> tuple:
        return (self.frame, self.tensor, self.plan_id, self.region, self.flags)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class Received:
    """A reassembled tensor: its header and a writable numpy array of `header.shape` (little-endian dtype)."""

    header: TensorHeader
    array: np.ndarray


def _region_of(region, shape) -> tuple[int, int, int, int]:
    if region is None:
        # The whole plane: the last two axes (a 1x1 plane for vectors, like tilemesh.runtime.regions does).
        h = shape[-2] if len(shape) >= 2 else 1
        w = shape[-1] if len(shape) >= 2 else 1
        return (0, int(h), 0, int(w))
    if hasattr(region, "r0"):
        region = (region.r0, region.r1, region.c0, region.c1)
    r = tuple(int(v) for v in region)
    if len(r) != 4:
        raise WireError(f"region needs 4 ints (r0, r1, c0, c1), got {region!r}")
    return r  # type: ignore[return-value]


def encode(
    array: np.ndarray,
    *,
    frame: int,
    tensor: int,
    plan_id: int = 0,
    region=None,
    max_message: int = DEFAULT_MAX_MESSAGE,
    flags: int = 0,
) -> list[bytes]:
    """Split `array` (float32, float16 or uint8, at most 4-D) into chunks of at most `max_message` bytes each.

    Pass the remote's advertised SCTP maxMessageSize as `max_message`: a larger message is refused by the
    browser's send() and by aiortc.
    """
    a = np.asarray(array)
    code = _CODES.get(a.dtype.newbyteorder("<"))
    if code is None:
        raise WireError(f"dtype {a.dtype} is not on the wire (float32, float16 or uint8 only)")
    if a.ndim > MAX_NDIM:
        raise WireError(f"{a.ndim}-D tensor: at most {MAX_NDIM} dimensions")
    if max_message < MIN_MAX_MESSAGE:
        raise WireError(f"max_message {max_message} below {MIN_MAX_MESSAGE}")
    if flags & ~FLAGS or not 0 <= flags < 256:
        raise WireError(f"unknown flags {flags}")
    # Only copies when the input is big-endian or not C-contiguous; a view keeps NaN payloads untouched.
    a = np.ascontiguousarray(a, dtype=DTYPES[code])
    payload = memoryview(a).cast("B") if a.size else memoryview(b"")
    total = len(payload)
    stride = max_message - HEADER_SIZE
    count = max(1, -(-total // stride))
    shape = tuple(a.shape) + (0,) * (MAX_NDIM - a.ndim)
    r = _region_of(region, a.shape)
    chunks = []
    for index in range(count):
        piece = payload[index * stride : (index + 1) * stride]
        head = _HEAD.pack(MAGIC, VERSION, code, a.ndim, flags, frame, tensor, plan_id, *r, *shape, stride, index, count)
        crc = zlib.crc32(piece, zlib.crc32(head))
        chunks.append(b"".join((head, _CRC.pack(crc), piece)))
    return chunks


def encode_joined(array: np.ndarray, **kwargs) -> bytes:
    """The chunks of `encode` back to back, as one buffer to hand from the Worker to the main thread.

    Every chunk but the last is exactly `max_message` bytes, so the receiver of the buffer splits it at multiples
    of `max_message` (web/mesh.js `sendChunks`) without any framing of its own.
    """
    return b"".join(encode(array, **kwargs))


def parse_chunk(chunk) -> tuple[TensorHeader, int, int, int, memoryview]:
    """Validate one chunk on its own; returns (header, stride, index, count, payload view)."""
    mv = memoryview(chunk).cast("B")
    if len(mv) < HEADER_SIZE:
        raise WireError(f"truncated chunk: {len(mv)} bytes, header alone is {HEADER_SIZE}")
    try:
        (magic, version, code, ndim, flags, frame, tensor, plan_id, r0, r1, c0, c1, s0, s1, s2, s3,
         stride, index, count) = _HEAD.unpack_from(mv)
    except struct.error as exc:  # pragma: no cover (length checked above)
        raise WireError(str(exc)) from exc
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}: not a tilemesh tensor chunk")
    if version != VERSION:
        raise WireError(f"wire version {version}, this peer speaks {VERSION}")
    (crc,) = _CRC.unpack_from(mv, _HEAD.size)
    payload = mv[HEADER_SIZE:]
    if zlib.crc32(payload, zlib.crc32(mv[: _HEAD.size])) != crc:
        raise WireError(f"checksum mismatch in chunk {index} of frame {frame} tensor {tensor}")
    if code not in DTYPES:
        raise WireError(f"unknown dtype code {code}")
    if ndim > MAX_NDIM or flags & ~FLAGS:
        raise WireError(f"bad ndim {ndim} or flags {flags}")
    dims = (s0, s1, s2, s3)
    if any(dims[ndim:]):
        raise WireError(f"shape {dims} has non-zero entries beyond ndim {ndim}")
    if r0 > r1 or c0 > c1:
        raise WireError(f"inverted region {(r0, r1, c0, c1)}")
    if stride < 1 or count < 1 or index >= count:
        raise WireError(f"bad chunking: index {index} of {count}, stride {stride}")
    header = TensorHeader(frame, tensor, plan_id, (r0, r1, c0, c1), DTYPES[code], tuple(dims[:ndim]), flags)
    total = header.nbytes
    if count != max(1, -(-total // stride)):
        raise WireError(f"{count} chunks of {stride} bytes cannot carry {total} bytes")
    want = min(stride, total - index * stride)
    if len(payload) != want:
        kind = "truncated" if len(payload) < want else "oversized"
        raise WireError(f"{kind} chunk {index}/{count}: {len(payload)} payload bytes, expected {want}")
    return header, stride, index, count, payload


def peek_plan_id(chunk) -> int | None:
    """The plan id of a chunk without validating it (None if it is not a chunk): lets a receiver decide where a
    chunk belongs before paying for the checksum."""
    mv = memoryview(chunk).cast("B")
    if len(mv) < HEADER_SIZE or bytes(mv[:4]) != MAGIC:
        return None
    return _HEAD.unpack_from(mv)[7]


def peek_chunking(chunk) -> tuple[int, int] | None:
    """(index, count) of a chunk within its message without validating it (None if it is not a chunk): the
    receiver's link accounting times a message from its first chunk to its last."""
    mv = memoryview(chunk).cast("B")
    if len(mv) < HEADER_SIZE or bytes(mv[:4]) != MAGIC:
        return None
    head = _HEAD.unpack_from(mv)
    return head[17], head[18]


def decode(chunks) -> Received:
    """Reassemble one complete message from its chunks (any order); the one-shot form of `Reassembler`."""
    r = Reassembler(window=1)
    out = None
    for c in chunks:
        if out is not None:
            raise WireError("chunks left over after the message completed")
        out = r.feed(c)
    if out is None:
        raise WireError("incomplete message")
    return out


class _Partial:
    __slots__ = ("header", "stride", "count", "buf", "seen", "missing")

    def __init__(self, header: TensorHeader, stride: int, count: int):
        self.header, self.stride, self.count = header, stride, count
        self.buf = bytearray(header.nbytes)
        self.seen = bytearray(count)
        self.missing = count


class Reassembler:
    """Collects chunks from one sender into tensors, in any order, with bounded memory.

    `feed(chunk)` returns a `Received` when the chunk completes its message, else None. Frames older than the
    newest frame seen minus `window - 1` are expired: their incomplete messages are dropped (counted in
    `dropped`) and late chunks for them are ignored (counted in `stale`), since a slow neighbour must not make
    the receiver hold every frame forever. `max_pending_bytes` caps the memory held by incomplete messages.
    """

    def __init__(self, window: int = 4, max_pending_bytes: int = 256 * 1024 * 1024):
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.max_pending_bytes = max_pending_bytes
        self.newest_frame: int | None = None
        self.pending: OrderedDict[tuple, _Partial] = OrderedDict()
        self.pending_bytes = 0
        # Keys completed within the window: a repeated chunk after completion is a duplicate, not a new message.
        self._done: dict[tuple, int] = {}
        self.completed = 0
        self.dropped = 0
        self.stale = 0

    def _oldest_live(self) -> int:
        assert self.newest_frame is not None
        return self.newest_frame - self.window + 1

    def _expire(self) -> None:
        floor = self._oldest_live()
        for key in [k for k, p in self.pending.items() if p.header.frame < floor]:
            self.pending_bytes -= len(self.pending.pop(key).buf)
            self.dropped += 1
        for key in [k for k, f in self._done.items() if f < floor]:
            del self._done[key]

    def feed(self, chunk) -> Received | None:
        header, stride, index, count, payload = parse_chunk(chunk)
        if self.newest_frame is not None and header.frame < self._oldest_live():
            self.stale += 1
            return None
        if self.newest_frame is None or header.frame > self.newest_frame:
            self.newest_frame = header.frame
            self._expire()
        key = header.key
        if key in self._done:
            raise WireError(f"duplicate chunk {index} for already completed message {key}")
        part = self.pending.get(key)
        if part is None:
            size = header.nbytes
            if size > self.max_pending_bytes:
                raise WireError(f"message of {size} bytes exceeds max_pending_bytes {self.max_pending_bytes}")
            # Evict the oldest incomplete messages rather than refuse a newer one: newer frames matter more.
            while self.pending and self.pending_bytes + size > self.max_pending_bytes:
                _, old = self.pending.popitem(last=False)
                self.pending_bytes -= len(old.buf)
                self.dropped += 1
            part = _Partial(header, stride, count)
            self.pending[key] = part
            self.pending_bytes += size
        elif part.header != header or part.stride != stride or part.count != count:
            raise WireError(
                f"chunk {index} of {key} disagrees with earlier chunks: {header}/{stride}/{count} vs "
                f"{part.header}/{part.stride}/{part.count}"
            )
        if part.seen[index]:
            raise WireError(f"duplicate chunk {index} of {count} for message {key}")
        part.seen[index] = 1
        start = index * stride
        part.buf[start : start + len(payload)] = payload
        part.missing -= 1
        if part.missing:
            return None
        del self.pending[key]
        self.pending_bytes -= len(part.buf)
        self._done[key] = header.frame
        self.completed += 1
        arr = np.frombuffer(part.buf, dtype=header.dtype).reshape(header.shape)
        return Received(header, arr)


class Inbox:
    """One Reassembler per sending peer, for code that receives from a whole mesh (the browser's worker)."""

    def __init__(self, window: int = 4, max_pending_bytes: int = 256 * 1024 * 1024):
        self.window, self.max_pending_bytes = window, max_pending_bytes
        self.links: dict[str, Reassembler] = {}

    def feed(self, peer: str, chunk) -> Received | None:
        r = self.links.get(peer)
        if r is None:
            r = self.links[peer] = Reassembler(self.window, self.max_pending_bytes)
        return r.feed(chunk)

    def forget(self, peer: str) -> None:
        """Drop a vanished peer's partial messages."""
        self.links.pop(peer, None)


def test_pattern(shape, seed: int, dtype=np.float32) -> np.ndarray:
    """A deterministic tensor whose bits cover NaNs (with payloads), infinities, denormals and signed zeros.

    Built from integer arithmetic only, so CPython and Pyodide produce the same bytes; any float operation on
    the way across the mesh (a conversion that quiets a NaN, a flush of denormals) changes the hash.
    """
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    utype = np.uint32 if dt.itemsize == 4 else np.uint16
    with np.errstate(over="ignore"):
        bits = (np.arange(n, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(seed) * np.uint64(40503)) & (
            np.uint64(np.iinfo(utype).max)
        )
    out = bits.astype(utype)
    # Plant the rare patterns up front: +-inf, a signalling NaN with payload, -0, the smallest denormal.
    specials = [0x7F800000, 0xFF800000, 0x7F800001, 0x80000000, 1] if dt.itemsize == 4 else [
        0x7C00, 0xFC00, 0x7C01, 0x8000, 1]
    out[: min(n, len(specials))] = specials[: min(n, len(specials))]
    return out.view(dt.newbyteorder("<")).reshape(shape)


test_pattern.__test__ = False  # type: ignore[attr-defined]  (not a pytest test despite the name)
