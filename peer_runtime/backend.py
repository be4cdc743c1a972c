"""Compute backends: what actually runs a node or a run of nodes, behind one small interface.

Tiling, messaging and the executor only talk to a `Backend`, so a faster engine (onnxruntime in
CPython, onnxruntime-web or WebGPU through a JS bridge in the browser) slots in without touching them.
`NumpyBackend` is the default and the only one available in Pyodide; `OnnxRuntimeBackend` (CPython
only, onnxruntime imported lazily) runs the same IR nodes through onnxruntime sessions built from them,
including per-tile padding, and serves as a reference and a speed baseline.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np

from .graph import Graph, Node
from .kernels import run_node as _numpy_run_node


@runtime_checkable
class Backend(Protocol):
    name: str

    def run_node(self, node: Node, inputs: list[np.ndarray],
                 pads: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Run one node; `pads` overrides a window op's padding (see `kernels`)."""
        ...

    def run_nodes(self, nodes: list[Node], tensors: dict[str, np.ndarray],
                  outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run consecutive nodes on full tensors; return `outputs` (default: all they produce).

        `tensors` is not modified.
        """
        ...


class NumpyBackend:
    """The numpy kernels of `peer_runtime.kernels`; runs everywhere, Pyodide included."""

    name = "numpy"

    def __init__(self, graph: Graph):
        self.graph = graph

    def run_node(self, node, inputs, pads=None):
        return _numpy_run_node(node, inputs, self.graph.weights, pads)

    def run_nodes(self, nodes, tensors, outputs=None):
        nodes = list(nodes)
        want = [n.output for n in nodes] if outputs is None else list(outputs)
        last = {t: i for i, n in enumerate(nodes) for t in n.inputs}
        env = dict(tensors)
        for i, node in enumerate(nodes):
            env[node.output] = _numpy_run_node(node, [env[t] for t in node.inputs], self.graph.weights)
            # Free intermediates after their last reader: keeps peak memory near two layers' worth.
            for t in node.inputs:
                if last[t] == i and t not in tensors and t not in want:
                    del env[t]
        return {t: env[t] for t in want}


class OnnxRuntimeBackend:
    """onnxruntime sessions built from IR nodes (CPython only), cached by nodes, pads and input shapes."""

    name = "onnxruntime"

    def __init__(self, graph: Graph, threads: int = 1):
        import onnxruntime as ort

        self.graph = graph
        self._ort = ort
        self._opts = ort.SessionOptions()
        self._opts.intra_op_num_threads = threads
        self._opts.inter_op_num_threads = 1
        self._sessions: dict = {}

    def session(self, nodes: list[Node], input_shapes: dict[str, tuple[int, ...]], outputs: list[str]):
        key = (tuple(n.name for n in nodes), tuple(sorted(input_shapes.items())), tuple(outputs),
               tuple(tuple(n.attrs.get("pads", ())) for n in nodes))
        sess = self._sessions.get(key)
        if sess is None:
            from .graph import to_onnx

            model = to_onnx(self.graph, nodes, outputs=outputs, input_shapes=input_shapes)
            sess = self._ort.InferenceSession(model.SerializeToString(), self._opts,
                                              providers=["CPUExecutionProvider"])
            self._sessions[key] = sess
        return sess

    def run_node(self, node, inputs, pads=None):
        if pads is not None:
            node = dataclasses.replace(node, attrs={**node.attrs, "pads": tuple(int(p) for p in pads)})
        feeds = dict(zip(node.inputs, inputs, strict=True))
        shapes = {t: tuple(a.shape) for t, a in feeds.items()}
        return self.session([node], shapes, [node.output]).run(None, feeds)[0]

    def run_nodes(self, nodes, tensors, outputs=None):
        nodes = list(nodes)
        produced = {n.output for n in nodes}
        feeds = {t: tensors[t] for n in nodes for t in n.inputs if t not in produced}
        shapes = {t: tuple(a.shape) for t, a in feeds.items()}
        outs = [n.output for n in nodes] if outputs is None else [t for t in outputs if t in produced]
        res = dict(zip(outs, self.session(nodes, shapes, outs).run(outs, feeds), strict=True))
        return {t: res[t] if t in res else tensors[t] for t in (outs if outputs is None else outputs)}
