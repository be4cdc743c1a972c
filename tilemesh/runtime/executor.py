"""Whole-model and segment execution on full (untiled) tensors.

`run_graph` is single-device inference: the reference every tiled run is compared with, and what a
lone peer does. `run_nodes` runs a consecutive slice of `graph.nodes` given the tensors it reads, as a
device does for a fused segment that is not split into tiles (e.g. the classifier head). The work is
delegated to a `Backend` (numpy kernels by default), which frees intermediates after their last use.
"""

from __future__ import annotations

import numpy as np

from .backend import Backend, NumpyBackend
from .graph import Graph, Node


def run_nodes(graph: Graph, nodes: list[Node], tensors: dict[str, np.ndarray],
              backend: Backend | None = None, keep: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run `nodes` (consecutive, topological) on full tensors; return the tensors named in `keep`.

    `tensors` must hold every tensor the nodes read and do not produce; it is not modified. `keep`
    defaults to the outputs of all nodes; other intermediates are freed once read for the last time.
    """
    nodes = list(nodes)
    produced = {n.output for n in nodes}
    missing = sorted({t for n in nodes for t in n.inputs if t not in produced and t not in tensors})
    if missing:
        raise KeyError(f"run_nodes needs tensors {missing}")
    unknown = sorted(t for t in (keep or ()) if t not in produced and t not in tensors)
    if unknown:
        raise KeyError(f"cannot keep {unknown}: neither given nor produced")
    backend = backend or NumpyBackend(graph)
    return backend.run_nodes(nodes, tensors, None if keep is None else list(keep))


def run_graph(graph: Graph, x: np.ndarray, backend: Backend | None = None) -> np.ndarray:
    """Full-model inference on one input of shape `graph.shapes[graph.input]`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    want = tuple(graph.shapes[graph.input])
    if x.shape != want:
        raise ValueError(f"input has shape {x.shape}, the graph wants {want}")
    return run_nodes(graph, graph.nodes, {graph.input: x}, backend, keep=[graph.output])[graph.output]
