"""Build the tiny random-weight FLUX pipeline used by tests and offline demos.

Usage: ``python scripts/build_tiny_model.py OUT_DIR [--seed N]``

Why a script: lets a deployment or CI job pre-bake the model folder (no Hub access
needed) and point the server at it like any other diffusers checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from server.engine.tiny import build_tiny_flux  # noqa: E402


def _size_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build (or reuse) the model and report where it is."""
    parser = argparse.ArgumentParser(description="Build a tiny random-weight FLUX pipeline (offline).")
    parser.add_argument("out_dir", type=Path, help="folder to write the diffusers pipeline into")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = build_tiny_flux(args.out_dir, seed=args.seed)
    print(f"{path}\t{_size_bytes(path) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
