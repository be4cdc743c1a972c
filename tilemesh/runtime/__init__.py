"""tilemesh peer runtime: the pure-Python (numpy) core that runs in Pyodide and in CPython alike.

Nothing in this package may import aiohttp, aiortc, the rest of tilemesh or browser APIs: the same files are
packed into the zip that the browser's Pyodide imports, and the edge peer imports them unchanged.
"""

from tilemesh import __version__

__all__ = ["__version__"]
