"""Time every explainer per image against its floor and its peers; print a markdown table.

Floors: the model passes a method cannot avoid, at the best batch size measured here -
``n`` forward+backward passes for gradient-type methods (1 for gradient and LRP, ``n`` for
SmoothGrad, ``steps`` for IG), ``n`` gradient-free forward passes for LIME, one forward pass
for Grad-CAM and NAM (their backward only runs through the head), and SIS's 50 selection
steps as 50 forward+backward passes of batch 1 (each step needs the one before). Peers run with the same
sample counts: captum's Saliency, NoiseTunnel(SmoothGrad), IntegratedGradients, Lime and
LayerGradCam, zennit's epsilon-rule LRP, SmoothGrad and IntegratedGradients, and the
``lime`` package's LimeImageExplainer (its default batch size, 10, and ours).

Images are explained one per call (the serving path); times are per image, the best of
``--repeats`` runs over ``--images`` images. Each method's floor is measured right before the
method itself, so that the drift of a shared machine within a run hits both alike; with
``--rounds R`` the floor, ours and the peers are measured R times in alternating order and
each cell is the median.

    python -m benchmarks.explain                      # full counts, CPU
    python -m benchmarks.explain --quick              # small counts
    python -m benchmarks.explain --models shapes-resnet --rounds 5   # medians of 5 rounds
    python -m benchmarks.explain --device cuda --models shapes-resnet resnet18
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from handlers.allocator import retain_freed_memory
from handlers.explainers import create_explainer
from handlers.explainers.lime import segment
from handlers.models.architectures import build_architecture
from handlers.models.classifier import PixelClassifier, load_model_dir
from protocol.params.explainers import LimeParams
from protocol.spec import Preprocessing

IMAGENET = Preprocessing(resize=224, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
SHAPES = Preprocessing(resize=64, crop=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@dataclass
class Counts:
    smoothgrad: int
    ig_steps: int
    lime: int
    batch_size: int | None  # None: the floor's best, chosen per method


@dataclass
class Row:
    model: str
    method: str
    samples: int
    ours: float
    floor: float
    peers: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- setup
def load_model(name: str, device: torch.device) -> PixelClassifier:
    """shapes-resnet (trained weights if built, else random) or a random torchvision model."""
    if name == "shapes-resnet":
        directory = Path("model_store/weights/shapes-resnet")
        if (directory / "weights.pt").exists():
            return load_model_dir(directory, device)[0]
        return PixelClassifier(build_architecture("shapes_resnet", 6), SHAPES).eval().to(device)
    return PixelClassifier(build_architecture(name, 1000), IMAGENET).eval().to(device)


def make_images(count: int, size: int, device: torch.device) -> torch.Tensor:
    """Smooth random images (low-resolution noise, upsampled) so SLIC finds real segments."""
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(count, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1).to(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def per_image(fn: Callable[[torch.Tensor], object], images: torch.Tensor, repeats: int) -> float:
    """Milliseconds per image, explaining the images one per call."""

    def run() -> None:
        for i in range(len(images)):
            fn(images[i : i + 1])

    return 1000 * timed(run, images.device, repeats) / len(images)


# --------------------------------------------------------------------------- floors
SHORT_S = 0.05
"""Passes shorter than this are timed in loops (:func:`pass_costs`)."""


def pass_costs(
    model: PixelClassifier, image: torch.Tensor, batch_sizes: list[int], repeats: int, kind: str, calls: int = 1
) -> dict[int, float]:
    """ms per image of a ``forward`` or a forward+``backward`` pass, per batch size.

    A pass shorter than :data:`SHORT_S` is timed as up to ``calls`` passes back to back (ours
    and the peers are timed over ``--images`` calls): the best of a few single
    sub-millisecond passes is a luckier draw than the best of a few loops, which biased
    the ratio to the floor against every method by several percent.
    """
    costs: dict[int, float] = {}
    for size in batch_sizes:
        batch = image.expand(size, -1, -1, -1).contiguous()

        def forward(batch: torch.Tensor = batch) -> None:
            with torch.no_grad():
                model(batch)

        def backward(batch: torch.Tensor = batch) -> None:
            x = batch.detach().requires_grad_(True)
            torch.autograd.grad(model(x)[:, 0].sum(), x)

        one = forward if kind == "forward" else backward
        loop = max(1, min(calls, int(SHORT_S / timed(one, image.device, 1))))

        def passes(one: Callable[[], None] = one, loop: int = loop) -> None:
            for _ in range(loop):
                one()

        costs[size] = 1000 * timed(passes, image.device, repeats) / (size * loop)
    return costs


def best_batch_size(cost: dict[int, float], samples: int) -> int:
    """The batch size that reaches :func:`floor` (capped at ``samples``)."""
    size = min(cost, key=lambda size: -(-samples // size) * size * cost[size])
    return min(size, samples)


def floor(cost: dict[int, float], samples: int) -> float:
    """ms for ``samples`` passes at the best batch size: ``min_bs ceil(samples / bs) · bs · cost``."""
    return min(-(-samples // size) * size * per_image_ms for size, per_image_ms in cost.items())


# --------------------------------------------------------------------------- peers
def captum_peers(model: PixelClassifier, counts: Counts, sigma: float) -> dict[str, Callable]:
    from captum.attr import (
        IntegratedGradients,
        LayerAttribution,
        LayerGradCam,
        NoiseTunnel,
        Saliency,
    )

    def smooth(x: torch.Tensor) -> object:
        std = sigma * float(x.max() - x.min())
        return NoiseTunnel(Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=counts.smoothgrad, stdevs=std,
            nt_samples_batch_size=counts.batch_size, target=0, abs=False,
        )

    return {
        "gradient": lambda x: Saliency(model).attribute(x, target=0, abs=False),
        "smoothgrad": smooth,
        "integrated_gradients": lambda x: IntegratedGradients(model).attribute(
            x, target=0, n_steps=counts.ig_steps, internal_batch_size=counts.batch_size
        ),
        "gradcam": lambda x: LayerAttribution.interpolate(  # ours also returns the image size
            LayerGradCam(model, model.features).attribute(x, target=0), x.shape[-2:], "bilinear"
        ),
        "lime": lambda x: captum_lime(model, x, counts),
    }


def captum_lime(model: PixelClassifier, x: torch.Tensor, counts: Counts) -> object:
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    segments = torch.as_tensor(segment(x[0], LimeParams()), device=x.device)[None, None]
    similarity = get_exp_kernel_similarity_function("cosine", kernel_width=0.25)
    lime = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=similarity)
    return lime.attribute(
        x, target=0, feature_mask=segments, n_samples=counts.lime, baselines=0.5,
        perturbations_per_eval=counts.batch_size,
    )


def zennit_peers(model: PixelClassifier, counts: Counts, sigma: float) -> dict[str, Callable]:
    from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad
    from zennit.composites import LayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Activation, AvgPool, Convolution, Linear

    layer_map = [(Activation, Pass()), (Sum, Norm()), (AvgPool, Norm()),
                 (Convolution, Epsilon(1.0)), (Linear, Epsilon(1.0))]
    composite = LayerMapComposite(layer_map, canonizers=[ResNetCanonizer()])

    def one_hot(out: torch.Tensor) -> torch.Tensor:
        return torch.eye(out.shape[1], device=out.device)[[0] * len(out)] * out

    def lrp(x: torch.Tensor) -> object:
        with Gradient(model.network, composite) as attributor:
            return attributor(model.normalize(x).detach().requires_grad_(True), one_hot)

    def eye(out: torch.Tensor) -> torch.Tensor:
        return torch.eye(out.shape[1], device=out.device)[[0] * len(out)]

    return {
        "lrp": lrp,
        "smoothgrad": lambda x: SmoothGrad(model, noise_level=sigma, n_iter=counts.smoothgrad)(x, eye),
        "integrated_gradients": lambda x: IntegratedGradients(model, n_iter=counts.ig_steps)(x, eye),
    }


def lime_image_peers(model: PixelClassifier, counts: Counts) -> dict[str, Callable]:
    from lime.lime_image import LimeImageExplainer

    params = LimeParams()

    def classify(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().to(next(model.parameters()).device)
        with torch.no_grad():
            return model(x).softmax(1).cpu().numpy()

    def slic_fn(image: np.ndarray) -> np.ndarray:
        return segment(torch.from_numpy(image).permute(2, 0, 1), params)

    def run(x: torch.Tensor, batch_size: int) -> object:
        explainer = LimeImageExplainer(kernel_width=0.25, random_state=0)
        image = x[0].permute(1, 2, 0).double().cpu().numpy()
        return explainer.explain_instance(
            image, classify, labels=(0,), top_labels=None, hide_color=0.5, num_features=8,
            num_samples=counts.lime, batch_size=batch_size, segmentation_fn=slic_fn,
        )

    return {
        "lime_image": lambda x: run(x, 10),
        "lime_image_same_batch": lambda x: run(x, counts.batch_size),
    }


# --------------------------------------------------------------------------- driver
OURS = {
    "gradient": ({}, "backward", 1),
    "smoothgrad": ({"n": "smoothgrad"}, "backward", "smoothgrad"),
    "integrated_gradients": ({"steps": "ig_steps"}, "backward", "ig_steps"),
    "lrp": ({"epsilon": 1.0}, "backward", 1),
    "lime": ({"n": "lime"}, "forward", "lime"),
    "gradcam": ({}, "forward", 1),
    "nam": ({}, "forward", 1),
    "sis": ({}, "backward", 50),  # 50 selection steps of 2 % (64x64 and 224x224 alike)
}
SEQUENTIAL = {"sis"}  # each pass needs the one before: its floor is batch-1 passes


def _ours(name: str, counts: Counts) -> tuple[dict, str, int]:
    spec, kind, samples = OURS[name]
    params = {k: getattr(counts, v) if isinstance(v, str) else v for k, v in spec.items()}
    if name in ("smoothgrad", "integrated_gradients", "lime"):
        params["batch_size"] = counts.batch_size
    return params, kind, getattr(counts, samples) if isinstance(samples, str) else samples


def measure_method(
    name: str, method: str, model: PixelClassifier, images: torch.Tensor, peers: dict[str, Callable],
    args: argparse.Namespace, counts: Counts,
) -> Row:
    """Median over ``--rounds`` of the floor, ours and every peer, the arms' order reversed
    every other round (a shared machine drifts within minutes, and whichever arm runs right
    after a heavy one can pay for it: benchmarks/results/explain.md)."""
    kind, samples = OURS[method][1], _ours(method, counts)[2]
    target = torch.zeros(1, dtype=torch.long, device=images.device)

    def floor_ms() -> float:
        sizes = [1] if method in SEQUENTIAL else args.batch_sizes
        costs = pass_costs(model, images[:1], sizes, args.repeats, kind, len(images))
        if counts.batch_size is None:  # no --batch-size: the floor's best, for all arms
            counts.batch_size = best_batch_size(costs, samples)
        return floor(costs, samples)

    counts.batch_size = args.batch_size
    times: dict[str, list[float]] = {"floor": [floor_ms()]}
    explainer = create_explainer(method, _ours(method, counts)[0])
    arms: dict[str, Callable[[], float]] = {
        "floor": floor_ms,
        "ours": lambda: per_image(lambda x: explainer.explain(model, x, target), images, args.repeats),
    }
    for library, fn in peers.items():
        if library not in args.skip:
            arms[library] = lambda fn=fn: per_image(fn, images, args.repeats)
    for round_ in range(args.rounds):
        for arm in list(arms) if round_ % 2 == 0 else list(arms)[::-1]:
            if len(times.setdefault(arm, [])) <= round_:
                times[arm].append(arms[arm]())
    median = {arm: float(np.median(values)) for arm, values in times.items()}
    return Row(name, method, samples, median.pop("ours"), median.pop("floor"), median)


def benchmark_model(name: str, args: argparse.Namespace, counts: Counts) -> list[Row]:
    device = torch.device(args.device)
    model = load_model(name, device)
    size = 64 if name == "shapes-resnet" else 224
    images = make_images(args.images, size, device)
    peers: dict[str, dict[str, Callable]] = {}
    for library, build in (("captum", lambda: captum_peers(model, counts, 0.2)),
                           ("zennit", lambda: zennit_peers(model, counts, 0.2))):
        for method, fn in build().items():
            peers.setdefault(method, {})[library] = fn
    peers.setdefault("lime", {}).update(lime_image_peers(model, counts))
    rows = []
    for method in args.methods:
        row = measure_method(name, method, model, images, peers.get(method, {}), args, counts)
        rows.append(row)
        print(f"done: {row}", file=sys.stderr, flush=True)  # partial results survive a timeout
    return rows


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    libraries = sorted({lib for row in rows for lib in row.peers})
    head = ["model", "method", "n", "ours ms/img", "floor ms/img", "ours/floor",
            *[f"{lib} ms/img" for lib in libraries], "best peer/ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        best = min(row.peers.values(), default=float("nan"))
        cells = [row.model, row.method, str(row.samples), f"{row.ours:.2f}", f"{row.floor:.2f}",
                 f"{row.ours / row.floor:.2f}x",
                 *[f"{row.peers[lib]:.2f}" if lib in row.peers else "-" for lib in libraries],
                 f"{best / row.ours:.2f}x" if row.peers else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines.append("")
    lines.append(f"{device}; torch {torch.__version__}; {args.images} images, best of {args.repeats}, "
                 f"median of {args.rounds} round(s) in alternating order; "
                 f"batch sizes tried for the floor: {args.batch_sizes}; ours and batched peers use "
                 f"{args.batch_size or 'the floor' + chr(39) + 's best batch size'}; "
                 f"malloc {'glibc defaults' if args.default_malloc else 'as the service sets it'}.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shapes-resnet", "resnet18"])
    parser.add_argument("--methods", nargs="+", default=list(OURS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure floor, ours and peers this many times, alternating order; report medians")
    parser.add_argument("--smoothgrad-n", type=int, default=100)
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--lime-n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, help="fixed batch size (default: the floor's best)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128])
    parser.add_argument("--skip", nargs="*", default=[], help="peers to leave out, e.g. zennit")
    parser.add_argument("--quick", action="store_true", help="n=10, steps=10, LIME n=100, 2 images")
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's malloc defaults (the service tunes them: handlers.allocator)")
    args = parser.parse_args(argv)
    if args.quick:
        args.smoothgrad_n, args.ig_steps, args.lime_n, args.images = 10, 10, 100, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        retain_freed_memory()
    counts = Counts(args.smoothgrad_n, args.ig_steps, args.lime_n, args.batch_size)
    rows = [row for name in args.models for row in benchmark_model(name, args, counts)]
    table = markdown(rows, args)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
