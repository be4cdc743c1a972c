"""numpy kernels for every op of the graph IR, written for Pyodide's BLAS-less numpy as much as for CPython.

Tensors are in ONNX layout with batch 1: (1, C, H, W) or (1, F), float32.

Speed notes (measured here with `python -m bench.runtime --pyodide` and micro-benchmarks, Pyodide 0.27.7
under node and CPython 3.11 + numpy 2.4 with OpenBLAS):

* Dense convolution accumulates one 2D product per kernel tap. For stride 1 the taps read contiguous
  windows of the padded input flattened to (C, Hp*Wp): output pixel (y, x) sits at y*Wp + x of a
  "wide" output, so tap (i, j) is the same product shifted by i*dh*Wp + j*dw, with no copy of the
  input; the Wp - Wo garbage columns per row are dropped at the end. Strided convolutions copy each
  tap's strided window once (im2col was 1.3-2x slower in Pyodide and no faster natively).
* The 2D product is `np.matmul` where numpy has BLAS, but `einsum('oc,cp->op')` in Pyodide: its
  numpy 2.0.2 has no BLAS, and there einsum's SIMD sum-of-products loop beat matmul's fallback 1.6-2x
  on every MobileNetV2 1x1 shape and on a 3x3 64->64 conv (43 vs 74 ms); natively BLAS matmul is
  6-60x faster than einsum. With scipy loaded into Pyodide, its OpenBLAS `sgemm` (called on
  transposed views, so nothing is copied) beats einsum 1.2-2.6x on those 1x1 shapes and ~2x on the
  3x3 stem (which also accumulates its taps inside the gemm, beta=1); the default ("auto") then
  picks it. `set_dot` overrides the choice.
* Depthwise convolution is kh*kw elementwise multiply-accumulates, in place; for stride 1 over the
  same wide flattened layout (long contiguous runs), otherwise over strided 2D windows.

Padding: `pads` (top, left, bottom, right) given to `run_node` replaces the node's own, so the tiled
executor can pass one tile's padding (the node's own at true image borders, 0 at interior edges where
the halo holds real pixels). Conv and AveragePool pad with zeros, MaxPool with -inf. AveragePool with
count_include_pad=0 divides by the number of window cells inside the (tile's) input; since the only
padding a tile ever gets is true image-border padding and halo cells are real, this equals the
full-image result. With count_include_pad=1 padded cells count, i.e. the divisor is kh*kw everywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

_F32 = np.float32


def _dot_einsum(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.einsum("oc,cp->op", a, b, out=out)


def _dot_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.matmul(a, b, out=out)


_sgemm: Callable | None = None


def _load_sgemm() -> Callable | None:
    """scipy's float32 BLAS gemm, or None when scipy is not installed (the Pyodide worker default)."""
    global _sgemm
    if _sgemm is None:
        import importlib.util

        if importlib.util.find_spec("scipy") is None:
            return None
        from scipy.linalg.blas import sgemm

        _sgemm = sgemm
    return _sgemm


def _dot_sgemm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    # Fortran reads a C-contiguous (m, k) array as its (k, m) transpose, so C = A @ B is computed as
    # C^T = B^T A^T on the same memory: no operand is copied, and a C-contiguous `out` is written in place.
    if out is not None and out.flags.c_contiguous and out.dtype == _F32:
        _sgemm(1.0, b.T, a.T, 0.0, out.T, overwrite_c=True)
        return out
    y = _sgemm(1.0, b.T, a.T).T
    if out is None:
        return y
    out[...] = y
    return out


_DOTS: dict[str, Callable] = {"einsum": _dot_einsum, "matmul": _dot_matmul, "sgemm": _dot_sgemm}
_dot: Callable = _dot_einsum if sys.platform == "emscripten" else _dot_matmul


def set_dot(impl: str | Callable) -> None:
    """Choose the 2D product used by Conv/Gemm/MatMul: "einsum", "matmul", "sgemm", "auto" or fn(a, b, out=None).

    "auto" is matmul in CPython (numpy's own BLAS) and, in Pyodide, scipy's sgemm when scipy is
    importable (loaded into the worker), else einsum. "sgemm" raises ImportError without scipy.
    """
    global _dot
    if impl == "auto":
        if sys.platform != "emscripten":
            impl = "matmul"
        else:
            impl = "sgemm" if _load_sgemm() is not None else "einsum"
    if impl == "sgemm" and _load_sgemm() is None:
        raise ImportError("set_dot('sgemm') needs scipy (in Pyodide: loadPackage('scipy') first)")
    _dot = _DOTS[impl] if isinstance(impl, str) else impl


if sys.platform == "emscripten":
    set_dot("auto")  # a worker that loaded scipy before importing us gets sgemm without asking


def dot_name() -> str:
    return next((k for k, v in _DOTS.items() if v is _dot), getattr(_dot, "__name__", "custom"))


def _dot_acc(a: np.ndarray, b: np.ndarray, acc: np.ndarray, tmp: np.ndarray | None) -> np.ndarray | None:
    """acc += a @ b. `tmp` is scratch of acc's shape (or None: made here); returns it for the next tap."""
    if _dot is _dot_sgemm and acc.flags.c_contiguous:
        # beta=1 accumulates inside the gemm: no scratch product, no extra pass over acc.
        _sgemm(1.0, b.T, a.T, 1.0, acc.T, overwrite_c=True)
        return tmp
    if tmp is None:
        tmp = np.empty_like(acc)
    _dot(a, b, out=tmp)
    acc += tmp
    return tmp


class KernelError(ValueError):
    """A node cannot be run: unknown op or inputs that do not fit it."""


# --------------------------------------------------------------------------- helpers


def _pad3(x: np.ndarray, pads, value: float) -> np.ndarray:
    """Pad a (C, H, W) array on H and W; returns `x` itself when there is nothing to pad."""
    pt, pl, pb, pr = pads
    if not (pt or pl or pb or pr):
        return x
    if min(pads) < 0:
        raise KernelError(f"negative pads {pads}")
    c, h, w = x.shape
    out = np.full((c, h + pt + pb, w + pl + pr), value, dtype=_F32)
    out[:, pt: pt + h, pl: pl + w] = x
    return out


def _out_size(size: int, p0: int, p1: int, k: int, s: int, d: int) -> int:
    return (size + p0 + p1 - (k - 1) * d - 1) // s + 1


def _window(xp: np.ndarray, i: int, j: int, ho: int, wo: int, strides, dil) -> np.ndarray:
    """View of the padded input read by kernel tap (i, j) for every output pixel."""
    sh, sw = strides
    r0, c0 = i * dil[0], j * dil[1]
    return xp[:, r0: r0 + sh * (ho - 1) + 1: sh, c0: c0 + sw * (wo - 1) + 1: sw]


def _geometry(node, x: np.ndarray, pads):
    a = node.attrs
    pads = tuple(int(p) for p in (a["pads"] if pads is None else pads))
    kh, kw = a["kernel"]
    strides, dil = tuple(a["strides"]), tuple(a["dilations"])
    _, _, h, w = x.shape
    ho = _out_size(h, pads[0], pads[2], kh, strides[0], dil[0])
    wo = _out_size(w, pads[1], pads[3], kw, strides[1], dil[1])
    if ho <= 0 or wo <= 0:
        raise KernelError(f"{node.name}: input {x.shape} with pads {pads} gives an empty output")
    return pads, (kh, kw), strides, dil, ho, wo


# --------------------------------------------------------------------------- convolution


def _unwiden(wide: np.ndarray, ho: int, wp: int, wo: int, bias: np.ndarray | None) -> np.ndarray:
    """(C, Ho*Wp) wide rows -> (C, Ho*Wo) without the garbage columns, plus the bias, in one pass."""
    c = wide.shape[0]
    src = wide.reshape(c, ho, wp)[:, :, :wo]
    if bias is None:
        return np.ascontiguousarray(src).reshape(c, ho * wo)
    out = np.empty((c, ho, wo), dtype=_F32)
    np.add(src, bias[:, None, None], out=out)
    return out.reshape(c, ho * wo)


def _add_bias(y: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    if bias is not None:
        y += bias[:, None]
    return y


def _conv_dense(xp: np.ndarray, w: np.ndarray, ho: int, wo: int, strides, dil, bias=None) -> np.ndarray:
    """Ungrouped convolution of an already padded (Cin, Hp, Wp) input, plus `bias`; returns (Cout, Ho*Wo)."""
    cout, cin, kh, kw = w.shape
    _, hp, wp = xp.shape
    if kh == 1 and kw == 1:
        xs = xp if strides == (1, 1) else _window(xp, 0, 0, ho, wo, strides, dil)
        xs = np.ascontiguousarray(xs[:, :ho, :wo]).reshape(cin, ho * wo)
        return _add_bias(_dot(np.ascontiguousarray(w.reshape(cout, cin)), xs), bias)
    taps = np.ascontiguousarray(w.transpose(2, 3, 0, 1))  # (kh, kw, cout, cin)
    tmp = None
    if strides == (1, 1):
        flat = np.ascontiguousarray(xp).reshape(cin, hp * wp)
        n = (ho - 1) * wp + wo  # the last row needs no garbage columns, so no window runs off the end
        wide = np.empty((cout, ho * wp), dtype=_F32)
        acc = wide[:, :n]
        for i in range(kh):
            for j in range(kw):
                off = i * dil[0] * wp + j * dil[1]
                if i == 0 and j == 0:
                    _dot(taps[i, j], flat[:, off: off + n], out=acc)
                else:
                    tmp = _dot_acc(taps[i, j], flat[:, off: off + n], acc, tmp)
        return _unwiden(wide, ho, wp, wo, bias)
    acc = np.empty((cout, ho * wo), dtype=_F32)
    for i in range(kh):
        for j in range(kw):
            xs = np.ascontiguousarray(_window(xp, i, j, ho, wo, strides, dil)).reshape(cin, ho * wo)
            if i == 0 and j == 0:
                _dot(taps[i, j], xs, out=acc)
            else:
                tmp = _dot_acc(taps[i, j], xs, acc, tmp)
    return _add_bias(acc, bias)


def _conv_depthwise(xp: np.ndarray, w: np.ndarray, ho: int, wo: int, strides, dil, bias=None) -> np.ndarray:
    """Per-channel convolution (group == Cin == Cout) as kh*kw in-place multiply-accumulates, plus `bias`.

    Tried and dropped (Pyodide, MobileNetV2 shapes, interleaved): one einsum over an as_strided
    (C, kh, kw, ...) tap view, 2.7-3.4x slower; for stride 2, splitting the padded input into its
    four row/column phases so taps become flat shifts, 1.05x slower (the phase copies eat the gain);
    channel blocks sized for cache, 1.03-1.35x slower.
    """
    c, _, kh, kw = w.shape
    if strides == (1, 1):
        # Same "wide output" trick as the dense path: each tap is one long contiguous run per channel,
        # 20-40% faster than 2D strided windows in Pyodide (most for small planes such as 7x7).
        _, hp, wp = xp.shape
        flat = np.ascontiguousarray(xp).reshape(c, hp * wp)
        wt = np.ascontiguousarray(w.reshape(c, kh * kw).T).reshape(kh * kw, c, 1)
        n = (ho - 1) * wp + wo
        wide = np.empty((c, ho * wp), dtype=_F32)
        acc = wide[:, :n]
        tmp = np.empty_like(acc)
        for i in range(kh):
            for j in range(kw):
                off = i * dil[0] * wp + j * dil[1]
                if i == 0 and j == 0:
                    np.multiply(flat[:, off: off + n], wt[0], out=acc)
                else:
                    np.multiply(flat[:, off: off + n], wt[i * kw + j], out=tmp)
                    acc += tmp
        return _unwiden(wide, ho, wp, wo, bias)
    wt = np.ascontiguousarray(w.reshape(c, kh * kw).T).reshape(kh * kw, c, 1, 1)
    acc = np.empty((c, ho, wo), dtype=_F32)
    tmp = np.empty_like(acc)
    for i in range(kh):
        for j in range(kw):
            v = _window(xp, i, j, ho, wo, strides, dil)
            if i == 0 and j == 0:
                np.multiply(v, wt[0], out=acc)
            else:
                np.multiply(v, wt[i * kw + j], out=tmp)
                acc += tmp
    return _add_bias(acc.reshape(c, ho * wo), bias)


def conv(node, x: np.ndarray, weights, pads=None) -> np.ndarray:
    w = weights[node.params[0]]
    b = weights[node.params[1]] if len(node.params) > 1 else None
    pads, (kh, kw), strides, dil, ho, wo = _geometry(node, x, pads)
    group = int(node.attrs.get("group", 1))
    cout, cin_g = w.shape[:2]
    cin = x.shape[1]
    if cin != cin_g * group or cout % group or (kh, kw) != w.shape[2:]:
        raise KernelError(f"{node.name}: input {x.shape} does not fit weights {w.shape} with group {group}")
    xp = _pad3(x[0], pads, 0.0)
    if group == 1:
        y = _conv_dense(xp, w, ho, wo, strides, dil, b)
    elif group == cin == cout:
        y = _conv_depthwise(xp, w, ho, wo, strides, dil, b)
    else:
        cog = cout // group
        y = np.empty((cout, ho * wo), dtype=_F32)
        for g in range(group):
            y[g * cog: (g + 1) * cog] = _conv_dense(
                xp[g * cin_g: (g + 1) * cin_g], w[g * cog: (g + 1) * cog], ho, wo, strides, dil
            )
        _add_bias(y, b)
    return y.reshape(1, cout, ho, wo)


# --------------------------------------------------------------------------- pooling


def max_pool(node, x: np.ndarray, weights, pads=None) -> np.ndarray:
    pads, (kh, kw), strides, dil, ho, wo = _geometry(node, x, pads)
    xp = _pad3(x[0], pads, -np.inf)
    acc = np.array(_window(xp, 0, 0, ho, wo, strides, dil), dtype=_F32)
    for i in range(kh):
        for j in range(kw):
            if i or j:
                np.maximum(acc, _window(xp, i, j, ho, wo, strides, dil), out=acc)
    return acc[None]


def _inside_counts(size: int, p0: int, k: int, s: int, d: int, n_out: int) -> np.ndarray:
    """For each output position along one axis: how many of its k taps land on real input."""
    starts = np.arange(n_out) * s - p0
    taps = starts[:, None] + np.arange(k) * d
    return ((taps >= 0) & (taps < size)).sum(axis=1)


def average_pool(node, x: np.ndarray, weights, pads=None) -> np.ndarray:
    pads, (kh, kw), strides, dil, ho, wo = _geometry(node, x, pads)
    xp = _pad3(x[0], pads, 0.0)
    acc = np.array(_window(xp, 0, 0, ho, wo, strides, dil), dtype=_F32)
    for i in range(kh):
        for j in range(kw):
            if i or j:
                acc += _window(xp, i, j, ho, wo, strides, dil)
    if node.attrs.get("count_include_pad", False):
        acc *= _F32(1.0 / (kh * kw))
    else:
        _, _, h, w = x.shape
        rows = _inside_counts(h, pads[0], kh, strides[0], dil[0], ho)
        cols = _inside_counts(w, pads[1], kw, strides[1], dil[1], wo)
        acc /= (rows[:, None] * cols[None, :]).astype(_F32)
    return acc[None]


def global_average_pool(node, x: np.ndarray, weights, pads=None) -> np.ndarray:
    return x.mean(axis=(2, 3), keepdims=True, dtype=_F32)


# --------------------------------------------------------------------------- elementwise


def _writable(x: np.ndarray, shape=None) -> bool:
    """Whether `x` can hold a float32 result of `shape` (default its own) in place."""
    return (x.dtype == _F32 and x.flags.c_contiguous and x.flags.writeable
            and (shape is None or x.shape == tuple(shape)))


_MINMAX_CLIP = sys.platform == "emscripten"


def clip(node, x, weights, pads=None, out=None):
    # Allocating: np.clip beat minimum(maximum()) 1.3x in Pyodide and 7x natively (one pass, one array).
    # In place in Pyodide, maximum then minimum (SIMD loops there, unlike clip's) is 2.2-2.8x faster
    # than np.clip; the values are equal, only a -0.0 input comes out as +0.0 instead of -0.0.
    lo, hi = _F32(node.attrs.get("min", -np.inf)), _F32(node.attrs.get("max", np.inf))
    if out is not None and _MINMAX_CLIP:
        np.maximum(x, lo, out=out)
        return np.minimum(out, hi, out=out)
    return np.clip(x, lo, hi, out=out)


def relu(node, x, weights, pads=None, out=None):
    return np.maximum(x, _F32(0), out=out)


def sigmoid(node, x, weights, pads=None):
    # The tanh form never overflows (1/(1+exp(-x)) warns for x < -88 in float32).
    y = np.tanh(x * _F32(0.5))
    y += _F32(1)
    y *= _F32(0.5)
    return y


def hard_swish(node, x, weights, pads=None):
    y = x * _F32(1 / 6)
    y += _F32(0.5)
    np.clip(y, _F32(0), _F32(1), out=y)
    y *= x
    return y


_BINARY = {"Add": np.add, "Mul": np.multiply, "Sub": np.subtract, "Div": np.divide}


def _operands(node, inputs, weights):
    if node.params:
        c = weights[node.params[0]]
        return (c, inputs[0]) if node.attrs.get("const_index", 1) == 0 else (inputs[0], c)
    if len(inputs) != 2:
        raise KernelError(f"{node.name}: {node.op} needs two operands, got {len(inputs)}")
    return inputs[0], inputs[1]


# --------------------------------------------------------------------------- dense and shape ops


def gemm(node, x, weights, pads=None):
    a = node.attrs
    b, c = (weights[k] for k in node.params)
    xa = x.T if a.get("transA") else x
    wb = b.T if a.get("transB") else b
    # `out = A @ B` as (B^T @ A^T)^T keeps the big weight as the left operand the dot loops favour.
    y = np.ascontiguousarray(_dot(np.ascontiguousarray(wb.T), np.ascontiguousarray(xa.T)).T)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if alpha != 1.0:
        y *= _F32(alpha)
    if beta != 0.0:
        y += c * _F32(beta) if beta != 1.0 else c
    return y


def matmul(node, inputs, weights):
    a, b = _operands(node, inputs, weights)
    if a.ndim == 2 and b.ndim == 2:
        return _dot(np.ascontiguousarray(a), np.ascontiguousarray(b))
    return np.matmul(a, b)


def _run_unary(fn):
    def run(node, inputs, weights, pads, overwrite=()):
        return fn(node, inputs[0], weights, pads)

    return run


def _run_pointwise(fn):
    """A unary kernel that may write its result into its input's buffer (same shape and dtype)."""

    def run(node, inputs, weights, pads, overwrite=()):
        x = inputs[0]
        return fn(node, x, weights, pads, out=x if 0 in overwrite and _writable(x) else None)

    return run


def _binary(node, inputs, weights, pads, overwrite=()):
    a, b = _operands(node, inputs, weights)
    shape = np.broadcast_shapes(a.shape, b.shape)
    # Only an operand that is a graph input of this node (not a constant) and already has the
    # result's shape may take the result; either order is fine for ufuncs with exactly aliased out.
    for i in overwrite:
        x = inputs[i] if i < len(inputs) else None
        if x is not None and (x is a or x is b) and _writable(x, shape):
            return _BINARY[node.op](a, b, out=x)
    return _BINARY[node.op](a, b)



# --------------------------------------------------------------------------- more activations


def _unary_fns():
    f32 = _F32

    def leaky_relu(x, a):
        return np.where(x < 0, x * f32(a.get("alpha", 0.01)), x)

    def elu(x, a):
        al = f32(a.get("alpha", 1.0))
        return np.where(x < 0, al * np.expm1(np.minimum(x, f32(0))), x)

    def selu(x, a):
        al, ga = f32(a.get("alpha", 1.67326319217681884765625)), f32(a.get("gamma", 1.05070102214813232421875))
        return ga * np.where(x < 0, al * np.expm1(np.minimum(x, f32(0))), x)

    def hard_sigmoid(x, a):
        return np.clip(x * f32(a.get("alpha", 0.2)) + f32(a.get("beta", 0.5)), f32(0), f32(1))

    def softplus(x, a):
        return np.logaddexp(x, f32(0))

    return {
        "LeakyRelu": leaky_relu,
        "Elu": elu,
        "Selu": selu,
        "HardSigmoid": hard_sigmoid,
        "Tanh": lambda x, a: np.tanh(x),
        "Softplus": softplus,
        "Softsign": lambda x, a: x / (f32(1) + np.abs(x)),
        "Abs": lambda x, a: np.abs(x),
        "Neg": lambda x, a: np.negative(x),
        "Exp": lambda x, a: np.exp(x),
    }


UNARY_OPS = _unary_fns()


def _run_activation(node, inputs, weights, pads, overwrite=()):
    return UNARY_OPS[node.op](inputs[0], node.attrs)


def prelu(node, x, weights, pads=None):
    slope = weights[node.params[0]]
    return np.where(x < 0, x * slope, x)


def _softmax(node, x, weights, pads=None, log=False):
    """ONNX Softmax/LogSoftmax: over `axis` (opset >= 13), or over every axis from `axis` on (``legacy``)."""
    axis = node.attrs.get("axis", -1)
    axis = axis + x.ndim if axis < 0 else axis
    axes = tuple(range(axis, x.ndim)) if node.attrs.get("legacy") else (axis,)
    z = x - x.max(axis=axes, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=axes, keepdims=True, dtype=_F32)
    return z - np.log(s) if log else e / s


def lrn(node, x, weights, pads=None):
    """Local response normalization across channels: x / (bias + alpha/size * sum of squares)^beta."""
    a = node.attrs
    size = int(a["size"])
    c = x.shape[1]
    sq = np.square(x, dtype=np.float64)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    # Running sum over a zero-padded channel axis: window of channel i covers i-lo .. i+hi.
    cs = np.cumsum(np.pad(sq, ((0, 0), (lo + 1, hi), (0, 0), (0, 0))), axis=1)
    win = cs[:, size:size + c] - cs[:, :c]
    scale = (a.get("bias", 1.0) + a.get("alpha", 1e-4) / size * win) ** a.get("beta", 0.75)
    return (x / scale).astype(_F32)


def gather_channels(node, x, weights, pads=None):
    return x[:, np.asarray(node.attrs["indices"], dtype=np.intp)]


def _nary(node, inputs, weights, pads, overwrite=()):
    """Sum/Max/Min/Mean of any number of operands (activations and constants), with broadcasting."""
    ops = list(inputs)
    for pos, key in zip(node.attrs.get("const_positions", ()), node.params, strict=True):
        ops.insert(pos, weights[key])
    if not ops:
        raise KernelError(f"{node.name}: {node.op} needs at least one operand")
    fn = {"Sum": np.add, "Mean": np.add, "Max": np.maximum, "Min": np.minimum}[node.op]
    acc = np.array(ops[0], dtype=_F32)
    for o in ops[1:]:
        acc = fn(acc, o)
    if node.op == "Mean":
        acc = acc / _F32(len(ops))
    return acc


def global_max_pool(node, x, weights, pads=None):
    return x.max(axis=(2, 3), keepdims=True)


# --------------------------------------------------------------------------- resampling ops
#
# Pad, Resize, ConvTranspose and DepthToSpace compute a "raw" output from whatever input tile they are
# given (as if it were the whole tensor), then `pads` = (top, left, bottom, right) adjusts it to the wanted
# region: a positive value adds that many rows/columns on that side (Pad: in the node's mode; the others:
# zeros), a negative value removes them. For the whole tensor the node's own attrs["pads"] give the ONNX
# result; `deps` computes each tile's adjustment (see deps._resample_rule).


def _adjust(y: np.ndarray, adj, mode: str = "constant", value: float = 0.0) -> np.ndarray:
    t, left, b, r = (int(v) for v in adj)
    if max(t, left, b, r) > 0:
        widths = ((0, 0), (0, 0), (max(t, 0), max(b, 0)), (max(left, 0), max(r, 0)))
        if mode == "constant":
            y = np.pad(y, widths, mode="constant", constant_values=value)
        else:
            y = np.pad(y, widths, mode=mode)
    if min(t, left, b, r) < 0:
        h, w = y.shape[2:]
        y = y[:, :, max(-t, 0): h - max(-b, 0), max(-left, 0): w - max(-r, 0)]
    return np.ascontiguousarray(y, dtype=_F32)


def pad(node, x, weights, pads=None):
    a = node.attrs
    adj = a["pads"] if pads is None else pads
    mode = a.get("mode", "constant")
    if mode == "reflect" and any(p > 0 and p >= n for p, n in zip(adj, x.shape[2:] * 2, strict=True)):
        raise KernelError(f"{node.name}: {mode} padding {tuple(adj)} needs more than the {x.shape[2:]} input")
    c0, c1 = a.get("channel_pads", (0, 0))
    if c0 or c1:
        x = np.pad(x, ((0, 0), (c0, c1), (0, 0), (0, 0)), constant_values=a.get("value", 0.0))
    return _adjust(x, adj, {"constant": "constant", "reflect": "reflect", "edge": "edge"}[mode],
                   a.get("value", 0.0))


def _resize_axis(n_in: int, n_out: int, scale: float, a) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output position along one axis: (low index, high index, weight of high) per ONNX Resize."""
    y = np.arange(n_out, dtype=np.float64)
    ct = a.get("coordinate_transformation_mode", "half_pixel")
    if ct == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif ct == "pytorch_half_pixel":
        x = (y + 0.5) / scale - 0.5 if n_out > 1 else np.zeros_like(y)
    elif ct == "asymmetric":
        x = y / scale
    elif ct == "tf_half_pixel_for_nn":
        x = (y + 0.5) / scale
    elif ct == "align_corners":  # ONNX's reference uses the unrounded resized length, n_in * scale
        x = y * (n_in - 1) / (n_in * scale - 1) if n_out > 1 else np.zeros_like(y)
    else:
        raise KernelError(f"Resize coordinate_transformation_mode {ct!r}")
    if a.get("mode", "nearest") == "nearest":
        nm = a.get("nearest_mode", "round_prefer_floor")
        idx = {"round_prefer_floor": lambda v: np.ceil(v - 0.5), "round_prefer_ceil": lambda v: np.floor(v + 0.5),
               "floor": np.floor, "ceil": np.ceil}[nm](x)
        idx = np.clip(idx, 0, n_in - 1).astype(np.intp)
        return idx, idx, np.zeros(n_out)
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, x - lo


def resize_out_len(n_in: int, n_full_in: int, n_full_out: int, scale: float) -> int:
    """Raw output length of Resize on an input of length n_in: an integer scale maps each tile on its own,
    any other scale only the whole axis (deps gives such a node the whole input)."""
    s = round(scale)
    if abs(scale - s) < 1e-9 and s >= 1:
        return n_in * s
    if n_in != n_full_in:
        raise KernelError(f"Resize with scale {scale} runs on whole axes only, got {n_in} of {n_full_in}")
    return n_full_out


def resize(node, x, weights, pads=None):
    a = node.attrs
    _, _, h, w = x.shape
    (fh, fw), (FH, FW), (sh, sw) = a["in_size"], a["sizes"], a["scales"]
    oh, ow = resize_out_len(h, fh, FH, sh), resize_out_len(w, fw, FW, sw)
    rl, rh, rw = _resize_axis(h, oh, sh, a)
    cl, ch, cw = _resize_axis(w, ow, sw, a)
    if a.get("mode", "nearest") == "nearest":
        y = x[:, :, rl][:, :, :, cl]
    else:
        rw = rw.astype(_F32)[:, None]
        cw = cw.astype(_F32)
        top = x[:, :, rl][:, :, :, cl] * (1 - cw) + x[:, :, rl][:, :, :, ch] * cw
        bot = x[:, :, rh][:, :, :, cl] * (1 - cw) + x[:, :, rh][:, :, :, ch] * cw
        y = top * (1 - rw) + bot * rw
    return _adjust(y, a["pads"] if pads is None else pads)


def conv_transpose(node, x, weights, pads=None):
    """Transposed convolution: every input pixel scatters its kernel-weighted values (weights (Cin, Cout/g,
    kh, kw)); the raw output of n inputs has (n-1)*s + (k-1)*d + 1 rows, then the adjustment and bias."""
    a = node.attrs
    w = weights[node.params[0]]
    b = weights[node.params[1]]
    cin, cout_g, kh, kw = w.shape
    group = int(a.get("group", 1))
    (sh, sw), (dh, dw) = a["strides"], a["dilations"]
    _, c, h, wd = x.shape
    if c != cin or cin % group:
        raise KernelError(f"{node.name}: input {x.shape} does not fit weights {w.shape} with group {group}")
    cin_g = cin // group
    rh, rw = (h - 1) * sh + (kh - 1) * dh + 1, (wd - 1) * sw + (kw - 1) * dw + 1
    y = np.zeros((cout_g * group, rh, rw), dtype=_F32)
    flat = x[0].reshape(cin, h * wd)
    for g in range(group):
        xs = np.ascontiguousarray(flat[g * cin_g:(g + 1) * cin_g])
        for i in range(kh):
            for j in range(kw):
                tap = np.ascontiguousarray(w[g * cin_g:(g + 1) * cin_g, :, i, j].T)  # (Cout/g, Cin/g)
                contrib = _dot(tap, xs).reshape(cout_g, h, wd)
                y[g * cout_g:(g + 1) * cout_g, i * dh: i * dh + sh * (h - 1) + 1: sh,
                  j * dw: j * dw + sw * (wd - 1) + 1: sw] += contrib
    y = _adjust(y[None], a["pads"] if pads is None else pads)
    y += b[None, :, None, None]
    return y


def depth_to_space(node, x, weights, pads=None):
    a = node.attrs
    bs = int(a["blocksize"])
    _, c, h, w = x.shape
    if a.get("mode", "DCR") == "DCR":
        y = x.reshape(1, bs, bs, c // bs**2, h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(1, c // bs**2, bs, bs, h, w).transpose(0, 1, 4, 2, 5, 3)
    y = y.reshape(1, c // bs**2, h * bs, w * bs)
    return _adjust(y, a.get("pads", (0, 0, 0, 0)) if pads is None else pads)


def space_to_depth(node, x, weights, pads=None):
    bs = int(node.attrs["blocksize"])
    _, c, h, w = x.shape
    y = x.reshape(1, c, h // bs, bs, w // bs, bs)
    y = y.transpose(0, 3, 5, 1, 2, 4) if node.attrs.get("mode", "DCR") == "DCR" else y.transpose(0, 1, 3, 5, 2, 4)
    return np.ascontiguousarray(y.reshape(1, c * bs * bs, h // bs, w // bs))


_KERNELS: dict[str, Callable] = {
    "Conv": _run_unary(conv),
    "MaxPool": _run_unary(max_pool),
    "AveragePool": _run_unary(average_pool),
    "GlobalAveragePool": _run_unary(global_average_pool),
    "Clip": _run_pointwise(clip),
    "Relu": _run_pointwise(relu),
    "Sigmoid": _run_unary(sigmoid),
    "HardSwish": _run_unary(hard_swish),
    "Add": _binary,
    "Mul": _binary,
    "Sub": _binary,
    "Div": _binary,
    "Gemm": _run_unary(gemm),
    "MatMul": lambda node, inputs, weights, pads, overwrite=(): matmul(node, inputs, weights),
    "Flatten": lambda node, inputs, weights, pads, overwrite=(): inputs[0].reshape(
        int(np.prod(inputs[0].shape[: node.attrs["axis"]])), -1
    ),
    "Reshape": lambda node, inputs, weights, pads, overwrite=(): inputs[0].reshape(node.attrs["shape"]),
    "Concat": lambda node, inputs, weights, pads, overwrite=(): np.concatenate(inputs, axis=node.attrs["axis"]),
    **{op: _run_activation for op in UNARY_OPS},
    "PRelu": _run_unary(prelu),
    "Softmax": _run_unary(_softmax),
    "LogSoftmax": lambda node, inputs, weights, pads, overwrite=(): _softmax(node, inputs[0], weights, log=True),
    "LRN": _run_unary(lrn),
    "Gather": _run_unary(gather_channels),
    "Sum": _nary,
    "Max": _nary,
    "Min": _nary,
    "Mean": _nary,
    "GlobalMaxPool": _run_unary(global_max_pool),
    "Pad": _run_unary(pad),
    "Resize": _run_unary(resize),
    "ConvTranspose": _run_unary(conv_transpose),
    "DepthToSpace": _run_unary(depth_to_space),
    "SpaceToDepth": _run_unary(space_to_depth),
}

SUPPORTED_OPS = frozenset(_KERNELS)
# Ops that can put their result into an input's buffer when `run_node(..., overwrite=...)` allows it.
INPLACE_OPS = frozenset({"Clip", "Relu", "Add", "Mul", "Sub", "Div"})
# Of those, the ones with op(op(x)) == op(x): rewriting a dead input with the result is harmless even
# if a stray copy of that input is read again by the same (sole) consumer.
IDEMPOTENT_OPS = frozenset({"Clip", "Relu"})


def run_node(node, inputs: list[np.ndarray], weights: dict[str, np.ndarray],
             pads: tuple[int, int, int, int] | None = None, *, overwrite=()) -> np.ndarray:
    """Run one IR node on float32 inputs in ONNX layout; `pads` overrides a window op's padding.

    `overwrite` lists indices of `inputs` whose buffers the caller no longer needs: an op in
    `INPLACE_OPS` then writes its result there (a C-contiguous float32 input of the result's shape)
    instead of allocating, e.g. Clip after Conv on the conv output, or a residual Add on its left
    operand. The result is bit-identical either way; the overwritten input must not be read again.
    """
    fn = _KERNELS.get(node.op)
    if fn is None:
        raise KernelError(f"no kernel for op {node.op!r} (node {node.name!r})")
    y = fn(node, inputs, weights, pads, overwrite) if overwrite else fn(node, inputs, weights, pads)
    return y if y.dtype == _F32 else y.astype(_F32)
