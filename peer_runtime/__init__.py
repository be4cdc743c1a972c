"""tilemesh peer runtime: the pure-Python (numpy) core that runs in Pyodide and in CPython alike.

Nothing in this package may import aiohttp, aiortc or browser APIs: the same files are packed into a
wheel that the browser's Pyodide imports, and the edge server imports them unchanged.
"""

__version__ = "0.1.0"
