"""What the safety checker costs per image (and per prompt) on the tiny model.

Usage: ``.venv/bin/python scripts/bench_safety.py [--sizes 64 512 1024] [--batch 1 8] [--repeats 20]``

Generates a batch of tiny-FLUX images once, then times each image checker format (the tiny
StableDiffusionSafetyChecker and the tiny ViT classifier, loaded by the production code) on batches of
them, and the prompt stage (word list, tiny text classifier). Prints a table; asserts nothing. Figures
depend on the machine and are quoted with it.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from server.api.safety import PromptGuard  # noqa: E402
from server.config import EngineSettings, ImageCheckerSpec, SafetySettings, TextClassifierSpec  # noqa: E402
from server.engine.pipelines import Engine  # noqa: E402
from server.engine.safety import TextClassifier, load_image_checker  # noqa: E402
from server.params import GenerationParams  # noqa: E402
from server.registry import Registry  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHECKERS = {
    "sd-safety-checker": ImageCheckerSpec(format="sd-safety-checker",
                                          source={"builtin": "tiny-sd-safety-checker"}),
    "image-classification": ImageCheckerSpec(format="image-classification",
                                             source={"builtin": "tiny-nsfw-vit"}),
}


def _time(fn, repeats: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeats`` calls; the best is what the work costs on an idle machine."""
    fn()  # warm
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return min(samples), statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the tiny models are (built there if missing); default: a temp dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="darkroom-bench-safety-"))

    registry = Registry.from_settings(REPO / "models", ["darkroom/tiny-flux"])
    engine = Engine(registry, EngineSettings(cache_dir=cache), "cpu", SafetySettings(enabled=False))
    engine.load()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, best and median of {args.repeats} calls")
    print(f"{'checker':<22}{'size':>6}{'batch':>7}{'best ms/image':>15}{'median ms/image':>17}")
    for size in args.sizes:
        most = max(args.batch)
        params = GenerationParams(model="darkroom/tiny-flux", prompt="a lighthouse", width=size, height=size,
                                  steps=1, guidance_scale=3.5, seeds=tuple(range(most)),
                                  max_sequence_length=64)
        images = engine.generate([params]).images[0]
        for name, spec in CHECKERS.items():
            checker = load_image_checker(spec, cache, "cpu")
            assert checker is not None
            for batch in args.batch:
                best, median = _time(lambda c=checker, b=batch: c.check(images[:b]), args.repeats)
                print(f"{name:<22}{size:>6}{batch:>7}{best * 1000 / batch:>15.2f}"
                      f"{median * 1000 / batch:>17.2f}")

    prompt = "a lighthouse on a cliff at dusk, oil painting, dramatic clouds"
    guard = PromptGuard(SafetySettings(), cache)
    spec = TextClassifierSpec(source={"builtin": "tiny-text-classifier"}, threshold=1.01)
    classifier = TextClassifier(spec, cache)
    print(f"{'prompt stage':<22}{'best ms/prompt':>15}{'median ms/prompt':>17}")
    best, median = _time(lambda: guard.check(prompt), args.repeats)
    print(f"{'word list + patterns':<22}{best * 1000:>15.3f}{median * 1000:>17.3f}")
    best, median = _time(lambda: classifier.flags(prompt), args.repeats)
    print(f"{'tiny text classifier':<22}{best * 1000:>15.3f}{median * 1000:>17.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
