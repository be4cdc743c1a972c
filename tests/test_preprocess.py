"""Preprocessing against independent references (PIL, scikit-image) and the top-k helper."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.transform
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tilemesh.runtime.preprocess import (
    CROP_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocess,
    resize_window,
    resized_size,
    softmax,
    top_k,
)

MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float64)
STD = np.asarray(IMAGENET_STD, dtype=np.float64)


def _normalise(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 values in 0..255 -> 1x3xHxW normalised, computed the slow obvious way in float64."""
    return ((rgb / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]


def _pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    # Mode "F" per channel: PIL's bilinear coefficients without its uint8 rounding between passes.
    channels = [
        np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), "F").resize((width, height), Image.BILINEAR))
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=-1)


images = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1)).map(
    lambda t: np.random.default_rng(t[2]).integers(0, 256, (t[0], t[1], 3), dtype=np.uint8)
)
sizes = st.tuples(st.integers(1, 60), st.integers(1, 60))


@settings(max_examples=60, deadline=None)
@given(images, sizes)
def test_resize_matches_pil_bilinear(image, size):
    ours = resize_window(image, size)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, _pil_resize(image, *size), atol=2e-3)


@settings(max_examples=60, deadline=None)
@given(images, sizes)
def test_resize_without_antialias_matches_skimage(image, size):
    ref = skimage.transform.resize(
        image.astype(np.float64), size, order=1, mode="edge", anti_aliasing=False, preserve_range=True
    )
    np.testing.assert_allclose(resize_window(image, size, antialias=False), ref, atol=2e-3)


@settings(max_examples=40, deadline=None)
@given(images, sizes, st.data())
def test_window_is_a_slice_of_the_full_resize(image, size, data):
    top = data.draw(st.integers(0, size[0] - 1))
    left = data.draw(st.integers(0, size[1] - 1))
    h = data.draw(st.integers(1, size[0] - top))
    w = data.draw(st.integers(1, size[1] - left))
    full = resize_window(image, size)
    np.testing.assert_allclose(resize_window(image, size, top, left, (h, w)), full[top : top + h, left : left + w])


def test_window_outside_output_is_refused():
    with pytest.raises(ValueError, match="outside"):
        resize_window(np.zeros((4, 4, 3), np.uint8), (8, 8), 4, 0, (5, 8))


def test_resized_size_follows_torchvision():
    assert resized_size(300, 451) == (256, 384)
    assert resized_size(451, 300) == (384, 256)
    assert resized_size(100, 100) == (256, 256)
    assert resized_size(480, 640) == (256, 341)


@pytest.mark.parametrize("shape", [(256, 300), (300, 256), (256, 256), (256, 481)])
def test_crop_is_centred_when_no_resize_is_needed(shape):
    # Shorter side already 256: the resize is the identity, so the output is exactly a crop.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    top = round((shape[0] - CROP_SIZE) / 2)
    left = round((shape[1] - CROP_SIZE) / 2)
    expected = _normalise(image[top : top + CROP_SIZE, left : left + CROP_SIZE].astype(np.float64))
    np.testing.assert_allclose(preprocess(image), expected, atol=1e-5)


def test_full_pipeline_matches_pil_resize_then_crop():
    image = np.random.default_rng(2).integers(0, 256, (180, 333, 3), dtype=np.uint8)
    h, w = resized_size(*image.shape[:2])
    resized = _pil_resize(image, h, w).astype(np.float64)
    top, left = round((h - CROP_SIZE) / 2), round((w - CROP_SIZE) / 2)
    expected = _normalise(resized[top : top + CROP_SIZE, left : left + CROP_SIZE])
    out = preprocess(image)
    assert out.shape == (1, 3, CROP_SIZE, CROP_SIZE) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, expected, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 500), (720, 1280)])
def test_constant_image_gives_constant_normalised_channels(shape):
    colour = np.array([200, 17, 99], dtype=np.uint8)
    out = preprocess(np.broadcast_to(colour, shape + (3,)).copy())
    expected = (colour / 255.0 - MEAN) / STD
    for c in range(3):
        np.testing.assert_allclose(out[0, c], expected[c], atol=1e-5)


def test_rgba_alpha_is_ignored():
    rgba = np.random.default_rng(3).integers(0, 256, (240, 320, 4), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess(rgba), preprocess(np.ascontiguousarray(rgba[:, :, :3])))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10, 2), np.uint8),
        np.zeros((0, 10, 3), np.uint8),
    ],
)
def test_bad_images_are_refused(bad):
    with pytest.raises(ValueError):
        preprocess(bad)


def test_softmax_is_stable_for_huge_logits():
    p = softmax(np.array([1e4, 1e4 - 1.0, -1e4]))
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0.0], atol=1e-12)


def test_top_k_orders_by_probability_and_reports_softmax():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(1, 50)).astype(np.float32)
    labels = [f"class{i}" for i in range(50)]
    result = top_k(logits, labels, k=5)
    probs = np.exp(logits[0].astype(np.float64))
    probs /= probs.sum()
    expected = np.argsort(-probs)[:5]
    assert [i for i, _, _ in result] == list(expected)
    assert [label for _, label, _ in result] == [labels[i] for i in expected]
    np.testing.assert_allclose([p for _, _, p in result], probs[expected], rtol=1e-9)


def test_top_k_ties_keep_index_order_and_k_is_capped():
    result = top_k(np.zeros(4), ["a", "b", "c", "d"], k=10)
    assert [(i, label) for i, label, _ in result] == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    assert all(p == pytest.approx(0.25) for _, _, p in result)


def test_top_k_refuses_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        top_k(np.zeros(5), ["a", "b"], k=1)
    with pytest.raises(ValueError):
        top_k(np.zeros(2), ["a", "b"], k=0)


def test_a_crop_sized_frame_is_the_crop_the_browser_drew():
    """camera.js draws the crop's part of the video at the model's input size: such a frame is only normalised,
    and equals the reference pipeline on the 256x256 frame it was cut from (no resampling left for Python)."""
    from tilemesh.runtime.preprocess import IMAGENET, centre_crop_u8, normalize_u8

    frame = np.random.default_rng(3).integers(0, 256, (256, 256, 4), dtype=np.uint8)
    crop = frame[16:240, 16:240]
    assert np.array_equal(centre_crop_u8(crop), centre_crop_u8(frame))
    np.testing.assert_array_equal(IMAGENET.frame_input(crop), normalize_u8(centre_crop_u8(frame)))
    np.testing.assert_allclose(IMAGENET.frame_input(crop), preprocess(frame), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(IMAGENET.frame_input(frame), preprocess(frame))
    with pytest.raises(ValueError, match="or be the 224x224 crop"):
        centre_crop_u8(frame[:230, :230])
