"""Calibrate the early exit: how often a cheap pass on the camera phone may answer alone, and how often it is right.

    .venv/bin/python -m bench.early_exit [--per-photo 40] [--out results/early_exit]

The cheap pass is the served model on a downscaled frame (see `tilemesh.runtime.early_exit`). No labelled data set
can be fetched here, so "right" means "agrees with the full model's top-1 at 224x224", measured on real photos
(scikit-image's and scikit-learn's) under augmentations a phone camera produces: random crops and scales, flips,
brightness changes, blur and an occluding patch. Photos are split in two halves: the threshold is chosen on the
calibration half (the largest whose exits agree >= 97%) and reported on the held-out half too, so the default is
not fitted to the figures it is judged by. Native onnxruntime runs both passes (the decision depends only on the
scores, which every backend reproduces within 1e-4).

    .venv/bin/python -m bench.early_exit --stream [--shots 40] [--shot-frames 30] [--lag 2]

measures the rule a camera stream allows instead: a frame exits when the cheap pass is confident (normalized
entropy <= threshold) AND its top-1 equals the label the room's full model gave a recent frame of the same
stream (results arrive `--lag` frames late, as a pipelined stream's do). The stream is simulated hand-held
video: shots of `--shot-frames` frames of one photo, a crop drifting a little each frame with jitter, a
brightness flicker and occasional blur. Reported per threshold: exit rate, agreement of exits with the full
model on the same frame, overall agreement, and how often the full model itself changes its top-1 between
consecutive frames of a shot (which bounds what any reuse of earlier answers can agree with).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tilemesh.runtime.early_exit import (
    StreamExit,
    calibration_table,
    choose_threshold,
    normalized_entropy,
    room_answer,
    step,
)
from tilemesh.runtime.preprocess import CROP_SIZE, RESIZE_SHORTER, normalize_u8, resize_window

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = [0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
SIZES = (96, 112, 128, 160, 192)
STREAM_SIZES = (112, 128, 160)
STREAM_THRESHOLDS = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
PRODUCT_ALONE, PRODUCT_MAX_RUN = 0.02, 8  # the demo card's early_exit (tilemesh.models.demo)
# Photos of things ImageNet has classes for; the rest are textures, text and micrographs, where the full model's
# own answer is a guess and a camera pointed at them is a hard frame by any measure.
OBJECTS = {"astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "clock", "camera", "china", "flower"}


def photos() -> dict[str, np.ndarray]:
    """Every RGB-able photo shipped inside scikit-image and scikit-learn (no download)."""
    import skimage.data as d  # noqa: PLC0415

    out = {}
    for name in ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field",
                 "immunohistochemistry", "moon", "page", "text", "colorwheel", "logo", "retina", "brick",
                 "grass", "gravel", "clock", "stereo_motorcycle"]:
        im = getattr(d, name)()
        im = im[0] if isinstance(im, tuple) else im
        im = np.asarray(im)
        if im.ndim == 2:
            im = np.repeat(im[:, :, None], 3, axis=2)
        out[name] = np.ascontiguousarray(im[:, :, :3]).astype(np.uint8)
    try:
        from sklearn.datasets import load_sample_images  # noqa: PLC0415

        for fname, im in zip(load_sample_images().filenames, load_sample_images().images, strict=True):
            out[Path(fname).stem] = np.asarray(im, dtype=np.uint8)
    except ImportError:
        print("scikit-learn not installed: its two photos are left out")
    return out


def augment(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One camera-like view: crop (35-100% of the area, aspect 3:4..4:3), flip, brightness, blur, occlusion."""
    from scipy.ndimage import gaussian_filter  # noqa: PLC0415

    h, w = im.shape[:2]
    area = rng.uniform(0.35, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
    cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    out = im[top:top + ch, left:left + cw].astype(np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out *= rng.uniform(0.6, 1.4)
    if rng.random() < 0.4:
        out = gaussian_filter(out, sigma=(rng.uniform(0.5, 2.5),) * 2 + (0,))
    if rng.random() < 0.3:
        oh, ow = int(ch * rng.uniform(0.15, 0.4)), int(cw * rng.uniform(0.15, 0.4))
        oy, ox = rng.integers(0, ch - oh + 1), rng.integers(0, cw - ow + 1)
        out[oy:oy + oh, ox:ox + ow] = rng.uniform(0, 255, 3)
    return np.clip(out, 0, 255).astype(np.uint8)


def model_input(im: np.ndarray, size: int) -> np.ndarray:
    """The frame as the model sees it at `size`: shorter side to size*256/224, centre crop, rounded to uint8 (as
    the browser's canvas delivers it), ImageNet-normalised."""
    shorter = round(size * RESIZE_SHORTER / CROP_SIZE)
    h, w = im.shape[:2]
    oh, ow = (shorter, int(shorter * w / h)) if h <= w else (int(shorter * h / w), shorter)
    top, left = int(round((oh - size) / 2.0)), int(round((ow - size) / 2.0))
    x = np.clip(np.rint(resize_window(im, (oh, ow), top, left, (size, size))), 0, 255).astype(np.uint8)
    return normalize_u8(np.ascontiguousarray(x.transpose(2, 0, 1))[None])


def any_size_session(onnx_path: Path):
    """One onnxruntime session of the model with its input's H and W made free: it runs every input size."""
    import onnx  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    model = onnx.load(str(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    del model.graph.value_info[:]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess


def relative_macs(onnx_path: Path, size: int) -> float:
    """MACs at `size` over MACs at 224, from the IR's own per-node counts."""
    import onnx  # noqa: PLC0415

    from tilemesh.runtime.deps import node_macs  # noqa: PLC0415
    from tilemesh.runtime.graph import load_onnx  # noqa: PLC0415
    from tilemesh.runtime.regions import Region, plane  # noqa: PLC0415

    def total(model) -> int:
        g = load_onnx(model)
        return sum(node_macs(n, g, Region.full(*plane(g.shapes[n.output]))) for n in g.nodes)

    model = onnx.load(str(onnx_path))
    full = total(model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = size
    del model.graph.value_info[:]
    return total(model) / full


def run(per_photo: int, seed: int, onnx_path: Path) -> dict:
    rng = np.random.default_rng(seed)
    ims = photos()
    names = sorted(ims)
    calib = set(names[0::2])
    sess = any_size_session(onnx_path)
    inp = sess.get_inputs()[0].name
    samples = []
    for name in names:
        for k in range(per_photo):
            view = ims[name] if k == 0 else augment(ims[name], rng)
            full = sess.run(None, {inp: model_input(view, CROP_SIZE)})[0][0]
            row = {"photo": name, "calib": name in calib, "full_top1": int(np.argmax(full))}
            for s in SIZES:
                z = sess.run(None, {inp: model_input(view, s)})[0][0]
                row[f"h{s}"] = normalized_entropy(z)
                row[f"top1_{s}"] = int(np.argmax(z))
            samples.append(row)
    result = {"samples": len(samples), "photos": len(names), "per_photo": per_photo, "seed": seed, "sizes": {}}
    for s in SIZES:
        cost = relative_macs(onnx_path, s)
        out = {"relative_macs": cost}
        parts = {"calibration": lambda r: r["calib"], "held_out": lambda r: not r["calib"], "all": lambda r: True,
                 "objects": lambda r: r["photo"] in OBJECTS}
        for part, keep in parts.items():
            sub = [r for r in samples if keep(r)]
            rows = calibration_table([r[f"h{s}"] for r in sub], [r[f"top1_{s}"] == r["full_top1"] for r in sub],
                                     THRESHOLDS, cost)
            out[part] = {"n": len(sub), "rows": [r.__dict__ for r in rows],
                         "cheap_top1_agreement": float(np.mean([r[f"top1_{s}"] == r["full_top1"] for r in sub]))}
        calib_rows = calibration_table([r[f"h{s}"] for r in samples if r["calib"]],
                                       [r[f"top1_{s}"] == r["full_top1"] for r in samples if r["calib"]],
                                       THRESHOLDS, cost)
        out["chosen_threshold"] = choose_threshold(calib_rows, 0.97, min_exits=10, n=out["calibration"]["n"])
        result["sizes"][s] = out
    return result


def shot_frames(im: np.ndarray, rng: np.random.Generator, k: int):
    """`k` frames of one hand-held shot of `im`: a crop (40-100% of the area) drifting slowly with jitter, a
    per-shot brightness with a small flicker, and a 10% chance of blur per frame."""
    from scipy.ndimage import gaussian_filter  # noqa: PLC0415

    h, w = im.shape[:2]
    area = rng.uniform(0.4, 1.0) * h * w
    ch, cw = int(min(h, np.sqrt(area))), int(min(w, np.sqrt(area)))
    top, left = rng.uniform(0, h - ch), rng.uniform(0, w - cw)
    vy, vx = rng.normal(0, 0.004 * h), rng.normal(0, 0.004 * w)
    bright = rng.uniform(0.7, 1.3)
    for _ in range(k):
        top = float(np.clip(top + vy + rng.normal(0, 0.003 * h), 0, h - ch))
        left = float(np.clip(left + vx + rng.normal(0, 0.003 * w), 0, w - cw))
        out = im[int(top):int(top) + ch, int(left):int(left) + cw].astype(np.float32)
        out *= bright * rng.uniform(0.97, 1.03)
        if rng.random() < 0.1:
            out = gaussian_filter(out, sigma=(rng.uniform(0.5, 2.0),) * 2 + (0,))
        yield np.clip(out, 0, 255).astype(np.uint8)


def stream_policy(rows: list[dict], size: int, threshold: float, lag: int, match: bool,
                  alone_threshold: float | None = None, max_run: int = 10**9) -> dict:
    """Replay a stream through the product's exit rule (`early_exit.step`, `room_answer`): with `match`, a frame
    exits only when the cheap pass is confident and names the label of the newest full answer that has arrived
    (`lag` frames after its frame was sent); before any answer, when it is confident to `alone_threshold`
    (default: `threshold`). Without `match`, entropy alone decides (every frame is judged as if no answer came)."""
    alone = threshold if alone_threshold is None else alone_threshold
    state = StreamExit(threshold, alone if match else threshold, max_run)
    wrong = 0
    pending: list[tuple[int, int]] = []  # (frame index at which the answer arrives, label)
    for i, r in enumerate(rows):
        for p in [p for p in pending if p[0] <= i]:
            if match:
                state = room_answer(state, p[1])
            pending.remove(p)
        top, _h = r[size]
        state, d = step(state, r["z"][size])
        assert d.top1 == top
        if d.exit:
            wrong += top != r["full"]
        else:
            pending.append((i + lag, r["full"]))
    n, exits = len(rows), state.exits
    return {"threshold": threshold, "alone_threshold": alone, "max_run": max_run, "exit_rate": exits / n,
            "exit_agreement": 1 - wrong / exits if exits else None, "overall_agreement": 1 - wrong / n}


def run_stream(shots: int, per_shot: int, lag: int, seed: int, onnx_path: Path) -> dict:
    rng = np.random.default_rng(seed)
    ims = photos()
    names = sorted(ims)
    sess = any_size_session(onnx_path)
    inp = sess.get_inputs()[0].name
    rows = []
    for shot in range(shots):
        for frame in shot_frames(ims[names[rng.integers(len(names))]], rng, per_shot):
            r = {"shot": shot, "full": int(np.argmax(sess.run(None, {inp: model_input(frame, CROP_SIZE)})[0][0]))}
            for s in STREAM_SIZES:
                z = sess.run(None, {inp: model_input(frame, s)})[0][0]
                r[s] = (int(np.argmax(z)), normalized_entropy(z))
                r.setdefault("z", {})[s] = z
            rows.append(r)
    flicker = np.mean([a["full"] != b["full"] for a, b in zip(rows, rows[1:], strict=False) if a["shot"] == b["shot"]])
    out = {"frames": len(rows), "shots": shots, "per_shot": per_shot, "lag": lag, "seed": seed,
           "full_label_changes": float(flicker), "sizes": {}}
    for s in STREAM_SIZES:
        out["sizes"][s] = {"relative_macs": relative_macs(onnx_path, s),
                           "match": [stream_policy(rows, s, t, lag, True, 0.0) for t in STREAM_THRESHOLDS],
                           # the rule as the product runs it (the demo card's alone_threshold and max_run)
                           "product": [stream_policy(rows, s, t, lag, True, PRODUCT_ALONE, PRODUCT_MAX_RUN)
                                       for t in STREAM_THRESHOLDS],
                           "entropy_only": [stream_policy(rows, s, t, lag, False) for t in STREAM_THRESHOLDS]}
    return out


def stream_table(result: dict) -> str:
    lines = [f"Stream early exit: {result['frames']} frames, {result['shots']} shots of {result['per_shot']}, "
             f"answers {result['lag']} frames late; the full model changes its top-1 between consecutive frames "
             f"of a shot {result['full_label_changes']:.1%} of the time", "",
             "rules: match = confident AND names the room's latest answer (no exit before the first answer); product = "
             f"match, plus exits before any answer at entropy <= {PRODUCT_ALONE}, at most {PRODUCT_MAX_RUN} exits "
             "in a row; entropy only = confident", "",
             "| cheap pass | rule | threshold | exit rate | exits agree | overall agree |", "|---|---|---|---|---|---|"]
    for s, out in result["sizes"].items():
        for rule in ("match", "product", "entropy_only"):
            for r in out[rule]:
                agree = f"{r['exit_agreement']:.1%}" if r["exit_agreement"] is not None else "-"
                lines.append(f"| {s}px ({out['relative_macs']:.2f}x MACs) | {rule.replace('_', ' ')} | "
                             f"{r['threshold']:.2f} | {r['exit_rate']:.1%} | {agree} | {r['overall_agreement']:.1%} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = []
    for s, out in result["sizes"].items():
        t = out["chosen_threshold"]
        lines.append(f"\n### cheap pass at {s}x{s} ({out['relative_macs']:.2f}x the MACs of 224x224); "
                     f"top-1 agreement without exit rule: {out['all']['cheap_top1_agreement']:.1%}; "
                     f"threshold chosen on the calibration half: {t}\n")
        lines.append("| threshold | exit rate (held out) | exits agree (held out) | overall agree (held out) "
                     "| compute vs full (held out) | exit rate (calib) | exits agree (calib) "
                     "| exit rate (objects) | exits agree (objects) |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        rows = zip(out["held_out"]["rows"], out["calibration"]["rows"], out["objects"]["rows"], strict=True)
        for h, c, o in rows:
            mark = " **(default)**" if h["threshold"] == t else ""
            lines.append(f"| {h['threshold']:.3f}{mark} | {h['exit_rate']:.1%} | {h['exit_agreement']:.1%} | "
                         f"{h['overall_agreement']:.1%} | {h['relative_cost']:.2f}x | {c['exit_rate']:.1%} | "
                         f"{c['exit_agreement']:.1%} | {o['exit_rate']:.1%} | {o['exit_agreement']:.1%} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, out in result["sizes"].items():
        rows = out["held_out"]["rows"]
        ax.plot([r["exit_rate"] for r in rows], [r["exit_agreement"] for r in rows], marker=".", label=f"{s}x{s}")
    ax.axhline(0.97, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("exit rate (frames answered on the phone alone)")
    ax.set_ylabel("exits agreeing with the full model")
    ax.set_title("Early exit on held-out photos (threshold swept 0..0.5)")
    ax.legend(title="cheap pass input")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-photo", type=int, default=40, help="views per photo (the first is the photo itself)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=str(REPO / "static" / "model" / "mobilenet_v2.onnx"))
    ap.add_argument("--out", default=str(REPO / "results" / "early_exit"))
    ap.add_argument("--stream", action="store_true", help="the stream rule on simulated hand-held shots (see above)")
    ap.add_argument("--shots", type=int, default=40)
    ap.add_argument("--shot-frames", type=int, default=30)
    ap.add_argument("--lag", type=int, default=2, help="frames between sending a frame and its answer arriving")
    args = ap.parse_args(argv)
    if args.stream:
        result = run_stream(args.shots, args.shot_frames, args.lag, args.seed, Path(args.model))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stream.json").write_text(json.dumps(result, indent=1))
        md = stream_table(result)
        (out / "stream.md").write_text(md + "\n")
        print(md)
        return 0
    result = run(args.per_photo, args.seed, Path(args.model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(result, indent=1))
    md = (f"Early-exit calibration: {result['samples']} views of {result['photos']} photos "
          f"({result['per_photo']} each, seed {result['seed']})\n" + table(result))
    (out / "calibration.md").write_text(md + "\n")
    plot(result, out / "exit_rate_vs_agreement.png")
    print(md)
    print(f"\nwrote {out}/calibration.md, calibration.json, exit_rate_vs_agreement.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
