"""The model card: what `tilemesh serve --model FILE.onnx` needs to know beside the graph (standard library only).

It is `FILE.json` next to `FILE.onnx`:

    {
      "name": "MobileNetV2 (ImageNet-1k)",          # shown on the pages (default: the file's stem)
      "labels": "labels.json",                       # a JSON list of class names, or {"0": name, ...}: a file
                                                     # relative to the card, or the list itself inline
      "preprocess": {                                # how a camera frame becomes the input tensor
        "resize_shorter_side": 256,                  # scale the frame's shorter side to this (default: crop)
        "crop": 224,                                 # then take the centre crop x crop (default: the input's size)
        "mean": [0.485, 0.456, 0.406],               # per RGB channel, on pixels scaled to [0, 1] (default 0)
        "std": [0.229, 0.224, 0.225]                 # (default 1): x = (pixel / 255 - mean) / std
      },
      "variants": {                                  # optional: the same weights at other input sizes (a fully
        "heavy": {                                   # convolutional body up to a global pool takes any size);
          "name": "Heavy (448 px)",                  # the AR page offers each one, the room plans on its graph
          "input": 448,                              # the variant's square input (its crop)
          "resize_shorter_side": 512,                # frames' shorter side for it (default: input)
          "agreement": 0.7                           # optional: measured top-1 agreement with the model as
        }                                            # served; a variant with it joins automatic scaling
      },
      "early_exit": {                                # optional: the camera phone's cheap pass (one variant)
        "variant": "fast160",                        # which variant is the cheap pass
        "threshold": 0.2,                            # normalized entropy at most this AND the room's latest
        "alone_threshold": 0.02,                     # answer named; at most this when no answer is known yet
        "max_run": 8                                 # ask the room at least every max_run frames
      }
    }

The model takes one NCHW float32 RGB input of a fixed square size and gives one row of class scores (logits)
per frame; the card is checked against the graph (crop == input size, one label per class) when it is loaded,
and every mistake is an error naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


class CardError(ValueError):
    """The model card is missing, malformed or does not fit the model; the message says which field."""


@dataclass(frozen=True)
class Preprocess:
    resize_shorter_side: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class Variant:
    """The model's weights at another input size: `key` names it on the wire, `name` on the pages."""

    key: str
    name: str
    preprocess: Preprocess
    agreement: float | None = None  # measured top-1 agreement with the model as served (None: not scalable)


@dataclass(frozen=True)
class EarlyExit:
    """The camera phone's cheap pass (`tilemesh.runtime.early_exit`): a variant and its calibrated thresholds."""

    variant: str
    threshold: float
    alone_threshold: float
    max_run: int


@dataclass(frozen=True)
class ModelCard:
    name: str
    labels: tuple[str, ...]
    preprocess: Preprocess
    variants: tuple[Variant, ...] = ()
    early_exit: EarlyExit | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["variants"] = {v.key: {"name": v.name, "preprocess": asdict(v.preprocess),
                                 **({"agreement": v.agreement} if v.agreement is not None else {})}
                         for v in self.variants}
        d["early_exit"] = asdict(self.early_exit) if self.early_exit else None
        return d

    def variant(self, key: str | None) -> Variant | None:
        """The variant named `key` (None: the model as it is); raises CardError for an unknown key."""
        if key is None:
            return None
        for v in self.variants:
            if v.key == key:
                return v
        raise CardError(f"the model has no variant {key!r} (its variants: {[v.key for v in self.variants]})")


def card_path(model: str | Path) -> Path:
    return Path(model).with_suffix(".json")


def load_card(model: str | Path, input_shape: tuple[int, ...], classes: int) -> ModelCard:
    """The card next to `model` (an .onnx path), checked against the model's input shape and class count."""
    path = card_path(model)
    if not path.is_file():
        raise CardError(f"no model card {path}: write one beside {Path(model).name} (fields in tilemesh.models.card)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"{path}: not readable JSON: {exc}") from None
    return parse_card(raw, path, input_shape, classes, default_name=Path(model).stem)


def parse_card(raw, path: Path, input_shape, classes: int, default_name: str = "model") -> ModelCard:
    if not isinstance(raw, dict):
        raise CardError(f"{path}: a model card is a JSON object")
    if raw.get("output", "logits") != "logits":
        raise CardError(f"{path}: the model outputs a {raw['output']!r}, not class scores: tilemesh serve shows "
                        "classifiers (one row of logits per frame)")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise CardError(f"{path}: 'name' must be a non-empty string")
    labels = _labels(raw.get("labels"), path)
    if len(labels) != classes:
        raise CardError(f"{path}: 'labels' has {len(labels)} names but the model has {classes} classes")
    if len(input_shape) != 4 or input_shape[0] != 1 or input_shape[1] != 3 or input_shape[2] != input_shape[3]:
        raise CardError(f"{path}: the model's input {tuple(input_shape)} is not one square RGB image (1, 3, S, S)")
    size = int(input_shape[2])
    pre = raw.get("preprocess", {})
    if not isinstance(pre, dict):
        raise CardError(f"{path}: 'preprocess' must be an object")
    unknown = set(pre) - {"resize_shorter_side", "crop", "mean", "std"}
    if unknown:
        raise CardError(f"{path}: unknown 'preprocess' fields {sorted(unknown)}")
    crop = _int(pre.get("crop", size), "preprocess.crop", path)
    if crop != size:
        raise CardError(f"{path}: 'preprocess.crop' is {crop} but the model's input is {size}x{size}")
    shorter = _int(pre.get("resize_shorter_side", crop), "preprocess.resize_shorter_side", path)
    if not crop <= shorter <= 4096:
        raise CardError(f"{path}: 'preprocess.resize_shorter_side' must lie in {crop}..4096")
    mean = _triple(pre.get("mean", (0.0, 0.0, 0.0)), "preprocess.mean", path)
    std = _triple(pre.get("std", (1.0, 1.0, 1.0)), "preprocess.std", path)
    if min(std) <= 0:
        raise CardError(f"{path}: 'preprocess.std' must be positive")
    variants = _variants(raw.get("variants", {}), path, mean, std)
    return ModelCard(name.strip(), labels, Preprocess(shorter, crop, mean, std), variants,
                     _early_exit(raw.get("early_exit"), path, variants))


def _fraction(value, field: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise CardError(f"{path}: '{field}' must be a number in 0..1")
    return float(value)


def _early_exit(value, path: Path, variants: tuple[Variant, ...]) -> EarlyExit | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CardError(f"{path}: 'early_exit' must be an object")
    unknown = set(value) - {"variant", "threshold", "alone_threshold", "max_run"}
    if unknown:
        raise CardError(f"{path}: unknown 'early_exit' fields {sorted(unknown)}")
    key = value.get("variant")
    if key not in {v.key for v in variants}:
        raise CardError(f"{path}: 'early_exit.variant' must name one of the card's variants "
                        f"({[v.key for v in variants]}), got {key!r}")
    threshold = _fraction(value.get("threshold"), "early_exit.threshold", path)
    alone = _fraction(value.get("alone_threshold", 0.0), "early_exit.alone_threshold", path)
    max_run = _int(value.get("max_run", 8), "early_exit.max_run", path)
    return EarlyExit(key, threshold, alone, max_run)


MAX_VARIANTS = 4
MAX_VARIANT_INPUT = 1024


def _variants(value, path: Path, mean, std) -> tuple[Variant, ...]:
    if not isinstance(value, dict) or len(value) > MAX_VARIANTS:
        raise CardError(f"{path}: 'variants' must be an object of at most {MAX_VARIANTS} variants")
    out = []
    for key, v in value.items():
        where = f"variants.{key}"
        if not (isinstance(key, str) and 0 < len(key) <= 32 and key.replace("_", "").replace("-", "").isalnum()
                and key.isascii()):
            raise CardError(f"{path}: variant names are 1-32 letters, digits, '-' or '_', got {key!r}")
        if not isinstance(v, dict):
            raise CardError(f"{path}: '{where}' must be an object")
        unknown = set(v) - {"name", "input", "resize_shorter_side", "agreement"}
        if unknown:
            raise CardError(f"{path}: unknown '{where}' fields {sorted(unknown)}")
        name = v.get("name", key)
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise CardError(f"{path}: '{where}.name' must be a non-empty string")
        size = _int(v.get("input"), f"{where}.input", path)
        if size > MAX_VARIANT_INPUT:
            raise CardError(f"{path}: '{where}.input' must be at most {MAX_VARIANT_INPUT}")
        shorter = _int(v.get("resize_shorter_side", size), f"{where}.resize_shorter_side", path)
        if not size <= shorter <= 4096:
            raise CardError(f"{path}: '{where}.resize_shorter_side' must lie in {size}..4096")
        agreement = _fraction(v["agreement"], f"{where}.agreement", path) if "agreement" in v else None
        out.append(Variant(key, name.strip(), Preprocess(shorter, size, mean, std), agreement))
    return tuple(out)


def _labels(value, path: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        file = path.parent / value
        try:
            value = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CardError(f"{path}: 'labels' file {file} not readable JSON: {exc}") from None
    if isinstance(value, dict):
        if set(value) != {str(i) for i in range(len(value))}:
            raise CardError(f"{path}: 'labels' as an object must map '0'..'{len(value) - 1}' to names")
        value = [value[str(i)] for i in range(len(value))]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise CardError(f"{path}: 'labels' must be a list of names (or a file holding one)")
    return tuple(value)


def _int(value, field: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CardError(f"{path}: '{field}' must be a positive integer")
    return value


def _triple(value, field: str, path: Path) -> tuple[float, float, float]:
    ok = isinstance(value, list | tuple) and len(value) == 3 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        raise CardError(f"{path}: '{field}' must be three numbers (R, G, B)")
    return tuple(float(v) for v in value)
