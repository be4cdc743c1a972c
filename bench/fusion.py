"""How much multi-view fusion helps: several phones see the same object, each from its own crop, scale, mirror,
exposure and occlusion; is the fused label the one the model gives the clean photo more often than one view's?

    .venv/bin/python -m bench.fusion [--scenes 60] [--views 4]

For each photo of an object (scikit-image's and scikit-learn's photos of things ImageNet has classes for), the
reference label is the full model's top-1 on the clean photo. A scene is V views made by independent camera-like
augmentations (`bench.early_exit.augment`, plus a harder occlusion); each view is classified by the served model
(native onnxruntime: the scores equal every backend's within 1e-4), then fused by averaging or taking the maximum
of the views' softmax vectors (`tilemesh.runtime.fusion`, the rule the fusion room runs). Printed, for 1..V views of
the same scenes: how often one view, the most confident view, the average fusion, the max fusion and "some view"
(an oracle) agree with the reference, overall and per photo; and what fusing costs per frame.
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


def run(scenes: int, max_views: int, seed: int, onnx_path: Path) -> dict:
    """Each scene draws `max_views` views once; the V-view rows (V = 1..max_views) fuse its first V views, so every
    row is scored on the same views (paired). Columns: the first view alone, the most confident of the V views
    alone (the obvious rule without fusion), average and max fusion, and an oracle (some view is right)."""
    rng = np.random.default_rng(seed)
    ims = {k: v for k, v in photos().items() if k in OBJECTS}
    sess = any_size_session(onnx_path)
    inp = sess.get_inputs()[0].name

    def probs(im):
        return softmax(sess.run(None, {inp: model_input(im, CROP_SIZE)})[0][0])

    keys = ("single", "confident", "avg", "max", "oracle")
    counts = {v: {name: dict.fromkeys(keys, 0) for name in ims} for v in range(1, max_views + 1)}
    for name, im in sorted(ims.items()):
        ref = int(np.argmax(probs(im)))
        for _ in range(scenes):
            views = []
            for _v in range(max_views):
                view = augment(im, rng)
                if rng.random() < 0.5:
                    view = occlude(view, rng)
                views.append(probs(view))
            for n in range(1, max_views + 1):
                some = {f"v{i}": views[i] for i in range(n)}
                c = counts[n][name]
                c["single"] += int(np.argmax(views[0]) == ref)
                c["confident"] += int(np.argmax(max(views[:n], key=lambda q: float(q.max()))) == ref)
                c["avg"] += int(np.argmax(fuse(some, "avg")) == ref)
                c["max"] += int(np.argmax(fuse(some, "max")) == ref)
                c["oracle"] += int(any(int(np.argmax(q)) == ref for q in views[:n]))
    rows = {}
    for n, per in counts.items():
        per_photo = {name: {k: c[k] / scenes for k in keys} for name, c in per.items()}
        rows[n] = {"per_photo": per_photo,
                   "overall": {k: float(np.mean([p[k] for p in per_photo.values()])) for k in keys}}
    return {"scenes": scenes, "views": max_views, "seed": seed, "photos": sorted(ims), "rows": rows,
            "cost": fusion_cost(len(probs(next(iter(ims.values()))).reshape(-1)), max_views)}


def fusion_cost(classes: int, max_views: int, repeats: int = 2000) -> dict:
    """What fusing costs per frame, as the server runs it: the bytes one view sends (its `view` message with the
    encoded scores) and the milliseconds to decode those scores, add them to the room's window and fuse up to
    `max_views` views (median over `repeats`)."""
    import time  # noqa: PLC0415

    from tilemesh.runtime.fusion import FusionWindow, decode_scores, encode_scores  # noqa: PLC0415
    from tilemesh.server.signaling import protocol, rooms  # noqa: PLC0415
    from tilemesh.server.signaling.ids import PeerId, ResumeToken, RoomId  # noqa: PLC0415

    rng = np.random.default_rng(0)
    logits = [rng.normal(0, 3, classes).astype(np.float32) for _ in range(max_views)]
    message = protocol.encode({"v": protocol.VERSION, "type": "view", "scores": encode_scores(logits[0])})
    window = FusionWindow(window_s=1.0)
    for i in range(max_views):
        window = window.add(f"v{i}", 0.0, logits[i])
    times, encode = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        text = encode_scores(logits[r % max_views])
        t1 = time.perf_counter()
        z = decode_scores(text)
        w = window.add(f"v{r % max_views}", 0.0, z)
        w.result(0.0, "avg")
        times.append(time.perf_counter() - t1)
        encode.append(t1 - t0)
    # The answer every member of the room gets per accepted view: the room state's own `fused` message.
    room_id = RoomId.new()
    state = rooms.open_room(rooms.Rooms(labels=tuple(f"class {i} with a name" for i in range(classes))), room_id, 0.0,
                            protocol.FusionMode())
    effects = []
    for i in range(max_views):
        peer = rooms.Member(id=PeerId.new(), name=f"Phone {i:04x}", kind="phone", token=ResumeToken.new(),
                            joined_at=0.0)
        state = rooms.add_peer(state, room_id, peer)
        state, effects = rooms.add_view(state, room_id, peer.id, logits[i], 0.0)
    fused_bytes = len(protocol.encode(effects[-1].message).encode())
    return {"classes": classes, "view_message_bytes": len(message.encode()), "views": max_views,
            "fuse_ms": float(np.median(times) * 1e3), "encode_ms": float(np.median(encode) * 1e3),
            "fused_message_bytes": fused_bytes}


def table(result: dict) -> str:
    rows = result["rows"]
    lines = [f"Fusion of 1-{result['views']} views, {result['scenes']} scenes per photo, {len(result['photos'])} "
             f"photos (seed {result['seed']}): top-1 agreement with the model's answer on the clean photo", "",
             "| views | one view | most confident view | average of softmax | max of softmax | some view right "
             "(oracle) |", "|---|---|---|---|---|---|"]
    for n, row in rows.items():
        o = row["overall"]
        lines.append(f"| {n} | {o['single']:.1%} | {o['confident']:.1%} | {o['avg']:.1%} | {o['max']:.1%} | "
                     f"{o['oracle']:.1%} |")
    n = max(rows)
    lines += ["", f"Per photo, {n} views:", "", "| photo | one view | most confident | average | max |",
              "|---|---|---|---|---|"]
    for name, p in rows[n]["per_photo"].items():
        lines.append(f"| {name} | {p['single']:.1%} | {p['confident']:.1%} | {p['avg']:.1%} | {p['max']:.1%} |")
    c = result["cost"]
    lines += ["", f"Cost per frame: one view's `view` message {c['view_message_bytes']} bytes ({c['classes']} "
              f"float32 scores, base64; encoding them {c['encode_ms']:.3f} ms in CPython); decoding it, updating the "
              f"window and fusing {c['views']} views {c['fuse_ms']:.3f} ms (server, CPython, median); the `fused` "
              f"answer to each member of the room {c['fused_message_bytes']} bytes."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=60)
    ap.add_argument("--views", type=int, default=4, help="rows for 1..this many views")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=str(REPO / "static" / "model" / "mobilenet_v2.onnx"))
    ap.add_argument("--out", default=str(REPO / "results" / "fusion"))
    args = ap.parse_args(argv)
    result = run(args.scenes, args.views, args.seed, Path(args.model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (out / "fusion.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
