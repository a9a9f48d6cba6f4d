"""CPU step time of the smoke model (configs/smoke.py: ResNet-18 at 16 px) under each
model.remat policy: compile seconds, median step seconds, images/s (one CPU device).

    python benchmarks/remat_cpu_step.py --steps 10 [--batch 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    """Prints one markdown row per policy."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
    parser.add_argument("--policies", default="", help="comma separated; default: all")
    args = parser.parse_args()
    import jax
    import numpy as np

    from configs import smoke
    from simclr_jax import loop, modes, parallel, step, train_state
    from simclr_jax.models import create_model
    from simclr_jax.models.resnet import REMAT_POLICIES

    policies = args.policies.split(",") if args.policies else list(REMAT_POLICIES)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {len(jax.devices())} device(s)")
    print("| remat | batch | compile (s) | step (s), median | images/s |")
    print("|---|---|---|---|---|")
    for policy in policies:
        config = smoke.get_config("pretrain")
        config.model.remat = policy
        config.model.num_classes = 10
        batch = args.batch or config.train_batch_size
        config.train_batch_size = batch
        size = config.data.image_size
        mesh = parallel.create_mesh(devices=jax.devices()[:1])
        model = create_model(config.model, num_classes=10)
        durations = loop.Durations(total_steps=1000, warmup_steps=10, steps_per_epoch=1.0)
        tx, schedule = loop.create_optimizer(config, durations)
        state, shardings = train_state.create_train_state(model, tx, mesh, image_size=size, seed=0)
        train_step = step.make_step(
            modes.get(config.mode).loss(config, model, mesh), tx, schedule, mesh, shardings
        )
        rng = np.random.default_rng(0)
        host = {
            "image": rng.random((batch, 2, size, size, 3), dtype=np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32),
        }
        started = time.perf_counter()
        state, metrics = train_step(state, parallel.host_batch_to_global(host, mesh))
        jax.block_until_ready(metrics)
        compile_seconds = time.perf_counter() - started
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            state, metrics = train_step(state, parallel.host_batch_to_global(host, mesh))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        print(f"| {policy} | {batch} | {compile_seconds:.0f} | {median:.3f} | "
              f"{batch / median:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
