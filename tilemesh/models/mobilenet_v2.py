"""MobileNetV2 as an ONNX graph, built with ``onnx.helper`` from a torchvision state_dict.

The architecture follows torchvision's ``mobilenet_v2`` module layout so the state_dict names map
one to one: ``features.0`` is conv 3x3 3->32 stride 2 + BN + ReLU6; ``features.1``..``features.17``
are inverted residual blocks from the (t, c, n, s) table; ``features.18`` is conv 1x1 320->1280 +
BN + ReLU6; then global average pooling and ``classifier.1`` (Linear 1280->1000; ``classifier.0``
is dropout, a no-op at inference).

Batch norm is folded into the preceding convolution, in float64 so the folding adds no rounding of
its own. ReLU6 becomes ``Clip(0, 6)``. Every node and its output tensor carry the name of the
torchvision module they come from (the conv node ``features.3.conv.1.0`` produces the tensor
``features.3.conv.1.0``, its weights are ``features.3.conv.1.0.weight`` / ``.bias``), so the tiling
planner's messages and a reader of the graph speak the same names as the original model.

``onnx`` is imported inside the builder only: this package must import under Pyodide.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

OPSET = 17
BN_EPS = 1e-5
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SHAPE = (1, 3, 224, 224)
NUM_CLASSES = 1000

# torchvision's inverted residual settings: expansion t, output channels c, repeats n, first stride s.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


class StateDictError(KeyError):
    """The state_dict lacks a tensor the architecture needs, or has one of the wrong shape."""


def fold_batch_norm(
    weight: np.ndarray, state: Mapping[str, np.ndarray], bn: str, eps: float = BN_EPS
) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN ``bn`` (a state_dict prefix) into a bias-free conv weight; returns float32 (W, b).

    y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta  ==  conv'(x) + b' with
    W' = W * scale per output channel, b' = beta - mean * scale, scale = gamma / sqrt(var + eps).
    """
    gamma = state[f"{bn}.weight"].astype(np.float64)
    beta = state[f"{bn}.bias"].astype(np.float64)
    mean = state[f"{bn}.running_mean"].astype(np.float64)
    var = state[f"{bn}.running_var"].astype(np.float64)
    scale = gamma / np.sqrt(var + eps)
    folded_w = weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    folded_b = beta - mean * scale
    return folded_w.astype(np.float32), folded_b.astype(np.float32)


class _GraphBuilder:
    """Accumulates nodes and initializers; checks each state_dict tensor's shape as it is used."""

    def __init__(self, state: Mapping[str, np.ndarray]):
        import onnx.helper
        import onnx.numpy_helper

        self._helper = onnx.helper
        self._numpy_helper = onnx.numpy_helper
        self.state = state
        self.nodes = []
        self.initializers = []
        self.used: set[str] = set()

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.state:
            raise StateDictError(f"state_dict has no {name!r}")
        value = self.state[name]
        if tuple(value.shape) != shape:
            raise StateDictError(f"{name} has shape {tuple(value.shape)}, MobileNetV2 needs {shape}")
        self.used.add(name)
        return value

    def initializer(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self._numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def conv_bn(
        self, x: str, conv: str, bn: str, cin: int, cout: int, kernel: int, stride: int, groups: int
    ) -> str:
        weight = self.tensor(f"{conv}.weight", (cout, cin // groups, kernel, kernel))
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            self.tensor(f"{bn}.{suffix}", (cout,))
        # num_batches_tracked only matters for training; mark it used so nothing looks forgotten.
        self.used.add(f"{bn}.num_batches_tracked")
        w, b = fold_batch_norm(weight, self.state, bn)
        pad = kernel // 2
        self.nodes.append(
            self._helper.make_node(
                "Conv",
                [x, self.initializer(f"{conv}.weight", w), self.initializer(f"{conv}.bias", b)],
                [conv],
                name=conv,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
                dilations=[1, 1],
                group=groups,
            )
        )
        return conv

    def relu6(self, x: str, name: str) -> str:
        self.nodes.append(self._helper.make_node("Clip", [x, "relu6.min", "relu6.max"], [name], name=name))
        return name

    def conv_bn_relu6(self, x: str, prefix: str, cin: int, cout: int, kernel: int, stride: int, groups: int = 1):
        """torchvision's Conv2dNormActivation: ``prefix.0`` conv, ``prefix.1`` BN, ``prefix.2`` ReLU6."""
        y = self.conv_bn(x, f"{prefix}.0", f"{prefix}.1", cin, cout, kernel, stride, groups)
        return self.relu6(y, f"{prefix}.2")

    def inverted_residual(self, x: str, index: int, cin: int, cout: int, stride: int, expand: int) -> str:
        prefix = f"features.{index}.conv"
        hidden = cin * expand
        layer = 0
        y = x
        if expand != 1:
            y = self.conv_bn_relu6(y, f"{prefix}.{layer}", cin, hidden, 1, 1)
            layer += 1
        y = self.conv_bn_relu6(y, f"{prefix}.{layer}", hidden, hidden, 3, stride, groups=hidden)
        y = self.conv_bn(y, f"{prefix}.{layer + 1}", f"{prefix}.{layer + 2}", hidden, cout, 1, 1, 1)
        if stride == 1 and cin == cout:
            name = f"features.{index}.add"
            self.nodes.append(self._helper.make_node("Add", [x, y], [name], name=name))
            y = name
        return y


def build_mobilenet_v2(state: Mapping[str, np.ndarray], *, doc_string: str = ""):
    """Return an ``onnx.ModelProto`` (opset 17) computing torchvision MobileNetV2 from ``state``.

    Input ``input`` float32 (1, 3, 224, 224), ImageNet-normalised; output ``logits`` (1, 1000).
    Raises :class:`StateDictError` if ``state`` misses a tensor, has a wrong shape, or has tensors
    the architecture does not use (a sign it is some other model).
    """
    import onnx
    import onnx.helper

    g = _GraphBuilder(state)
    g.initializer("relu6.min", np.array(0.0, dtype=np.float32))
    g.initializer("relu6.max", np.array(6.0, dtype=np.float32))

    x = g.conv_bn_relu6(INPUT_NAME, "features.0", 3, STEM_CHANNELS, 3, 2)
    cin = STEM_CHANNELS
    index = 1
    for expand, cout, repeats, first_stride in INVERTED_RESIDUAL_SETTING:
        for i in range(repeats):
            x = g.inverted_residual(x, index, cin, cout, first_stride if i == 0 else 1, expand)
            cin = cout
            index += 1
    x = g.conv_bn_relu6(x, f"features.{index}", cin, LAST_CHANNELS, 1, 1)

    g.nodes.append(onnx.helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    g.nodes.append(onnx.helper.make_node("Flatten", ["pool"], ["flatten"], name="flatten", axis=1))
    fc_w = g.tensor("classifier.1.weight", (NUM_CLASSES, LAST_CHANNELS))
    fc_b = g.tensor("classifier.1.bias", (NUM_CLASSES,))
    g.nodes.append(
        onnx.helper.make_node(
            "Gemm",
            [
                "flatten",
                g.initializer("classifier.1.weight", fc_w.astype(np.float32)),
                g.initializer("classifier.1.bias", fc_b.astype(np.float32)),
            ],
            [OUTPUT_NAME],
            name="classifier.1",
            transB=1,
        )
    )

    unused = sorted(set(state) - g.used)
    if unused:
        raise StateDictError(f"state_dict has tensors MobileNetV2 does not use: {unused[:5]}")

    graph = onnx.helper.make_graph(
        g.nodes,
        "mobilenet_v2",
        [onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, list(INPUT_SHAPE))],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, [1, NUM_CLASSES])],
        initializer=g.initializers,
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
        producer_name="tilemesh",
        doc_string=doc_string,
    )
    # Pin the IR version that opset 17 shipped with, so older onnx/onnxruntime readers accept it.
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
