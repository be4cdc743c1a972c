"""The model the server serves (`tilemesh serve --model FILE.onnx`; default: the demo model `tilemesh setup` built).

At startup the ONNX file and its model card (`tilemesh.models.card`) become a bundle in
`<static>/models/<sha256 of the ONNX, 16 hex>/`: the compact form Pyodide loads (`graph.json` + `graph.bin`),
`labels.json`, `card.json` (the checked card plus a summary of the graph) and `model.onnx` itself. Browsers get
them under fixed names at `/model/<file>`, so no page or script names a model; the planner, the edge peer and
the pages all read the same bundle. A second start with the same files converts nothing.

`whole.onnx` is the whole graph as one ONNX model whose weights are external data in `graph.bin`
(`tilemesh.runtime.task_model.graph_model`, a few tens of KB): a browser makes its onnxruntime-web session from it
while Pyodide is still booting, instead of waiting for Python to write the same bytes.

Each of the card's variants (the same weights at another input size, e.g. the demo's "Heavy (448 px)") adds
`variant-<key>.json`: the graph's topology and shapes at that size, whose weight table is the model's own
blob (`graph.compact_variant`), so a device holds the weights once for every variant.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiohttp import web

from tilemesh.models.card import CardError, ModelCard, Preprocess, load_card
from tilemesh.models.demo import sha256_file
from tilemesh.runtime.graph import Graph, compact_variant, load_compact
from tilemesh.server.context import CONFIG_KEY, MODEL_KEY

log = logging.getLogger("tilemesh.model")

BUNDLE_VERSION = 1
BUNDLE_FILES = ("graph.json", "graph.bin", "labels.json", "card.json", "model.onnx")
STAMP = "bundle.json"


class ModelError(RuntimeError):
    """The model file is missing or cannot be served; the message says what to do."""


@dataclass
class ModelBundle:
    dir: Path
    card: ModelCard
    summary: dict

    def graph(self, variant: str | None = None) -> Graph:
        """The model's graph, or its variant's (raises CardError for a variant the card does not have)."""
        base = load_compact(self.dir / "graph.json")
        if self.card.variant(variant) is None:
            return base
        return compact_variant(base, (self.dir / variant_file(variant)).read_text())

    def page_info(self) -> dict:
        """What pages need to know of the model (rendered into every page as JSON)."""
        doc = self.card.to_dict()
        variants = {k: {**v, "file": variant_file(k), "summary": self.summary.get("variants", {}).get(k)}
                    for k, v in doc["variants"].items()}
        return {**{k: v for k, v in self.summary.items() if k != "variants"}, "name": self.card.name,
                "preprocess": doc["preprocess"], "variants": variants, "early_exit": doc["early_exit"]}


def default_model(static_dir: Path) -> Path:
    """The demo model as `tilemesh setup` leaves it."""
    from tilemesh.models.demo import MODEL_FILE  # noqa: PLC0415  (the demo's builder imports onnx)

    return static_dir / "model" / MODEL_FILE


def variant_file(key: str) -> str:
    return f"variant-{key}.json"


def write_variants(model: Path, out: Path, card: ModelCard) -> dict:
    """`variant-<key>.json` for each of the card's variants (converted from the ONNX file at the variant's input
    size, unless already there) and their summaries; raises ModelError when the model cannot take that size."""
    summaries = {}
    base = None
    for v in card.variants:
        path = out / variant_file(v.key)
        if base is None:
            base = load_compact(out / "graph.json")
        try:
            meta = json.loads(path.read_text())
            graph = compact_variant(base, meta)
        except (OSError, ValueError, KeyError):
            graph = None
        size = v.preprocess.crop
        if graph is None or tuple(graph.shapes[graph.input]) != (1, 3, size, size):
            from tilemesh.runtime.graph import compact_meta, load_onnx  # noqa: PLC0415  (onnx only when converting)

            try:
                graph = load_onnx(model, input_shape=(1, 3, size, size))
            except Exception as exc:  # noqa: BLE001 - onnx raises many kinds; the user needs the variant and why
                raise ModelError(f"{model}: variant {v.key!r} ({size}x{size}) cannot be built: {exc}") from exc
            meta, _ = compact_meta(graph)
            meta["bin"] = "graph.bin"
            try:  # the same weights, laid out as the model's blob (nothing else to download), and it runs
                compact_variant(base, meta)
                same = all(np.array_equal(graph.weights[k], base.weights[k]) for k in base.weights)
                from tilemesh.runtime.executor import run_graph  # noqa: PLC0415

                y = run_graph(graph, np.zeros((1, 3, size, size), np.float32))
                same = same and y.shape == base.shapes[base.output]
            except ValueError:
                same = False
            if not same or graph.shapes[graph.output] != base.shapes[base.output]:
                raise ModelError(f"{model}: variant {v.key!r} at {size}x{size} does not share the model's weights "
                                 "and classes (only a fully convolutional body up to a global pool takes another size)")
            _write_if_changed(path, json.dumps(meta, separators=(",", ":"), allow_nan=False))
            log.info("model %s: variant %s at %dx%d written", model, v.key, size, size)
        summaries[v.key] = graph_summary(graph)
    return summaries


def graph_summary(graph: Graph) -> dict:
    """Node count, input size, classes, and MACs per compute-profile op class at full resolution ("elementwise"
    counts elements): with a device's profile this gives its whole-model time (`profile.predict_graph_seconds`)."""
    from tilemesh.runtime.deps import node_macs  # noqa: PLC0415
    from tilemesh.runtime.profile import OP_CLASSES, op_class  # noqa: PLC0415
    from tilemesh.runtime.regions import Region, plane  # noqa: PLC0415

    macs = dict.fromkeys(OP_CLASSES, 0)
    for n in graph.nodes:
        cls = op_class(graph, n)
        if cls:
            macs[cls] += int(node_macs(n, graph, Region.full(*plane(graph.shapes[n.output]))))
    return {"nodes": len(graph.nodes), "macs": macs, "input": list(graph.shapes[graph.input]),
            "classes": int(graph.shapes[graph.output][-1])}


def prepare(model: Path, static_dir: Path) -> ModelBundle:
    """Check `model` and its card and write (or reuse) its bundle; raises ModelError or CardError."""
    model = Path(model)
    if not model.is_file():
        raise ModelError(f"model file {model} not found (the demo model comes with `tilemesh setup`)")
    if model.suffix != ".onnx":
        raise ModelError(f"{model}: expected an ONNX file (.onnx) with its model card beside it")
    sha = sha256_file(model)
    out = static_dir / "models" / sha[:16]
    stamp = out / STAMP
    try:
        meta = json.loads(stamp.read_text())
        ok = meta.get("version") == BUNDLE_VERSION and meta.get("sha256") == sha and all(
            (out / f).is_file() for f in BUNDLE_FILES)
    except (OSError, ValueError):
        meta, ok = {}, False
    if ok:
        summary = meta["summary"]
        card = load_card(model, tuple(summary["input"]), summary["classes"])
    else:
        from tilemesh.runtime.graph import load_onnx, save_compact  # noqa: PLC0415  (onnx only when converting)

        try:
            graph = load_onnx(model)
        except Exception as exc:  # noqa: BLE001 - onnx raises many kinds; the user needs the file and the reason
            raise ModelError(f"{model}: cannot load it as a model tilemesh runs: {exc}") from exc
        summary = {**graph_summary(graph), "sha256": sha}
        card = load_card(model, tuple(summary["input"]), summary["classes"])
        out.mkdir(parents=True, exist_ok=True)
        save_compact(graph, out / "graph")
        shutil.copyfile(model, out / "model.onnx")
        log.info("model %s converted into %s", model, out)
    summary = {**summary, "variants": write_variants(model, out, card)}
    write_whole(out)
    card_doc = {**card.to_dict(), "summary": summary}
    _write_if_changed(out / "labels.json", json.dumps(list(card.labels), ensure_ascii=False) + "\n")
    _write_if_changed(out / "card.json", json.dumps(card_doc, ensure_ascii=False) + "\n")
    if not ok:
        stamp.write_text(json.dumps({"version": BUNDLE_VERSION, "sha256": sha, "source": str(model.resolve()),
                                     "summary": summary}) + "\n")
    return ModelBundle(out, card, summary)


WHOLE_FILE = "whole.onnx"


def write_whole(out: Path) -> bytes:
    """`whole.onnx` in the bundle `out`: the bytes the browser's runtime would build for its whole-model session
    (`engine_bridge.whole_model`), written when missing or different (a newer lowering); returns them."""
    from tilemesh.runtime.engine_bridge import BLOB_NAME  # noqa: PLC0415
    from tilemesh.runtime.task_model import graph_model  # noqa: PLC0415

    data = graph_model(load_compact(out / "graph.json"), external=BLOB_NAME).model
    path = out / WHOLE_FILE
    if not (path.is_file() and path.read_bytes() == data):
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return data


def _write_if_changed(path: Path, text: str) -> None:
    if not (path.is_file() and path.read_text() == text):
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(text)
        tmp.replace(path)


def bundle_of(app: web.Application) -> ModelBundle | None:
    return app.get(MODEL_KEY)


async def model_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    bundle = bundle_of(request.app)
    if bundle is None or name not in (*BUNDLE_FILES, WHOLE_FILE, *(variant_file(v.key) for v in bundle.card.variants)):
        raise web.HTTPNotFound(text="no such model file (is a model set up? `tilemesh setup`)")
    return web.FileResponse(bundle.dir / name)


def setup(app: web.Application) -> ModelBundle | None:
    """Prepare the configured model (or the demo model, when set up) and serve it at /model/<file>."""
    config = app[CONFIG_KEY]
    model = config.model or default_model(config.static_dir)
    bundle = None
    if config.model is not None or model.is_file():
        bundle = prepare(model, config.static_dir)
    else:
        log.warning("no model at %s: pages work, planning does not (run `tilemesh setup`)", model)
    app[MODEL_KEY] = bundle
    app.router.add_get("/model/{name}", model_file)
    return bundle


__all__ = ["BUNDLE_FILES", "MODEL_KEY", "WHOLE_FILE", "CardError", "ModelBundle", "ModelError", "Preprocess",
           "bundle_of", "default_model", "graph_summary", "prepare", "setup", "variant_file", "write_whole"]
