"""On an accelerator: the pretraining step with and without on-device augmentation.

    python benchmarks/bench_augment_step.py [--batch 256] [--steps 10] [--dtype bfloat16]

ResNet-50, 224 px, ImageNet augmentation (blur p=0.5). Three timings, all device-resident:
- step: train.make_pretrain_step on ready float32 views (B, 2, 224, 224, 3);
- augment: data.make_device_augment on uint8 (B, 2, 224, 224, 3) host-cropped views (what
  the Grain loader ships): flip, colour jitter, grayscale, blur;
- augment + step: both, as run_training chains them with data.backend='jax'.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_step import build_config  # noqa: E402
from simclr_jax import data, parallel, train  # noqa: E402
from simclr_jax.models import create_model  # noqa: E402


def median_time(fn, steps: int) -> float:
    """Median seconds of fn() (which blocks), after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Prints the three timings as a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    config = build_config("r50_224", args.batch, "auto")
    config.model.dtype = args.dtype
    mesh = parallel.create_mesh()
    model = create_model(config.model, num_classes=config.model.num_classes, mode="pretrain")
    tx, schedule = train.create_optimizer(config, train.Durations(1000, 10, 1.0))
    state, shardings = train.create_train_state(model, tx, mesh, image_size=224, seed=0)
    step = train.make_train_step(config, model, tx, schedule, mesh, shardings)
    augment = data.make_device_augment(
        config.data, mesh, num_views=2, augmentation="simclr", seed=0
    )
    rng = np.random.default_rng(0)
    host = {
        "image": rng.integers(0, 256, (args.batch, 2, 224, 224, 3), dtype=np.uint8),
        "id": np.arange(args.batch, dtype=np.uint32),
        "label": rng.integers(0, 1000, args.batch).astype(np.int32),
    }
    raw = parallel.host_batch_to_global(host, mesh)
    views = {"image": augment(raw["image"], raw["id"]), "label": raw["label"]}
    holder = {"state": state}

    def run_step(batch):
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    step_s = median_time(lambda: run_step(views), args.steps)
    augment_s = median_time(
        lambda: augment(raw["image"], raw["id"]).block_until_ready(), args.steps
    )
    both_s = median_time(
        lambda: run_step({"image": augment(raw["image"], raw["id"]), "label": raw["label"]}),
        args.steps,
    )
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
    print(f"\nResNet-50 224 px, batch {args.batch} images (2 views), {args.dtype}, {device}\n")
    print("| timing | ms (median) | images/s |")
    print("|---|---|---|")
    for name, seconds in [("step", step_s), ("augment", augment_s), ("augment + step", both_s)]:
        print(f"| {name} | {1000 * seconds:.1f} | {args.batch / seconds:,.0f} |")
    print(f"\naugmentation share of augment + step: {1 - step_s / both_s:.1%}")


if __name__ == "__main__":
    main()
