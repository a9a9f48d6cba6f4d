"""Times the project's own SimCLR pretraining step (step.make_step with modes.pretrain's loss):
compile, step time, images/s, FLOPs, memory; with --input=pipeline each step also pulls its
batch from the real tf.data pipeline (bundled sample, two augmented views), so the two can be
compared.

    python benchmarks/bench_step.py --configs r18_32,r50_224 --steps 5 [--input pipeline]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

# Run as a script from anywhere: `configs` is a top-level folder, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_jax import data, loop, modes, parallel, train_state
from simclr_jax.config import get_base_config
from simclr_jax.models import conv, create_model
from simclr_jax.step import make_step

# name -> (resnet_depth, cifar_stem, image_size, batch, num_classes, temperature)
BENCHMARKS = {
    "r18_32": (18, True, 32, 128, 10, 0.5),
    "r50_224": (50, False, 224, 16, 1000, 0.1),
}


@dataclasses.dataclass
class Result:
    """One benchmark row."""

    name: str
    batch: int
    compile_s: float
    first_step_s: float
    step_s: float
    best_step_s: float
    images_per_s: float
    gflop_per_step: float
    gflop_per_s: float
    temp_plus_args_gib: float
    max_rss_gib: float


def build_config(name: str, batch: int | None, conv_kernel_grad: str) -> ml_collections.ConfigDict:
    """The base config with the benchmark's model, image size, batch and loss settings."""
    depth, cifar_stem, image_size, default_batch, num_classes, temperature = BENCHMARKS[name]
    config = get_base_config()
    config.model.resnet_depth = depth
    config.model.cifar_stem = cifar_stem
    config.model.num_proj_layers = 3
    config.model.num_classes = num_classes
    config.model.conv_kernel_grad = conv_kernel_grad
    config.data.image_size = image_size
    # --input=pipeline reads the bundled 32 px sample; 224 px uses the ImageNet augmentation.
    config.data.source, config.data.train_split = "bundled", "train"
    config.data.blur_prob = 0.5 if image_size > 32 else 0.0
    config.data.color_jitter_strength = 1.0 if image_size > 32 else 0.5
    config.train_batch_size = batch or default_batch
    config.loss.temperature = temperature
    config.optim.optimizer = "lars"
    return config


def synthetic_batches(config: ml_collections.ConfigDict, mesh: Any) -> Iterator[Any]:
    """The same random global batch every step: the step alone, no input pipeline."""
    rng = np.random.default_rng(0)
    size, batch = config.data.image_size, config.train_batch_size
    host = {
        "image": rng.uniform(size=(batch, 2, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, config.model.num_classes, size=batch).astype(np.int32),
    }
    return itertools.repeat(parallel.host_batch_to_global(host, mesh))


def pipeline_batches(config: ml_collections.ConfigDict, mesh: Any) -> Iterator[Any]:
    """Batches from the tf.data pipeline on the bundled sample (crop-resized to image_size), as
    run_training gets them."""
    return data.make_train_batches(
        config.data,
        mesh,
        split="train",
        batch_size=config.train_batch_size,
        num_views=2,
        augmentation="simclr",
        seed=0,
    )


def build_step(config: ml_collections.ConfigDict, mesh: Any) -> tuple[Any, Any]:
    """(initial train state, jitted pretraining step) for the config."""
    model = create_model(config.model, num_classes=config.model.num_classes, mode="pretrain")
    tx, schedule = loop.create_optimizer(config, loop.Durations(1000, 10, 1.0))
    state, shardings = train_state.create_train_state(
        model, tx, mesh, image_size=config.data.image_size, seed=0
    )
    return state, make_step(
        modes.get(config.mode).loss(config, model, mesh), tx, schedule, mesh, shardings
    )


def step_gflop(compiled: Any) -> float:
    """GFLOPs of one step from XLA's cost analysis of the compiled step."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) / 1e9


def run_benchmark(
    name: str, batch: int | None, steps: int, input_kind: str, conv_kernel_grad: str
) -> Result:
    """Compiles and times the trainer's pretraining step for one benchmark configuration."""
    config = build_config(name, batch, conv_kernel_grad)
    batch_size = config.train_batch_size
    mesh = parallel.create_mesh()
    parallel.check_batch_size(batch_size, mesh, "train_batch_size")
    state, step = build_step(config, mesh)
    batches = (pipeline_batches if input_kind == "pipeline" else synthetic_batches)(config, mesh)
    first = next(batches)

    start = time.perf_counter()
    compiled = step.lower(state, first).compile()
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    state, metrics = compiled(state, first)
    jax.block_until_ready((state, metrics))
    first_step_s = time.perf_counter() - start

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, next(batches))
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)

    max_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    gflop = step_gflop(compiled)
    if conv_kernel_grad != "xla":
        # XLA counts a scan body once, not once per iteration: take the step's FLOPs from the
        # native-gradient build of the same step (identical work).
        native_state, native_step = build_step(build_config(name, batch, "xla"), mesh)
        gflop = step_gflop(native_step.lower(native_state, first).compile())
    memory = compiled.memory_analysis()
    device_bytes = memory.temp_size_in_bytes + memory.argument_size_in_bytes
    return Result(
        name=f"{name} ({input_kind}, conv grad {conv_kernel_grad})",
        batch=batch_size,
        compile_s=compile_s,
        first_step_s=first_step_s,
        step_s=step_s,
        best_step_s=min(times),
        images_per_s=batch_size / step_s,
        gflop_per_step=gflop,
        gflop_per_s=gflop / step_s,
        temp_plus_args_gib=device_bytes / 2**30,
        max_rss_gib=max_rss_bytes / 2**30,
    )


def markdown_table(results: list[Result], steps: int) -> str:
    """Formats the results as a markdown table."""
    header = [
        "config",
        "batch (images, 2 views each)",
        "compile s",
        "first step s",
        f"median step s ({steps} steps)",
        "best step s",
        "images/s (median)",
        "GFLOP/step",
        "GFLOP/s",
        "temp+args GiB",
        "max RSS GiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [
            r.name,
            str(r.batch),
            f"{r.compile_s:.1f}",
            f"{r.first_step_s:.2f}",
            f"{r.step_s:.2f}",
            f"{r.best_step_s:.2f}",
            f"{r.images_per_s:.2f}",
            f"{r.gflop_per_step:.1f}",
            f"{r.gflop_per_s:.1f}",
            f"{r.temp_plus_args_gib:.2f}",
            f"{r.max_rss_gib:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parses flags, runs each benchmark and prints the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="r18_32,r50_224", help="comma-separated names")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    parser.add_argument("--batch", type=int, default=None, help="override the global batch")
    parser.add_argument(
        "--input",
        default="synthetic",
        choices=("synthetic", "pipeline"),
        help="synthetic: one device-resident batch (step only); pipeline: tf.data every step",
    )
    parser.add_argument(
        "--conv_kernel_grad",
        default="auto",
        choices=("auto", "xla", "im2col"),
        help="model.conv_kernel_grad: auto = im2col on CPU (models/conv.py); xla = native",
    )
    parser.add_argument(
        "--chunk_rows",
        type=int,
        default=conv.CHUNK_ROWS,
        help="im2col patch rows per scan iteration of the kernel gradient (models/conv.py)",
    )
    args = parser.parse_args()
    if args.chunk_rows < 1:
        parser.error(f"--chunk_rows={args.chunk_rows} must be >= 1")
    conv.CHUNK_ROWS = args.chunk_rows  # read when the step is traced: a tuning knob, not config
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        parser.error(f"--configs {unknown or names}: choose from {', '.join(BENCHMARKS)}")
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be >= 1")
    # Other processes on a shared machine slow the step down; the load average shows it.
    print(f"devices: {jax.devices()}; load average before: {os.getloadavg()}")
    results = []
    for name in names:
        results.append(
            run_benchmark(name, args.batch, args.steps, args.input, args.conv_kernel_grad)
        )
        print(markdown_table(results[-1:], args.steps), flush=True)
    print(f"\nload average after: {os.getloadavg()}")
    print(markdown_table(results, args.steps))


if __name__ == "__main__":
    main()
