"""This project's SimCLR step and input pipeline beside PyTorch's on the same machine, interleaved.

    python benchmarks/compare_peers.py [--works r18_32,r50_224] [--rounds 3] [--steps 3]
        [--impls jax,torch,torch_cl] [--input] [--cifar_dir DIR]

Step: identical work on both sides: a SimCLR pretraining step on one global batch of two views
per image (ResNet-18 with the CIFAR stem at 32 px, batch 128; ResNet-50 at 224 px, batch 16),
3-layer projection head with BN, online linear probe on the detached representation, NT-Xent,
float32. `jax` is the trainer's own step (benchmarks/bench_step.py builds it, LARS, the default
`model.conv_kernel_grad`); `torch` is torchvision's ResNet with the same head, probe and loss and
SGD with momentum, default (NCHW) layout; `torch_cl` the same in channels-last memory format.
Every (round, work, implementation) runs in a fresh subprocess, the implementations alternate
within each round, so machine noise falls on all of them alike. GFLOP/s divides XLA's cost
analysis of the step (XLA conv gradient build; same work on both sides) by the step time.

With --input it also compares the input pipelines (two augmented views per image, images/s)
on the CIFAR-10 JPEG folder at 32 px and on 256 px JPEGs at 224 px with blur: this project's
tf.data pipeline (benchmarks/bench_input.py) against lightly's SimCLRTransform in a torch
DataLoader with one worker per core.

PyTorch, torchvision and lightly are optional: `pip install -e '.[peers]'`. torchvision's
compiled ops need the torch build they were made for: a `+cpu` torch wheel needs the `+cpu`
torchvision from PyTorch's own index, not PyPI's (which links the CUDA libraries).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = pathlib.Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # `configs` and bench_* are not installed packages
sys.path.insert(0, str(HERE.parent))

# name -> (depth, CIFAR stem, image size, batch (images), classes, temperature): the works
# bench_step.py times, so both sides build exactly its configs.
from bench_step import BENCHMARKS as WORKS  # noqa: E402
from timing import median_time  # noqa: E402

IMPLS = ("jax", "torch", "torch_cl")
PEERS_MISSING = "PyTorch is not installed: pip install -e '.[peers]', or pass --impls jax"


# ---------------------------------------------------------------- one measurement (subprocess)


def jax_step(work: str, batch: int) -> Any:
    """A closure running the trainer's pretraining step once on a fixed synthetic batch."""
    import jax
    from bench_step import build_config, build_step, synthetic_batches

    from simclr_jax import parallel

    config = build_config(work, batch, "auto")
    mesh = parallel.create_mesh()
    state, step = build_step(config, mesh)
    batch_arrays = next(synthetic_batches(config, mesh))
    holder = [state]

    def run() -> None:
        holder[0], metrics = step(holder[0], batch_arrays)
        jax.block_until_ready(metrics)

    return run


def jax_step_gflop(work: str, batch: int) -> float:
    """GFLOP per step from XLA's cost analysis of the native-conv-gradient build."""
    from bench_step import build_config, build_step, step_gflop, synthetic_batches

    from simclr_jax import parallel

    config = build_config(work, batch, "xla")
    mesh = parallel.create_mesh()
    state, step = build_step(config, mesh)
    return step_gflop(step.lower(state, next(synthetic_batches(config, mesh))).compile())


def torch_step(work: str, batch: int, channels_last: bool) -> Any:
    """A closure running one PyTorch SimCLR step (torchvision ResNet, both views in one batch)."""
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch import nn

    depth, cifar_stem, size, _, num_classes, temperature = WORKS[work]
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    encoder = getattr(torchvision.models, f"resnet{depth}")()
    if cifar_stem:
        encoder.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        encoder.maxpool = nn.Identity()
    width = encoder.fc.in_features
    encoder.fc = nn.Identity()
    head = nn.Sequential(
        nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, 128, bias=False), nn.BatchNorm1d(128, affine=True),
    )  # fmt: skip
    probe = nn.Linear(width, num_classes)
    modules = nn.ModuleList([encoder, head, probe])
    images = torch.rand(2 * batch, 3, size, size)
    labels = torch.randint(0, num_classes, (batch,)).repeat(2)
    if channels_last:
        modules = modules.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(modules.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    self_mask = torch.eye(2 * batch, dtype=torch.bool)

    def run() -> None:
        h = encoder(images)
        z = F.normalize(head(h), dim=1)
        logits = (z @ z.T / temperature).masked_fill(self_mask, -1e9)
        loss = F.cross_entropy(logits, positives) + F.cross_entropy(probe(h.detach()), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def measure_step(impl: str, work: str, batch: int, steps: int) -> dict[str, Any]:
    """Median step time and images/s of one implementation on one work."""
    if impl == "jax":
        run = jax_step(work, batch)
    else:
        run = torch_step(work, batch, channels_last=impl == "torch_cl")
    step_s = median_time(run, steps)
    return {"step_s": step_s, "images_per_s": batch / step_s}


# ---------------------------------------------------------------- input pipelines (subprocess)


def lightly_rate(root: pathlib.Path, size: int, batch: int, seconds: float) -> float:
    """Images/s (two views each) of lightly's SimCLRTransform in a DataLoader over a folder."""
    import torch
    import torchvision
    from lightly.transforms import SimCLRTransform

    blur = 0.5 if size > 32 else 0.0
    transform = SimCLRTransform(
        input_size=size, cj_strength=0.5 if size == 32 else 1.0, gaussian_blur=blur
    )
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=os.cpu_count() or 1, drop_last=True
    )
    # As many epochs as the measurement needs (the 224 px folder has 1,000 images).
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for _ in range(3):
        next(batches)
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        views, _ = next(batches)
        images += views[0].shape[0]
    return images / (time.perf_counter() - start)


def ours_rate(root: pathlib.Path, size: int, batch: int, seconds: float) -> float:
    """Images/s (two views each) of this project's tf.data pipeline over the same folder."""
    from bench_input import measure

    from simclr_jax.config import get_base_config

    config = get_base_config().data
    config.update(
        source="folder",
        data_dir=str(root),
        image_size=size,
        blur_prob=0.5 if size > 32 else 0.0,
        color_jitter_strength=0.5 if size == 32 else 1.0,
    )
    return measure(config, batch, seconds)[0]


# ---------------------------------------------------------------- driver


def in_subprocess(*args: str, script: pathlib.Path = HERE) -> dict[str, Any]:
    """Runs a script's hidden --_child mode (this one's by default) in a fresh interpreter;
    returns the JSON line it printed last."""
    out = subprocess.run(
        [sys.executable, str(script), "--_child", *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def child(args: list[str]) -> None:
    """Hidden entry point of one measurement: prints one JSON line."""
    kind, *rest = args
    if kind == "step":
        impl, work, batch, steps = rest
        result = measure_step(impl, work, int(batch), int(steps))
    elif kind == "gflop":
        result = {"gflop": jax_step_gflop(rest[0], int(rest[1]))}
    else:
        impl, root, size, batch, seconds = rest
        rate = (lightly_rate if impl == "lightly" else ours_rate)(
            pathlib.Path(root), int(size), int(batch), float(seconds)
        )
        result = {"images_per_s": rate}
    print(json.dumps(result))


def machine() -> str:
    """CPU model, core count and the vector extensions that matter for these kernels."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(f for f in wanted if f in flags)}"


def versions(impls: list[str]) -> str:
    """Library versions of each side."""
    import jax

    parts = [f"jax {jax.__version__}"]
    if any(impl.startswith("torch") for impl in impls):
        import torch
        import torchvision

        parts += [f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"]
    return ", ".join(parts)


def step_table(works: list[str], impls: list[str], rounds: int, steps: int) -> str:
    """Interleaved step measurements -> markdown table (median over rounds, range, ratios)."""
    gflop = {work: in_subprocess("gflop", work, str(WORKS[work][3]))["gflop"] for work in works}
    rates: dict[tuple[str, str], list[float]] = {}
    for round_index in range(rounds):
        for work in works:
            for impl in impls:
                batch = str(WORKS[work][3])
                rate = in_subprocess("step", impl, work, batch, str(steps))["images_per_s"]
                rates.setdefault((work, impl), []).append(rate)
                print(f"round {round_index + 1}: {work} {impl}: {rate:.2f} img/s", flush=True)
    lines = [
        "| work | implementation | images/s (median of rounds) | range | GFLOP/s | "
        "this project / it |",
        "|---|---|---|---|---|---|",
    ]
    for work in works:
        ours = statistics.median(rates[(work, "jax")]) if "jax" in impls else None
        for impl in impls:
            values = rates[(work, impl)]
            rate = statistics.median(values)
            images_per_step = WORKS[work][3]
            ratio = f"{ours / rate:.2f}x" if ours and impl != "jax" else "-"
            lines.append(
                f"| {work}, batch {images_per_step} | {impl} | {rate:.2f} | "
                f"{min(values):.2f}-{max(values):.2f} | "
                f"{gflop[work] * rate / images_per_step:.0f} | {ratio} |"
            )
    return "\n".join(lines)


def input_table(cifar_dir: pathlib.Path | None, rounds: int, seconds: float) -> str:
    """Interleaved input-pipeline measurements (ours, lightly) -> markdown table."""
    from bench_input import extract_cifar, make_256px_folder

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="compare_peers_"))
    cifar = cifar_dir or extract_cifar(tmp / "cifar")
    make_256px_folder(cifar, tmp / "big", per_class=100)
    cases = [(32, cifar, 256), (224, tmp / "big", 64)]
    rates: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds):
        for size, root, batch in cases:
            for impl in ("ours", "lightly"):
                args = (impl, str(root), str(size), str(batch), str(seconds))
                rates.setdefault((size, impl), []).append(
                    in_subprocess("input", *args)["images_per_s"]
                )
    lines = [
        "| case | this project (tf.data) images/s | lightly SimCLRTransform DataLoader images/s "
        "| ratio |",
        "|---|---|---|---|",
    ]
    for size, _, batch in cases:
        ours = statistics.median(rates[(size, "ours")])
        theirs = statistics.median(rates[(size, "lightly")])
        lines.append(f"| {size} px, batch {batch} | {ours:,.0f} | {theirs:,.0f} | "
                     f"{ours / theirs:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def works_and_impls(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[str], list[str]]:
    """--works and --impls as lists, or the parser's error naming the valid choices."""
    works = [w for w in args.works.split(",") if w]
    impls = [i for i in args.impls.split(",") if i]
    if not works or any(w not in WORKS for w in works):
        parser.error(f"--works={args.works!r}: choose from {', '.join(WORKS)}")
    if not impls or any(i not in IMPLS for i in impls):
        parser.error(f"--impls={args.impls!r}: choose from {', '.join(IMPLS)}")
    return works, impls


def main() -> None:
    """Parses flags, runs the interleaved rounds and prints the tables."""
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--works", default="r18_32,r50_224")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--input", action="store_true", help="also compare input pipelines")
    parser.add_argument("--seconds", type=float, default=8.0, help="per input measurement")
    parser.add_argument("--cifar_dir", type=pathlib.Path, default=None)
    args = parser.parse_args()
    works, impls = works_and_impls(parser, args)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    needs_torch = args.input or any(i != "jax" for i in impls)
    if needs_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit(PEERS_MISSING)
    print(f"machine: {machine()}\nversions: {versions(impls)}\n"
          f"load average before: {os.getloadavg()}", flush=True)  # fmt: skip
    print(f"\n{step_table(works, impls, args.rounds, args.steps)}\n", flush=True)
    if args.input:
        print(f"{input_table(args.cifar_dir, args.rounds, args.seconds)}\n")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
