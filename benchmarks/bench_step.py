"""Times one jitted SimCLR pretraining step: compile, step time, images/s, FLOPs, memory.

The step is a deliberately small stand-in for the training helper's train step (to be
replaced by it once `simclr_jax/train.py` lands): forward of both views as one interleaved
batch of 2B images, NT-Xent over the mesh, online linear-probe cross entropy on
stop_gradient(h), backward, LARS update, batch statistics update, state donated.

    python benchmarks/bench_step.py --configs r18_32,r50_224 --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# Run as a script from anywhere: `configs` is a top-level folder, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.common import get_base_config
from simclr_jax import losses, optim, parallel
from simclr_jax.models import create_model

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


def build_config(name: str, batch: int | None) -> ml_collections.ConfigDict:
    """The base config with the benchmark's model, image size, batch and loss settings."""
    depth, cifar_stem, image_size, default_batch, num_classes, temperature = BENCHMARKS[name]
    config = get_base_config()
    config.model.resnet_depth = depth
    config.model.cifar_stem = cifar_stem
    config.model.num_proj_layers = 3
    config.model.num_classes = num_classes
    config.data.image_size = image_size
    config.train_batch_size = batch or default_batch
    config.loss.temperature = temperature
    config.optim.optimizer = "lars"
    return config


def make_step(config: ml_collections.ConfigDict, model: Any, tx: Any, mesh: Any):
    """Returns the pure pretraining step (state, images (B,2,H,W,3), labels) -> (state, metrics)."""
    num_classes = config.model.num_classes

    def step(state: dict[str, Any], images: jax.Array, labels: jax.Array):
        batch = images.shape[0]
        views = images.reshape((2 * batch, *images.shape[2:]))

        def loss_fn(params):
            outputs, new_vars = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                views,
                train=True,
                mutable=["batch_stats"],
            )
            z = outputs["z"].reshape(batch, 2, -1)
            contrast, metrics = losses.nt_xent(
                z[:, 0],
                z[:, 1],
                mesh,
                temperature=config.loss.temperature,
                hidden_norm=config.loss.hidden_norm,
            )
            probe = losses.softmax_cross_entropy(
                outputs["logits"], jnp.repeat(labels, 2), num_classes
            )
            return contrast + probe, (new_vars["batch_stats"], metrics)

        grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats,
            "opt_state": opt_state,
        }
        return new_state, metrics

    return step


def run_benchmark(name: str, batch: int | None, steps: int) -> Result:
    """Compiles and times the step for one benchmark configuration."""
    config = build_config(name, batch)
    batch_size, size = config.train_batch_size, config.data.image_size
    mesh = parallel.create_mesh()
    parallel.check_batch_size(batch_size, mesh, "train_batch_size")
    model = create_model(config.model, num_classes=config.model.num_classes, mode="pretrain")
    tx, _ = optim.create_optimizer(
        config.optim, batch_size=batch_size, total_steps=1000, warmup_steps=10
    )
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(batch_size, 2, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, config.model.num_classes, size=batch_size).astype(np.int32)
    images, labels = (jax.device_put(a, parallel.batch_sharding(mesh)) for a in (images, labels))

    replicated = parallel.replicated(mesh)

    def init(key):
        variables = model.init(key, jnp.zeros((2, size, size, 3), jnp.float32), train=False)
        return {
            "params": variables["params"],
            "batch_stats": variables["batch_stats"],
            "opt_state": tx.init(variables["params"]),
        }

    state = jax.jit(init, out_shardings=replicated)(jax.random.key(0))
    step = jax.jit(
        make_step(config, model, tx, mesh),
        in_shardings=(replicated, parallel.batch_sharding(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )

    start = time.perf_counter()
    compiled = step.lower(state, images, labels).compile()
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    state, metrics = compiled(state, images, labels)
    jax.block_until_ready((state, metrics))
    first_step_s = time.perf_counter() - start

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, images, labels)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflop = float(cost.get("flops", float("nan"))) / 1e9
    memory = compiled.memory_analysis()
    device_bytes = memory.temp_size_in_bytes + memory.argument_size_in_bytes
    max_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return Result(
        name=name,
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
    args = parser.parse_args()
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
        results.append(run_benchmark(name, args.batch, args.steps))
        print(markdown_table(results[-1:], args.steps), flush=True)
    print(f"\nload average after: {os.getloadavg()}")
    print(markdown_table(results, args.steps))


if __name__ == "__main__":
    main()
