"""Property tests of the tensor wire format: bit-exact round trips in any chunk order, and loud failures."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tilemesh.runtime import wire
from tilemesh.runtime.wire import HEADER_SIZE, Reassembler, WireError, decode, encode, parse_chunk, test_pattern

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dtypes = st.sampled_from([np.dtype("<f4"), np.dtype("<f2"), np.dtype(">f4")])
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9)


@st.composite
def arrays(draw):
    dt = draw(dtypes)
    shape = draw(shapes)
    # Arbitrary bit patterns, not just "nice" floats: every NaN payload and infinity must survive.
    ut = np.dtype(f"{dt.byteorder if dt.byteorder in '<>' else '<'}u{dt.itemsize}")
    bits = draw(hnp.arrays(ut, shape))
    return bits.view(dt)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return a.shape == b.shape and a.tobytes() == b.tobytes()


@SETTINGS
@given(a=arrays(), max_message=st.integers(1024, 8192), seed=st.randoms(use_true_random=False),
       frame=st.integers(0, 2**32 - 1), tensor=st.integers(0, 2**32 - 1), plan_id=st.integers(0, 2**32 - 1))
def test_round_trip_bit_exact_any_order(a, max_message, seed, frame, tensor, plan_id):
    region = (-3, 5, 2, 2 + 7)
    chunks = encode(a, frame=frame, tensor=tensor, plan_id=plan_id, region=region, max_message=max_message)
    assert all(len(c) <= max_message for c in chunks)
    seed.shuffle(chunks)
    got = decode(chunks)
    assert got.header.frame == frame and got.header.tensor == tensor and got.header.plan_id == plan_id
    assert got.header.region == region
    assert got.array.dtype == a.dtype.newbyteorder("<")
    assert same_bits(a, got.array)


def test_special_values_survive():
    a = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, 3.4e38], np.float32)
    # A signalling NaN with a payload: any float conversion on the way would quiet it.
    a = np.concatenate([a, np.array([0x7F800001, 0xFFBADBAD], np.uint32).view(np.float32)])
    assert decode(encode(a, frame=1, tensor=2)).array.tobytes() == a.tobytes()


def test_pattern_is_deterministic_and_exotic():
    p = test_pattern((64, 56, 56), seed=3)
    assert p.tobytes() == test_pattern((64, 56, 56), seed=3).tobytes()
    assert p.tobytes() != test_pattern((64, 56, 56), seed=4).tobytes()
    assert np.isnan(p).any() and np.isinf(p).any()


def test_default_region_is_whole_plane_and_chunks_fill_max_message():
    a = test_pattern((64, 56, 56), seed=1)
    chunks = encode(a, frame=0, tensor=0, max_message=65536)
    assert [len(c) for c in chunks[:-1]] == [65536] * (len(chunks) - 1)
    assert parse_chunk(chunks[0])[0].region == (0, 56, 0, 56)
    assert sum(len(c) - HEADER_SIZE for c in chunks) == a.nbytes


def test_encode_joined_splits_at_max_message():
    a = test_pattern((5, 40, 40), 4)
    joined = wire.encode_joined(a, frame=1, tensor=1, max_message=4096)
    got = decode([joined[i : i + 4096] for i in range(0, len(joined), 4096)])
    assert got.array.tobytes() == a.tobytes()


@SETTINGS
@given(a=arrays(), max_message=st.integers(1024, 4096), data=st.data())
def test_any_single_byte_corruption_is_detected(a, max_message, data):
    chunks = encode(a, frame=7, tensor=1, max_message=max_message)
    i = data.draw(st.integers(0, len(chunks) - 1))
    c = bytearray(chunks[i])
    pos = data.draw(st.integers(0, len(c) - 1))
    c[pos] ^= data.draw(st.integers(1, 255))
    chunks[i] = bytes(c)
    with pytest.raises(WireError):
        decode(chunks)


@SETTINGS
@given(a=arrays().filter(lambda x: x.nbytes > 0), max_message=st.integers(1024, 4096), data=st.data())
def test_truncated_chunk_is_detected(a, max_message, data):
    chunks = encode(a, frame=7, tensor=1, max_message=max_message)
    i = data.draw(st.integers(0, len(chunks) - 1))
    cut = data.draw(st.integers(0, len(chunks[i]) - 1))
    chunks[i] = chunks[i][:cut]
    with pytest.raises(WireError):
        decode(chunks)


def _reseal(head_fields: dict, payload: bytes) -> bytes:
    """Build a chunk with a valid CRC but arbitrary header fields: inconsistencies CRC cannot catch."""
    f = head_fields
    head = wire._HEAD.pack(wire.MAGIC, f.get("version", 1), f.get("code", 1), f.get("ndim", 1), 0, f.get("frame", 0),
                           f.get("tensor", 0), 0, 0, 1, 0, 1, *f["shape"], f["stride"], f["index"], f["count"])
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def test_oversized_and_inconsistent_chunks_with_valid_crc():
    # Last chunk of a 10-float tensor with stride 32 carries 8 bytes; 12 is oversized.
    with pytest.raises(WireError, match="oversized"):
        parse_chunk(_reseal({"shape": (10, 0, 0, 0), "stride": 32, "index": 1, "count": 2}, b"\0" * 12))
    with pytest.raises(WireError, match="cannot carry"):
        parse_chunk(_reseal({"shape": (10, 0, 0, 0), "stride": 32, "index": 0, "count": 3}, b"\0" * 32))
    with pytest.raises(WireError, match="version"):
        parse_chunk(_reseal({"version": 9, "shape": (1, 0, 0, 0), "stride": 4, "index": 0, "count": 1}, b"\0" * 4))
    with pytest.raises(WireError, match="beyond ndim"):
        parse_chunk(_reseal({"shape": (1, 5, 0, 0), "stride": 4, "index": 0, "count": 1}, b"\0" * 4))
    # Same message key, different shape: chunk 1 disagrees with chunk 0.
    r = Reassembler()
    assert r.feed(_reseal({"shape": (10, 0, 0, 0), "stride": 32, "index": 0, "count": 2}, b"\0" * 32)) is None
    with pytest.raises(WireError, match="disagrees"):
        r.feed(_reseal({"shape": (12, 0, 0, 0), "stride": 32, "index": 1, "count": 2}, b"\0" * 16))


def test_duplicates_raise_before_and_after_completion():
    chunks = encode(test_pattern((3000,), 1), frame=5, tensor=1, max_message=4096)
    r = Reassembler()
    r.feed(chunks[0])
    with pytest.raises(WireError, match="duplicate"):
        r.feed(chunks[0])
    for c in chunks[1:]:
        out = r.feed(c)
    assert out is not None
    with pytest.raises(WireError, match="duplicate"):
        r.feed(chunks[1])


def test_wrong_dtype_and_rank_refused():
    with pytest.raises(WireError, match="dtype"):
        encode(np.zeros(3), frame=0, tensor=0)
    with pytest.raises(WireError, match="dimensions"):
        encode(np.zeros((1,) * 5, np.float32), frame=0, tensor=0)
    with pytest.raises(WireError, match="magic"):
        parse_chunk(b"X" * HEADER_SIZE)


def test_interleaved_messages_and_frame_window_expiry():
    r = Reassembler(window=2)
    a = encode(test_pattern((2000,), 1), frame=1, tensor=0, max_message=2048)
    b = encode(test_pattern((2000,), 2), frame=1, tensor=1, max_message=2048)
    c = encode(test_pattern((10,), 3), frame=3, tensor=0, max_message=2048)
    assert len(a) == len(b) == 5
    done = [r.feed(x) for pair in zip(a[:-1], b[:-1], strict=True) for x in pair] + [r.feed(b[-1])]
    assert [d is not None for d in done].count(True) == 1 and done[-1].header.tensor == 1  # a lacks its last
    assert r.pending_bytes == 8000
    assert r.feed(c[0]) is not None  # frame 3 with window 2 expires frame 1
    assert r.pending_bytes == 0 and r.dropped == 1
    assert r.feed(a[-1]) is None and r.stale == 1


def test_pending_memory_is_capped():
    r = Reassembler(window=100, max_pending_bytes=10_000)
    for frame in range(20):
        r.feed(encode(test_pattern((2000,), frame), frame=frame, tensor=0, max_message=2048)[0])
        assert r.pending_bytes <= 10_000
    assert r.dropped == 19  # 8000-byte messages: only the newest fits in 10 kB
    with pytest.raises(WireError, match="max_pending_bytes"):
        r.feed(encode(test_pattern((3000,), 1), frame=50, tensor=0, max_message=2048)[0])


def test_fast_enough_for_a_full_feature_map():
    """64x56x56 float32 (800 KB) through encode + reassemble well under the conv it feeds (ms, not s)."""
    a = test_pattern((64, 56, 56), 9)
    t0 = time.perf_counter()
    for i in range(20):
        r = Reassembler()
        for c in encode(a, frame=i, tensor=0, max_message=65536):
            out = r.feed(c)
    per = (time.perf_counter() - t0) / 20
    assert out.array.tobytes() == a.tobytes()
    assert per < 0.05, f"{per * 1e3:.1f} ms per 800 KB tensor"
