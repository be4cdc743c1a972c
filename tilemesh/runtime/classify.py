"""One device classifying camera frames alone: model loading from the compact form, preprocess, top-k.

This is what a lone peer runs and the reference the distributed path must agree with. Frames arrive from the
browser as RGBA (canvas ImageData) or RGB bytes; the browser already scaled the shorter side to 256 and
centre-cropped to a square, so `preprocess` here only crops 224 and normalises.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .backend import Backend, NumpyBackend
from .executor import run_graph
from .fusion import encode_scores
from .graph import Graph, compact_variant, load_compact
from .preprocess import IMAGENET, Preprocessing, top_k


def frame_from_bytes(data, height: int, width: int) -> np.ndarray:
    """(H, W, 3|4) uint8 view of a frame buffer; raises ValueError when the size does not match."""
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    for channels in (4, 3):
        if buf.size == height * width * channels:
            return buf.reshape(height, width, channels)
    raise ValueError(f"frame of {buf.size} bytes is not {height}x{width} RGB or RGBA")


def top_entries(logits: np.ndarray, labels: list[str], k: int = 5) -> list[dict]:
    """The k best classes as JSON-able dicts ({index, label, p}), as the pages show them."""
    return [{"index": i, "label": label, "p": p} for i, label, p in top_k(np.asarray(logits)[0], labels, k)]


def answer(logits: np.ndarray, labels: list[str], k: int = 5) -> dict:
    """A classified frame as pages get it: the k best classes, and every class score encoded for a fusion room
    (`fusion.encode_scores`: the camera page forwards them as its view's `scores`)."""
    return {"top": top_entries(logits, labels, k), "scores": encode_scores(logits)}


class LocalClassifier:
    """Holds the model and labels; `classify` runs the whole network on this device."""

    def __init__(self, graph: Graph, labels: list[str], backend: Backend | None = None,
                 pre: Preprocessing = IMAGENET):
        if len(labels) != graph.shapes[graph.output][-1]:
            raise ValueError(f"{len(labels)} labels for {graph.shapes[graph.output][-1]} classes")
        if tuple(graph.shapes[graph.input][2:]) != (pre.crop, pre.crop):
            raise ValueError(f"preprocessing crops {pre.crop}x{pre.crop}, the model takes {graph.shapes[graph.input]}")
        self.graph = graph
        self.labels = labels
        self.backend = backend or NumpyBackend(graph)
        self.pre = pre
        self.variants: dict[str, LocalClassifier] = {}  # the card's variants: same weights, other input sizes
        self.variant_files: dict[str, tuple[Path, Preprocessing]] = {}  # loaded on first use

    def variant(self, key: str | None) -> LocalClassifier:
        """This model (`key` None) or its variant `key`, loaded from its file on first use; raises ValueError for
        a variant the card does not have or whose file is missing."""
        if key is None:
            return self
        if key not in self.variants:
            if key not in self.variant_files:
                raise ValueError(f"the model has no variant {key!r} (it has {sorted(self.variant_files)})")
            path, pre = self.variant_files[key]
            try:
                meta = path.read_text()
            except OSError as exc:
                raise ValueError(f"variant {key!r}: {path} not readable ({exc})") from None
            self.variants[key] = LocalClassifier(compact_variant(self.graph, meta), self.labels, pre=pre)
        return self.variants[key]

    @classmethod
    def from_files(cls, model_json: str | Path, labels_json: str | Path,
                   card_json: str | Path | None = None) -> LocalClassifier:
        """The compact model, its labels and (optionally) its card's preprocessing (default: ImageNet's) and
        variants (each `variant-<key>.json` beside `model_json`, sharing its weights)."""
        card = json.loads(Path(card_json).read_text()) if card_json else None
        labels = json.loads(Path(labels_json).read_text())
        out = cls(load_compact(model_json), labels, pre=Preprocessing.from_card(card) if card else IMAGENET)
        for key, v in ((card or {}).get("variants") or {}).items():
            out.variant_files[key] = (Path(model_json).with_name(f"variant-{key}.json"), Preprocessing.from_card(v))
        return out

    def logits(self, frame: np.ndarray) -> np.ndarray:
        return run_graph(self.graph, self.pre.preprocess(frame), self.backend)

    def classify(self, data, height: int, width: int, k: int = 5) -> dict:
        t0 = time.perf_counter()
        x = self.pre.frame_input(frame_from_bytes(data, height, width))
        t1 = time.perf_counter()
        logits = run_graph(self.graph, x, self.backend)
        t2 = time.perf_counter()
        return {
            **answer(logits, self.labels, k),
            "preprocess_ms": (t1 - t0) * 1e3,
            "compute_ms": (t2 - t1) * 1e3,
        }
