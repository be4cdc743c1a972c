"""Image preprocessing for the demo model and a top-k helper; pure numpy (runs in Pyodide).

``preprocess(image)`` turns an HxWx3 (or HxWx4 canvas RGBA, alpha dropped) uint8 RGB image into
the (1, 3, 224, 224) float32 NCHW tensor torchvision's ImageNet models expect:

1. resize so the shorter side is 256, the longer ``int(256 * long / short)`` (torchvision's rule);
2. centre crop 224x224 (offsets ``round((size - 224) / 2)``, as torchvision);
3. scale to [0, 1] and normalise with the ImageNet mean and std.

The resize is separable bilinear filtering with half-pixel centres and PIL's coefficients: the
output pixel i is centred at ``(i + 0.5) * in / out`` in source coordinates. With
``antialias=True`` (the default, matching torchvision's PIL pipeline and ``antialias=True``) the
triangle filter widens by the scale factor when downscaling, so a large camera frame is averaged
rather than sampled. With ``antialias=False`` it is plain bilinear interpolation, the sample point
clamped to the image (PyTorch ``interpolate(align_corners=False)``, scikit-image ``resize(order=1,
anti_aliasing=False, mode='edge')``). Only rows and columns inside the crop are computed, in float32,
without the uint8 rounding PIL does between its two passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESIZE_SHORTER = 256
CROP_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (v / 255 - mean) / std == v * _SCALE + _OFFSET: one multiply-add per element.
_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD))).astype(np.float32)
_OFFSET = (-np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD)).astype(np.float32)


def resized_size(height: int, width: int, shorter: int = RESIZE_SHORTER) -> tuple[int, int]:
    """Output (height, width) when the shorter side becomes ``shorter`` (torchvision's rounding)."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


def _axis_taps(n_in: int, n_out: int, start: int, count: int, antialias: bool):
    """Source indices (count, K) and weights (count, K) for output positions start..start+count.

    PIL's bilinear coefficients: a triangle filter centred on ``(i + 0.5) * in / out`` in
    continuous coordinates, widened by the scale factor when downscaling with ``antialias``, cut
    at the image edges and renormalised. At width 1 this is exactly half-pixel-centre bilinear
    interpolation with the sample position clamped to the image.
    """
    scale = n_in / n_out
    width = max(scale, 1.0) if antialias else 1.0
    centre = (np.arange(start, start + count, dtype=np.float64) + 0.5) * scale
    lo = np.maximum(np.floor(centre - width + 0.5).astype(np.intp), 0)
    hi = np.minimum(np.floor(centre + width + 0.5).astype(np.intp), n_in)
    taps = int((hi - lo).max())
    idx = lo[:, None] + np.arange(taps)[None, :]
    weight = _triangle((idx + 0.5 - centre[:, None]) / width)
    weight[idx >= hi[:, None]] = 0.0
    weight /= weight.sum(axis=1, keepdims=True)
    return np.minimum(idx, n_in - 1), weight.astype(np.float32)


def _filter_axis0(image: np.ndarray, idx: np.ndarray, weight: np.ndarray) -> np.ndarray:
    # One gather per tap (K is 2 when upscaling, about 2 * scale + 1 when downscaling): memory stays
    # at one output-sized buffer instead of a (count, K, ...) intermediate.
    shape = (-1,) + (1,) * (image.ndim - 1)
    out = image[idx[:, 0]].astype(np.float32) * weight[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):
        out += image[idx[:, k]] * weight[:, k].reshape(shape)
    return out


def resize_window(
    image: np.ndarray,
    out_shape: tuple[int, int],
    top: int = 0,
    left: int = 0,
    size: tuple[int, int] | None = None,
    *,
    antialias: bool = True,
) -> np.ndarray:
    """Bilinear resize of an HxWxC image to ``out_shape``, returning only the window
    ``[top:top+h, left:left+w]`` of the result (``size=(h, w)``, default the whole image), float32.
    """
    in_h, in_w = image.shape[:2]
    out_h, out_w = out_shape
    h, w = (out_h, out_w) if size is None else size
    if top < 0 or left < 0 or top + h > out_h or left + w > out_w:
        raise ValueError(f"window {h}x{w} at ({top}, {left}) is outside the {out_h}x{out_w} output")
    # Rows first: the column pass then only touches the h selected rows, whatever the source height.
    rows = _filter_axis0(image, *_axis_taps(in_h, out_h, top, h, antialias))
    cols = _filter_axis0(rows.swapaxes(0, 1), *_axis_taps(in_w, out_w, left, w, antialias))
    return cols.swapaxes(0, 1)


def preprocess(image: np.ndarray, *, antialias: bool = True, pre: Preprocessing | None = None) -> np.ndarray:
    """HxWx3 (or HxWx4) uint8 RGB image -> (1, 3, crop, crop) float32, normalised (default: 224, ImageNet)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 (or HxWx4) uint8 image, got {image.dtype} {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: {image.shape}")
    image = image[:, :, :3]
    size = CROP_SIZE if pre is None else pre.crop
    out_h, out_w = resized_size(image.shape[0], image.shape[1], RESIZE_SHORTER if pre is None else
                                pre.resize_shorter_side)
    # Python's round, like torchvision's CenterCrop (halves round to even).
    top = int(round((out_h - size) / 2.0))
    left = int(round((out_w - size) / 2.0))
    crop = resize_window(image, (out_h, out_w), top, left, (size, size), antialias=antialias)
    scale, offset = (_SCALE, _OFFSET) if pre is None else pre._affine()
    crop *= scale
    crop += offset
    return np.ascontiguousarray(crop.transpose(2, 0, 1))[None]


def centre_crop_u8(frame: np.ndarray, *, pre: Preprocessing | None = None) -> np.ndarray:
    """A camera frame already scaled so its shorter side is 256 -> the (1, 3, 224, 224) uint8 centre crop (or
    `pre`'s sizes). A frame of exactly the crop's size is taken as the crop (the browser draws the crop's part
    of the video at the model's input size), so only its layout changes.

    The browser scales frames on a canvas, so no resampling is left to do: the crop is exactly what
    `preprocess` would feed the network, kept in uint8 so that sending it to other devices costs a quarter of
    float32. `normalize_u8` then gives bit-identical values to `preprocess`.
    """
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 (or HxWx4) uint8 frame, got {frame.dtype} {frame.shape}")
    shorter, size = (RESIZE_SHORTER, CROP_SIZE) if pre is None else (pre.resize_shorter_side, pre.crop)
    if frame.shape[:2] == (size, size):  # the browser scaled and cropped it already (camera.js grabFrame)
        return np.ascontiguousarray(frame[:, :, :3].transpose(2, 0, 1))[None]
    if min(frame.shape[:2]) != shorter:
        raise ValueError(f"frame {frame.shape[:2]} must have its shorter side scaled to {shorter}, "
                         f"or be the {size}x{size} crop")
    top = int(round((frame.shape[0] - size) / 2.0))
    left = int(round((frame.shape[1] - size) / 2.0))
    crop = frame[top:top + size, left:left + size, :3]
    return np.ascontiguousarray(crop.transpose(2, 0, 1))[None]


def normalize_u8(x: np.ndarray) -> np.ndarray:
    """(1, 3, h, w) uint8 -> float32 normalised like `preprocess` (same float32 operations, same bits)."""
    out = x.astype(np.float32)
    out *= _SCALE[:, None, None]
    out += _OFFSET[:, None, None]
    return out


@dataclass(frozen=True)
class Preprocessing:
    """One model's preprocessing, from its card (`tilemesh.models.card`): frames have their shorter side scaled to
    `resize_shorter_side` (the browser does that on a canvas), then the centre `crop` x `crop` is taken and
    normalised as (pixel / 255 - mean) / std. The default is the ImageNet recipe the module functions use."""

    resize_shorter_side: int = RESIZE_SHORTER
    crop: int = CROP_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_card(cls, card: dict | None) -> Preprocessing:
        """From a card's `preprocess` object (as the served `card.json` holds it, already checked)."""
        pre = (card or {}).get("preprocess") or {}
        return cls(int(pre.get("resize_shorter_side", RESIZE_SHORTER)), int(pre.get("crop", CROP_SIZE)),
                   tuple(float(v) for v in pre.get("mean", IMAGENET_MEAN)),
                   tuple(float(v) for v in pre.get("std", IMAGENET_STD)))

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        scale = (1.0 / (255.0 * np.asarray(self.std))).astype(np.float32)
        offset = (-np.asarray(self.mean) / np.asarray(self.std)).astype(np.float32)
        return scale, offset

    def preprocess(self, image: np.ndarray, *, antialias: bool = True) -> np.ndarray:
        return preprocess(image, antialias=antialias, pre=self)

    def frame_input(self, frame: np.ndarray) -> np.ndarray:
        """A frame from the browser -> the model input: a crop-sized frame (the browser scaled and cropped it)
        is only normalised; any other image gets the whole reference `preprocess` (resize, crop, normalise)."""
        frame = np.asarray(frame)
        if frame.ndim == 3 and frame.shape[:2] == (self.crop, self.crop):
            return self.normalize_u8(self.centre_crop_u8(frame))
        return self.preprocess(frame)

    def centre_crop_u8(self, frame: np.ndarray) -> np.ndarray:
        return centre_crop_u8(frame, pre=self)

    def normalize_u8(self, x: np.ndarray) -> np.ndarray:
        scale, offset = self._affine()
        out = x.astype(np.float32)
        out *= scale[:, None, None]
        out += offset[:, None, None]
        return out


IMAGENET = Preprocessing()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, labels: Sequence[str], k: int = 5) -> list[tuple[int, str, float]]:
    """The ``k`` most probable classes of one image as (index, label, softmax probability), best first.

    ``logits`` has shape (N,) or (1, N) with ``len(labels) == N``; equal probabilities keep index order.
    """
    z = np.asarray(logits)
    if z.ndim == 2 and z.shape[0] == 1:
        z = z[0]
    if z.ndim != 1 or z.shape[0] != len(labels):
        raise ValueError(f"logits of shape {np.shape(logits)} do not match {len(labels)} labels")
    if k < 1:
        raise ValueError("k must be at least 1")
    p = softmax(z)
    order = np.argsort(-p, kind="stable")[: min(k, p.shape[0])]
    return [(int(i), labels[i], float(p[i])) for i in order]
