"""Where tilemesh keeps what `tilemesh setup` fetches and builds (a leaf module: standard library only).

- In a source checkout (this package sits beside the project's `pyproject.toml`, as with `make run` and
  `pip install -e .`), browser assets go to `static/` and downloads to `.tilemesh/cache/` in the checkout, as
  the README's two commands expect.
- Installed from a wheel, they go to the user's data and cache directories: `$XDG_DATA_HOME/tilemesh/static`
  (default `~/.local/share/tilemesh/static`) and `$XDG_CACHE_HOME/tilemesh` (default `~/.cache/tilemesh`), so
  `tilemesh setup` and `tilemesh serve` work from any folder and nothing is written into site-packages.

`TILEMESH_STATIC` and `TILEMESH_CACHE` override either (and `--static-dir` overrides the first per command).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_root() -> Path | None:
    """The checkout this package is imported from, or None when it is installed (site-packages)."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "tilemesh" / "web").is_dir() else None


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and Path(value).is_absolute() else Path.home() / fallback


def default_static_dir() -> Path:
    if os.environ.get("TILEMESH_STATIC"):
        return Path(os.environ["TILEMESH_STATIC"])
    root = source_root()
    return root / "static" if root else _xdg("XDG_DATA_HOME", ".local/share") / "tilemesh" / "static"


def default_cache_dir() -> Path:
    if os.environ.get("TILEMESH_CACHE"):
        return Path(os.environ["TILEMESH_CACHE"])
    root = source_root()
    return root / ".tilemesh" / "cache" if root else _xdg("XDG_CACHE_HOME", ".cache") / "tilemesh"
