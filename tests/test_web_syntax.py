"""Every browser module parses as an ES module (node's parser, no browser).

A syntax error in one module (a duplicated `const` left by a rebase, in ar.js) stops every page that imports it
before any code runs: no page reached `ready`, and only a real-browser test, minutes later, showed it as a
timeout. node parses the same modules in well under a second.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parents[1] / "tilemesh" / "web"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (make test installs it)")

MODULES = sorted(WEB.glob("*.js"))
INLINE = re.compile(r'<script type="module">(.*?)</script>', re.S)


def es_module_error(source: str) -> str:
    """node's syntax error for `source` parsed as an ES module, or '' when it parses."""
    out = subprocess.run([NODE, "--input-type=module", "--check"], input=source, capture_output=True, text=True,
                         timeout=60, check=False)
    return "" if out.returncode == 0 else out.stderr


def test_the_check_catches_a_duplicated_declaration():
    assert "already been declared" in es_module_error("export function f() { const q = 1; const q = 2; }")
    assert es_module_error("export function f() { const q = 1; return q; }") == ""


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_browser_module_parses(path: Path):
    assert es_module_error(path.read_text()) == ""


def test_inline_page_scripts_parse():
    scripts = [(t.name, s) for t in sorted((WEB / "templates").glob("*.html")) for s in INLINE.findall(t.read_text())]
    assert len(scripts) >= 4  # host, join, ar, runtime pages
    bad = {name: err for name, s in scripts if "{{" not in s and "{%" not in s and (err := es_module_error(s))}
    assert not bad
