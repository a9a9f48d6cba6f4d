"""On an accelerator: the pretraining step with and without on-device augmentation, and MFU.

    python benchmarks/bench_augment_step.py [--batch 256|max] [--steps 10] [--dtype bfloat16]

ResNet-50, 224 px, ImageNet augmentation (blur p=0.5) by default (`--work r18_32` for the CIFAR
model). Three timings, all device-resident:
- step: the pretraining step (step.make_step, modes.pretrain's loss) on ready float32 views
  (B, 2, 224, 224, 3);
- augment: data.make_device_augment on float32 (B, 2, 224, 224, 3) host-cropped views (what
  the Grain loader ships): flip, colour jitter, grayscale, blur;
- augment + step: both, as run_training chains them with data.backend='jax'.
`--batch max` picks the largest power-of-two batch whose compiled step fits the device's
memory (XLA's memory analysis; no batch or activations are allocated while searching, but
every batch tried keeps its own parameters and optimizer state, cached with its compiled
step). MFU is the step's FLOPs (XLA's cost analysis of the partitioned step, so per device)
per second over the chip's peak dense bf16 FLOP/s (PEAK_TFLOPS by device kind, or
--peak_tflops); blank where the peak is unknown (CPUs).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_step import BENCHMARKS, build_config, step_gflop  # noqa: E402
from benchmarks.timing import median_time  # noqa: E402
from simclr_jax import data, loop, modes, parallel, train_state  # noqa: E402
from simclr_jax.models import create_model  # noqa: E402
from simclr_jax.step import make_step  # noqa: E402

# Peak dense bf16 TFLOP/s per chip by jax device_kind prefix (first match wins), the vendors'
# published figures as recalled, not re-checked: pass --peak_tflops where it matters.
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,  # v5p
    "TPU v6 lite": 918.0,
}
FIT_FRACTION = 0.9  # of the device's memory a batch may plan to use (fragmentation headroom)


def peak_flops(device_kind: str, override_tflops: float | None) -> float | None:
    """The chip's peak FLOP/s, or None where unknown."""
    if override_tflops:
        return override_tflops * 1e12
    for prefix, tflops in PEAK_TFLOPS.items():
        if device_kind.startswith(prefix):
            return tflops * 1e12
    return None


class Bench:
    """The train state and the step of one work at one batch size, compiled once against the
    batch's shapes (no batch or activations allocated)."""

    def __init__(self, work: str, batch: int, dtype: str, kernel_grad: str = "auto") -> None:
        self.config = build_config(work, batch, kernel_grad)
        self.config.model.dtype = dtype
        self.batch, self.size = batch, int(self.config.data.image_size)
        self.mesh = parallel.create_mesh()
        parallel.check_batch_size(batch, self.mesh, "--batch")
        model = create_model(
            self.config.model, num_classes=self.config.model.num_classes, mode="pretrain"
        )
        tx, schedule = loop.create_optimizer(self.config, loop.Durations(1000, 10, 1.0))
        self.state, shardings = train_state.create_train_state(
            model, tx, self.mesh, image_size=self.size, seed=0
        )
        step = make_step(
            modes.get(self.config.mode).loss(self.config, model, self.mesh),
            tx,
            schedule,
            self.mesh,
            shardings,
        )
        self.compiled = step.lower(self.state, self.abstract_views()).compile()

    def abstract_views(self) -> dict:
        """The step's batch as shapes with shardings (compile without allocating it)."""
        sharding = parallel.batch_sharding(self.mesh)
        image = (self.batch, 2, self.size, self.size, 3)
        return {
            "image": jax.ShapeDtypeStruct(image, np.float32, sharding=sharding),
            "label": jax.ShapeDtypeStruct((self.batch,), np.int32, sharding=sharding),
        }


@functools.cache
def bench_for(work: str, batch: int, dtype: str, kernel_grad: str = "auto") -> Bench:
    """One Bench per setting: the batch search and the timed run share the compiled step."""
    return Bench(work, batch, dtype, kernel_grad)


def planned_bytes(work: str, batch: int, dtype: str) -> int:
    """Per-device bytes the compiled step needs: arguments, outputs not aliased to them, temps."""
    m = bench_for(work, batch, dtype).compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def memory_budget() -> float:
    """Bytes per device a batch may plan to use: FIT_FRACTION of the device's memory."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise SystemExit(
            "--batch max needs the device's memory size (memory_stats()['bytes_limit']), which "
            f"{jax.devices()[0].platform} does not report; pass --batch N instead."
        )
    return FIT_FRACTION * stats["bytes_limit"]


def largest_fitting_batch(work: str, dtype: str, start: int, limit: int, budget: float) -> int:
    """The largest power-of-two multiple of `start` (<= limit) whose step plans at most
    `budget` bytes per device."""
    best, batch = None, start
    while batch <= limit:
        need = planned_bytes(work, batch, dtype)
        print(f"batch {batch}: {need / 2**30:.1f} GiB of {budget / 2**30:.1f} GiB", flush=True)
        if need > budget:
            break
        best, batch = batch, 2 * batch
    if best is None:
        raise SystemExit(f"not even --batch {start} fits: {need / 2**30:.1f} GiB needed")
    return best


def main() -> None:
    """Prints the three timings, images/s and MFU as a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="r50_224", choices=sorted(BENCHMARKS))
    parser.add_argument("--batch", default="256", help="images per step, or 'max'")
    parser.add_argument("--max_batch_limit", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--peak_tflops", type=float, default=None, help="chip's peak, if known")
    args = parser.parse_args()

    if args.batch == "max":
        start = max(8, jax.device_count())
        batch = largest_fitting_batch(
            args.work, args.dtype, start, args.max_batch_limit, memory_budget()
        )
    else:
        batch = int(args.batch)
    bench = bench_for(args.work, batch, args.dtype)
    # XLA counts a scan body once: on CPU (im2col kernel gradient, models/conv.py) the FLOPs
    # come from the native-gradient build of the same step (identical work).
    on_cpu = jax.default_backend() == "cpu"
    gflop = step_gflop(
        bench_for(args.work, batch, args.dtype, "xla" if on_cpu else "auto").compiled
    )
    augment = data.make_device_augment(
        bench.config.data, bench.mesh, num_views=2, augmentation="simclr", seed=0
    )
    rng = np.random.default_rng(0)
    host = {
        "image": rng.random((batch, 2, bench.size, bench.size, 3), dtype=np.float32),
        "id": np.arange(batch, dtype=np.uint32),
        "label": rng.integers(0, bench.config.model.num_classes, batch).astype(np.int32),
    }
    raw = parallel.host_batch_to_global(host, bench.mesh)
    views = {"image": augment(raw["image"], raw["id"]), "label": raw["label"]}
    holder = {"state": bench.state}

    def run_step(batch_views):
        holder["state"], metrics = bench.compiled(holder["state"], batch_views)
        jax.block_until_ready(metrics)

    step_s = median_time(lambda: run_step(views), args.steps)
    augment_s = median_time(
        lambda: augment(raw["image"], raw["id"]).block_until_ready(), args.steps
    )
    both_s = median_time(
        lambda: run_step({"image": augment(raw["image"], raw["id"]), "label": raw["label"]}),
        args.steps,
    )
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind, args.peak_tflops)
    chips = jax.device_count()
    print(
        f"\n{args.work}, batch {batch} images (2 views), {args.dtype}, {kind} x{chips}, "
        f"{gflop:,.0f} GFLOP per device per step (XLA cost analysis)\n"
    )
    print("| timing | ms (median) | images/s | MFU |")
    print("|---|---|---|---|")
    for name, seconds in [("step", step_s), ("augment", augment_s), ("augment + step", both_s)]:
        uses_step = name != "augment"
        mfu = gflop * 1e9 / seconds / peak if peak and uses_step else None
        mfu_text = f"{mfu:.1%}" if mfu is not None else ""
        print(f"| {name} | {1000 * seconds:.1f} | {batch / seconds:,.1f} | {mfu_text} |")
    print(f"\naugmentation share of augment + step: {1 - step_s / both_s:.1%}")


if __name__ == "__main__":
    main()
