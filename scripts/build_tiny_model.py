"""Build the tiny random-weight FLUX pipeline used by tests and offline demos.

Usage: ``python scripts/build_tiny_model.py OUT_DIR [--seed N] [--checkers] [--conditioning]``

``--conditioning`` also builds, next to OUT_DIR, ``tiny-flux-edit`` (the same model with an
image-sensitive VAE encoder, for img2img and Kontext) and ``tiny-flux-redux`` (a tiny FLUX.1 Redux
prior), for manifests' ``source`` / ``redux_prior: {path: ...}``.

``--checkers`` also builds the tiny safety checkers (server/engine/tiny_safety.py) next to OUT_DIR, one
folder per format, for a manifest's or config's ``safety`` ``source: {path: ...}``.

Why a script: lets a deployment or CI job pre-bake the model folder (no Hub access
needed) and point the server at it like any other diffusers checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from server.engine.tiny import build_tiny_flux, build_tiny_flux_edit, build_tiny_redux  # noqa: E402
from server.engine.tiny_safety import TINY_CHECKERS, build_tiny_checker  # noqa: E402


def _size_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build (or reuse) the model and report where it is."""
    parser = argparse.ArgumentParser(description="Build a tiny random-weight FLUX pipeline (offline).")
    parser.add_argument("out_dir", type=Path, help="folder to write the diffusers pipeline into")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    parser.add_argument("--checkers", action="store_true",
                        help="also build the tiny safety checkers next to OUT_DIR (one folder each)")
    parser.add_argument("--conditioning", action="store_true",
                        help="also build the tiny edit variant and Redux prior next to OUT_DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = build_tiny_flux(args.out_dir, seed=args.seed)
    print(f"{path}\t{_size_bytes(path) / 1024:.0f} KiB")
    if args.checkers:
        for name in TINY_CHECKERS:
            checker = build_tiny_checker(name, path.parent / name, seed=args.seed)
            print(f"{checker}\t{_size_bytes(checker) / 1024:.0f} KiB")
    if args.conditioning:
        for extra in (build_tiny_flux_edit(path.parent / "tiny-flux-edit", seed=args.seed),
                      build_tiny_redux(path.parent / "tiny-flux-redux")):
            print(f"{extra}\t{_size_bytes(extra) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
