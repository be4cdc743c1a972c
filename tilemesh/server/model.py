"""The model the server serves (`tilemesh serve --model FILE.onnx`; default: the demo model `tilemesh setup` built).

At startup the ONNX file and its model card (`tilemesh.models.card`) become a bundle in
`<static>/models/<sha256 of the ONNX, 16 hex>/`: the compact form Pyodide loads (`graph.json` + `graph.bin`),
`labels.json`, `card.json` (the checked card plus a summary of the graph) and `model.onnx` itself. Browsers get
them under fixed names at `/model/<file>`, so no page or script names a model; the planner, the edge peer and
the pages all read the same bundle. A second start with the same files converts nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tilemesh.models.card import CardError, ModelCard, Preprocess, load_card
from tilemesh.models.demo import sha256_file
from tilemesh.runtime.graph import Graph, load_compact
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

    def graph(self) -> Graph:
        return load_compact(self.dir / "graph.json")

    def page_info(self) -> dict:
        """What pages need to know of the model (rendered into every page as JSON)."""
        return {**self.summary, "name": self.card.name, "preprocess": self.card.to_dict()["preprocess"]}


def default_model(static_dir: Path) -> Path:
    """The demo model as `tilemesh setup` leaves it."""
    from tilemesh.models.demo import MODEL_FILE  # noqa: PLC0415  (the demo's builder imports onnx)

    return static_dir / "model" / MODEL_FILE


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
    card_doc = {**card.to_dict(), "summary": summary}
    _write_if_changed(out / "labels.json", json.dumps(list(card.labels), ensure_ascii=False) + "\n")
    _write_if_changed(out / "card.json", json.dumps(card_doc, ensure_ascii=False) + "\n")
    if not ok:
        stamp.write_text(json.dumps({"version": BUNDLE_VERSION, "sha256": sha, "source": str(model.resolve()),
                                     "summary": summary}) + "\n")
    return ModelBundle(out, card, summary)


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
    if bundle is None or name not in BUNDLE_FILES:
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


__all__ = ["BUNDLE_FILES", "MODEL_KEY", "CardError", "ModelBundle", "ModelError", "Preprocess", "bundle_of",
           "default_model", "graph_summary", "prepare", "setup"]
