"""Time the derived copies that score images (handlers/models/derived.py); print markdown.

Per image, without autograd: the served network in the default memory layout, the same on
channels-last input (:func:`~handlers.models.derived.inference_layout`), and the fused
inference copy (:func:`~handlers.models.derived.inference_logits`: batch norm folded,
channels-last weights, in-place ReLUs), at ``--batch`` images per pass; and the last feature
map of one image (what Grad-CAM and NAM differentiate the head from) through the served
network against :func:`~handlers.models.derived.inference_features`. The arms run in
alternating order for ``--rounds`` rounds; each cell is the median over rounds of the best
of ``--repeats`` timings. Every arm computes the same values (to about 1e-6).

    python -m benchmarks.inference                                    # shapes-resnet
    python -m benchmarks.inference --models shapes-resnet resnet18 --batch 16
    python -m benchmarks.inference --default-malloc                   # glibc's defaults
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from benchmarks.explain import load_model, make_images, timed
from benchmarks.markdown import table
from handlers.allocator import retain_freed_memory
from handlers.models.classifier import PixelClassifier
from handlers.models.derived import inference_features, inference_layout, inference_logits


def arms(model: PixelClassifier, batch: torch.Tensor) -> dict[str, tuple[Callable[[], object], int]]:
    """Each arm's call and the images it scores."""
    one = batch[:1]

    def served() -> object:
        with torch.inference_mode():
            return model(batch)

    def served_channels_last() -> object:
        with torch.inference_mode():
            return model(inference_layout(batch))

    def feature_map_served() -> object:
        with torch.no_grad():
            return model.feature_map(one)

    return {
        "served network": (served, len(batch)),
        "served network, channels-last input": (served_channels_last, len(batch)),
        "inference_logits (fused copy)": (lambda: inference_logits(model, batch), len(batch)),
        "feature map, served network (batch 1)": (feature_map_served, 1),
        "inference_features (batch 1)": (lambda: inference_features(model, one), 1),
    }


def benchmark_model(name: str, args: argparse.Namespace) -> list[list[object]]:
    model = load_model(name, torch.device("cpu"))
    size = 64 if name == "shapes-resnet" else 224
    calls = arms(model, make_images(args.batch, size, torch.device("cpu")))
    times: dict[str, list[float]] = {arm: [] for arm in calls}
    for round_ in range(args.rounds):
        order = list(calls) if round_ % 2 == 0 else list(reversed(calls))
        for arm in order:
            fn, images = calls[arm]
            times[arm].append(1000 * timed(fn, torch.device("cpu"), args.repeats) / images)
    return [[name, arm, statistics.median(values)] for arm, values in times.items()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["shapes-resnet"])
    parser.add_argument("--batch", type=int, default=128, help="images per pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's malloc defaults (the service tunes them: handlers/allocator.py)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        retain_freed_memory()
    rows = [row for name in args.models for row in benchmark_model(name, args)]
    malloc = "glibc defaults" if args.default_malloc else "as the service sets it"
    title = (f"CPU, {args.threads} threads, batch {args.batch}, median of {args.rounds} rounds "
             f"(best of {args.repeats}), malloc {malloc}")
    table(title, ["model", "arm", "ms/image"], rows)


if __name__ == "__main__":
    main()
