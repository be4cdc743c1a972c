"""Compute backends: what actually runs a node or a run of nodes, behind one small interface.

Tiling, messaging and the executor only talk to a `Backend`, so a faster engine (onnxruntime in
CPython, onnxruntime-web or WebGPU through a JS bridge in the browser) slots in without touching them.
`NumpyBackend` is the default and the only one available in Pyodide; `OnnxRuntimeBackend` (CPython
only, onnxruntime imported lazily) runs the same IR nodes through onnxruntime sessions built from them,
including per-tile padding, and serves as a reference and a speed baseline.

In-place tails. Allocating a fresh array for every elementwise node was ~10% of a MobileNetV2 frame in
Pyodide (35 Clips), so `NumpyBackend` lets Clip/Relu write into the conv output they read and a
residual Add into its left operand when that buffer is dead (see `kernels.run_node(overwrite=...)`;
results are bit-identical):
* `run_nodes` knows every lifetime: an input produced inside the run, read for the last time by this
  node (once), not wanted as an output and sharing its memory with no other live tensor may be reused.
* `run_node` (the tiled path: one call per node and tile) takes an explicit `may_overwrite` per input
  from a caller that knows lifetimes. Without it, it only rewrites in place when safe whatever the
  caller still holds: the node is idempotent (Clip, Relu), is the sole reader of that tensor in the
  graph, and the array is (a view of) the fresh buffer this backend returned from the previous call.
  A stray copy (a halo already sent, a re-sent tile) can then only ever be clipped again, which
  changes nothing. Non-idempotent ops (Add) need the explicit hint there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections import Counter, OrderedDict
from typing import Protocol, runtime_checkable

import numpy as np

from .graph import Graph, Node
from .kernels import IDEMPOTENT_OPS, INPLACE_OPS
from .kernels import run_node as _numpy_run_node


def _root(a: np.ndarray) -> np.ndarray:
    """The array that owns `a`'s memory (numpy keeps `.base` pointing at the owner for views of views)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def segment_keep(deps, keep) -> list[str]:
    """The tensors of `keep` a tile's steps compute (what `run_segment` returns), sorted (a session's key)."""
    return sorted(t for t in keep if t in deps.regions and t not in deps.inputs)


@runtime_checkable
class Backend(Protocol):
    name: str

    def run_node(self, node: Node, inputs: list[np.ndarray],
                 pads: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Run one node; `pads` overrides a window op's padding (see `kernels`).

        Backends may also take `may_overwrite=` (a bool per input: the caller will not read that
        array again), as `NumpyBackend` and `OnnxRuntimeBackend` do; callers pass it by keyword.
        """
        ...

    def run_nodes(self, nodes: list[Node], tensors: dict[str, np.ndarray],
                  outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run consecutive nodes on full tensors; return `outputs` (default: all they produce).

        `tensors` is not modified.
        """
        ...


class NumpyBackend:
    """The numpy kernels of `tilemesh.runtime.kernels`; runs everywhere, Pyodide included.

    `inplace=False` turns off every in-place tail (for comparisons); results are the same either way.
    """

    name = "numpy"

    def __init__(self, graph: Graph, inplace: bool = True):
        self.graph = graph
        self.inplace = inplace
        produced = {n.output for n in graph.nodes}
        readers = Counter(t for n in graph.nodes for t in n.inputs)
        # Tensors whose one and only reader in the whole graph is a single input slot of one node.
        self._sole = {t for t, c in readers.items() if c == 1 and t in produced and t != graph.output}
        self._last: tuple[str, weakref.ref] | None = None  # (tensor, its fresh buffer) of the last run_node

    def for_graph(self, graph: Graph) -> NumpyBackend:
        """The same backend on another graph (a model variant: same weights, other shapes)."""
        return NumpyBackend(graph, self.inplace)

    def run_node(self, node, inputs, pads=None, *, may_overwrite=None):
        """As `Backend.run_node`; `may_overwrite[i]` true lets the kernel reuse `inputs[i]`'s buffer."""
        last, self._last = self._last, None
        if may_overwrite is not None:
            over = tuple(i for i, ok in enumerate(may_overwrite) if ok)
        elif self.inplace and node.op in IDEMPOTENT_OPS and last is not None:
            over = tuple(i for i, (t, a) in enumerate(zip(node.inputs, inputs, strict=True))
                         if t == last[0] and t in self._sole and _root(a) is last[1]())
        else:
            over = ()
        y = _numpy_run_node(node, inputs, self.graph.weights, pads, overwrite=over if self.inplace else ())
        root = _root(y)
        # A result that shares memory with an input we may not overwrite (Flatten, Reshape) is not fresh.
        if all(_root(a) is not root for i, a in enumerate(inputs) if i not in over):
            self._last = (node.output, weakref.ref(root))
        return y

    def run_nodes(self, nodes, tensors, outputs=None):
        nodes = list(nodes)
        want = [n.output for n in nodes] if outputs is None else list(outputs)
        keep = set(want) | set(tensors)
        last = {t: i for i, n in enumerate(nodes) for t in n.inputs}
        env = dict(tensors)
        shared: set[str] = set()  # produced tensors whose memory another tensor also uses
        for i, node in enumerate(nodes):
            ins = [env[t] for t in node.inputs]
            over = ()
            if self.inplace and node.op in INPLACE_OPS:
                over = tuple(k for k, t in enumerate(node.inputs)
                             if last[t] == i and t not in keep and t not in shared and node.inputs.count(t) == 1)
            y = _numpy_run_node(node, ins, self.graph.weights, overwrite=over)
            root = _root(y)
            for k, (t, a) in enumerate(zip(node.inputs, ins, strict=True)):
                if k not in over and _root(a) is root:
                    shared.update((t, node.output))
            env[node.output] = y
            # Free intermediates after their last reader: keeps peak memory near two layers' worth.
            for t in node.inputs:
                if last[t] == i and t not in keep:
                    env.pop(t, None)
        return {t: env[t] for t in want}


class OnnxRuntimeBackend:
    """onnxruntime sessions built from IR nodes (CPython only), cached by nodes, pads and input shapes.

    `run_segment` runs a whole tile's steps (`tiling.run_steps`) as one session of its `task_model`, cached by
    the tile's geometry: what the edge computes with. With `blob` (the compact model's weight bytes, laid out
    as `graph.compact_offsets` says) the task models carry no weights of their own but point into it as ONNX
    external data, as in the browser.
    """

    name = "onnxruntime"
    BLOB_NAME = "model.bin"
    MAX_SESSIONS = 64  # a few plans' worth of tiles (each session holds a copy of its layers' weights)

    def __init__(self, graph: Graph, threads: int = 1, blob=None, spinning: bool = True):
        """`spinning=False` keeps idle worker threads from busy-waiting (a server sharing its cores with WebRTC)."""
        import onnxruntime as ort

        self.graph = graph
        self.threads = threads
        self._ort = ort
        self._blob = blob
        self._spinning = spinning
        self._opts = self._options()
        self._sessions: OrderedDict = OrderedDict()
        self.session_ms = 0.0  # total time spent creating sessions (plan adoption, not frames)

    def for_graph(self, graph: Graph) -> OnnxRuntimeBackend:
        """The same engine and settings on another graph (a model variant: same weights and blob, other shapes)."""
        return OnnxRuntimeBackend(graph, self.threads, self._blob, self._spinning)

    def _options(self):
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        if not self._spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def segment_session(self, deps, keep):
        """The session of one tile's steps (`task_model`), created on first use and kept."""
        key = (deps.steps, tuple(sorted(deps.inputs.items())), tuple(keep))
        entry = self._sessions.get(key)
        if entry is not None:
            self._sessions.move_to_end(key)
        else:
            import time

            from .task_model import task_model

            t0 = time.perf_counter()
            tm = task_model(self.graph, deps, keep, external=self.BLOB_NAME if self._blob is not None else None)
            opts = self._opts
            if self._blob is not None:
                opts = self._options()
                blob = memoryview(self._blob).cast("B")
                opts.add_external_initializers_from_files_in_memory([self.BLOB_NAME], [blob], [len(blob)])
            sess = self._ort.InferenceSession(tm.model, opts, providers=["CPUExecutionProvider"])
            entry = self._sessions[key] = (sess, list(tm.outputs))
            self.session_ms += (time.perf_counter() - t0) * 1e3
            while len(self._sessions) > self.MAX_SESSIONS:  # replaced plans' tiles: the oldest go
                self._sessions.popitem(last=False)
        return entry

    def prepare(self, dplan, keeps=None) -> float:
        """Make the session of every task of a `tiling.DevicePlan` now (plan adoption), not at its first frame;
        `keeps[i]`: what task i returns (default its owned tensors). Returns the milliseconds that took."""
        from .task_model import NotLowerable

        before = self.session_ms
        for i, task in enumerate(dplan.tasks):
            with contextlib.suppress(NotLowerable):  # that task runs on numpy (run_segment)
                self.segment_session(task.deps, segment_keep(task.deps, keeps[i] if keeps else task.owned))
        return self.session_ms - before

    def _numpy(self):
        if getattr(self, "_np", None) is None:
            self._np = NumpyBackend(self.graph)
        return self._np

    def run_segment(self, deps, inputs, keep):
        """`tiling.run_steps` in one onnxruntime call: `inputs[t]` holds `deps.inputs[t]`; returns kept tiles.
        Raises `task_model.NotLowerable` for a tile with an op the ONNX writer does not lower (`tiling.run_steps`
        then runs it on the numpy kernels)."""
        sess, outs = self.segment_session(deps, keep)
        feeds = {t: np.ascontiguousarray(inputs[t], np.float32) for t in deps.inputs}
        return dict(zip(outs, sess.run(outs, feeds), strict=True))

    def session(self, nodes: list[Node], input_shapes: dict[str, tuple[int, ...]], outputs: list[str]):
        key = (tuple(n.name for n in nodes), tuple(sorted(input_shapes.items())), tuple(outputs),
               tuple(tuple(n.attrs.get("pads", ())) for n in nodes))
        sess = self._sessions.get(key)
        if sess is None:
            from .task_model import nodes_model

            model = nodes_model(self.graph, nodes, input_shapes, outputs)
            sess = self._ort.InferenceSession(model, self._opts, providers=["CPUExecutionProvider"])
            self._sessions[key] = sess
        return sess

    def run_node(self, node, inputs, pads=None, *, may_overwrite=None):
        from .task_model import ENGINE_OPS

        if node.op not in ENGINE_OPS:
            return self._numpy().run_node(node, inputs, pads)
        if pads is not None:
            node = dataclasses.replace(node, attrs={**node.attrs, "pads": tuple(int(p) for p in pads)})
        feeds = dict(zip(node.inputs, inputs, strict=True))
        shapes = {t: tuple(a.shape) for t, a in feeds.items()}
        return self.session([node], shapes, [node.output]).run(None, feeds)[0]

    def run_nodes(self, nodes, tensors, outputs=None):
        from .task_model import ENGINE_OPS

        nodes = list(nodes)
        if any(n.op not in ENGINE_OPS for n in nodes):
            return self._numpy().run_nodes(nodes, tensors, outputs)
        produced = {n.output for n in nodes}
        feeds = {t: tensors[t] for n in nodes for t in n.inputs if t not in produced}
        shapes = {t: tuple(a.shape) for t, a in feeds.items()}
        outs = [n.output for n in nodes] if outputs is None else [t for t in outputs if t in produced]
        res = dict(zip(outs, self.session(nodes, shapes, outs).run(outs, feeds), strict=True))
        return {t: res[t] if t in res else tensors[t] for t in (outs if outputs is None else outputs)}
