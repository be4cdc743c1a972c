"""Asset setup: hashes are enforced, outputs are deterministic, and a second run fetches nothing."""

from __future__ import annotations

import json
import zipfile
from io import BytesIO
from pathlib import Path

import pytest

from tilemesh.server import assets

REPO = Path(__file__).resolve().parent.parent


def test_pack_runtime_is_deterministic_and_importable(tmp_path):
    a, b = assets.pack_runtime(), assets.pack_runtime()
    assert a == b
    names = zipfile.ZipFile(BytesIO(a)).namelist()
    assert "tilemesh/runtime/__init__.py" in names and "tilemesh/runtime/runner.py" in names
    # Only the runtime reaches a phone: the package's import-free __init__ and tilemesh/runtime, nothing else.
    assert all(n == "tilemesh/__init__.py" or (n.startswith("tilemesh/runtime/") and n.endswith(".py")) for n in names)
    assert not any("models/" in n or "server/" in n or "planning/" in n for n in names)


def test_write_if_changed(tmp_path):
    p = tmp_path / "f.bin"
    assert assets.write_if_changed(p, b"abc") is True
    assert assets.write_if_changed(p, b"abc") is False
    assert assets.write_if_changed(p, b"abd") is True and p.read_bytes() == b"abd"


def test_carrier_file_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    """A tampered numpy wheel from the carrier package must stop setup, not be served to browsers."""
    static = tmp_path / "static"
    lock = {"info": {"version": assets.PYODIDE_VERSION}, "packages": {}}
    for p in assets.PYODIDE_PACKAGES:
        lock["packages"][p] = {"file_name": f"{p}.whl", "sha256": assets.sha256_bytes(p.encode())}
    tgz_files = {f"package/{n}": b"x" for n in assets.PYODIDE_CORE_FILES}
    tgz_files["package/pyodide-lock.json"] = json.dumps(lock).encode()
    monkeypatch.setattr(assets, "npm_tarball", lambda spec, sha: Path("unused"))
    monkeypatch.setattr(assets, "_read_tar_member", lambda tgz, member: tgz_files[member])
    # The carrier returns the right bytes for every package but numpy.
    monkeypatch.setattr(
        assets, "_pyodide_from_carrier", lambda: lambda f: b"evil" if f == "numpy.whl" else f[:-4].encode()
    )
    with pytest.raises(assets.AssetError, match="numpy.whl: sha256 .* does not match pyodide-lock.json"):
        assets.step_pyodide(static, None)
    assert not (static / "vendor" / "pyodide" / "numpy.whl").exists()


def test_second_setup_run_downloads_nothing(monkeypatch, capsys):
    """With the cache and static/ filled by a first run (make test runs setup first), nothing is fetched."""
    if not (REPO / "static" / "manifest.json").exists():
        pytest.fail("run `python -m tilemesh.server.assets` first (make test does)")

    def no_network(*args, **kwargs):
        raise AssertionError(f"setup tried to fetch: {args[:1]}")

    monkeypatch.setattr(assets.subprocess, "run", no_network)
    monkeypatch.setattr(assets.urllib.request, "urlopen", no_network)
    manifest = json.loads((REPO / "static" / "manifest.json").read_text())
    steps = ",".join(s for s in ("pyodide", "ort", "runtime", "model", "zoo") if s in manifest)
    # The first run may rewrite outputs whose sources were edited since setup (tilemesh_runtime.zip), never fetch.
    assert assets.main(["--steps", steps]) == 0
    assert "downloading" not in capsys.readouterr().out
    assert assets.main(["--steps", steps]) == 0
    out = capsys.readouterr().out
    assert "downloading" not in out and "(written)" not in out and "written" not in out
