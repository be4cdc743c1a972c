"""How much multi-view fusion helps: several phones see the same object, each from its own crop, scale, mirror,
exposure and occlusion; is the fused label the one the model gives the clean photo more often than one view's?

    .venv/bin/python -m bench.fusion [--scenes 60] [--views 3]

For each photo of an object (scikit-image's and scikit-learn's photos of things ImageNet has classes for), the
reference label is the full model's top-1 on the clean photo. A scene is V views made by independent camera-like
augmentations (`bench.early_exit.augment`, plus a harder occlusion); each view is classified by the served model
(native onnxruntime: the scores equal every backend's within 1e-4), then fused by averaging or taking the maximum
of the views' softmax vectors (`tilemesh.runtime.fusion`). Printed: how often one view, the average fusion and the
max fusion agree with the reference, per photo and overall.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.early_exit import OBJECTS, any_size_session, augment, model_input, photos
from tilemesh.runtime.fusion import fuse
from tilemesh.runtime.preprocess import CROP_SIZE, softmax

REPO = Path(__file__).resolve().parents[1]


def occlude(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A hand or another object in front of the camera: a flat patch over 20-45% of one side."""
    out = im.copy()
    h, w = out.shape[:2]
    if rng.random() < 0.5:
        oh = int(h * rng.uniform(0.2, 0.45))
        top = 0 if rng.random() < 0.5 else h - oh
        out[top:top + oh] = rng.integers(0, 256, 3, dtype=np.uint8)
    else:
        ow = int(w * rng.uniform(0.2, 0.45))
        left = 0 if rng.random() < 0.5 else w - ow
        out[:, left:left + ow] = rng.integers(0, 256, 3, dtype=np.uint8)
    return out


def run(scenes: int, n_views: int, seed: int, onnx_path: Path) -> dict:
    rng = np.random.default_rng(seed)
    ims = {k: v for k, v in photos().items() if k in OBJECTS}
    sess = any_size_session(onnx_path)
    inp = sess.get_inputs()[0].name

    def probs(im):
        return softmax(sess.run(None, {inp: model_input(im, CROP_SIZE)})[0][0])

    per_photo = {}
    for name, im in sorted(ims.items()):
        ref = int(np.argmax(probs(im)))
        single = avg = mx = 0
        for _ in range(scenes):
            views = {}
            for v in range(n_views):
                view = augment(im, rng)
                if rng.random() < 0.5:
                    view = occlude(view, rng)
                views[f"v{v}"] = probs(view)
            single += int(np.argmax(views["v0"]) == ref)
            avg += int(np.argmax(fuse(views, "avg")) == ref)
            mx += int(np.argmax(fuse(views, "max")) == ref)
        per_photo[name] = {"single": single / scenes, "avg": avg / scenes, "max": mx / scenes}
    overall = {k: float(np.mean([p[k] for p in per_photo.values()])) for k in ("single", "avg", "max")}
    return {"scenes": scenes, "views": n_views, "seed": seed, "per_photo": per_photo, "overall": overall}


def table(result: dict) -> str:
    lines = [f"Fusion of {result['views']} views, {result['scenes']} scenes per photo (seed {result['seed']}): "
             "top-1 agreement with the model's answer on the clean photo", "",
             "| photo | one view | average of softmax | max of softmax |", "|---|---|---|---|"]
    for name, p in [*result["per_photo"].items(), ("**all photos**", result["overall"])]:
        lines.append(f"| {name} | {p['single']:.1%} | {p['avg']:.1%} | {p['max']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=60)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=str(REPO / "static" / "model" / "mobilenet_v2.onnx"))
    ap.add_argument("--out", default=str(REPO / "results" / "fusion"))
    args = ap.parse_args(argv)
    result = run(args.scenes, args.views, args.seed, Path(args.model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fusion_{args.views}views.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (out / f"fusion_{args.views}views.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
