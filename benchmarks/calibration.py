"""The preflight's estimate beside a measurement: supervised ResNet-50 at 224 px in bfloat16,
the per-chip batch of Google's MLPerf Training ResNet-50 runs, compiled for a slice of the same
generation; the estimated images/s per chip against the measured ones (docs/preflight.md).

    python benchmarks/calibration.py            # every generation (two R50 compiles)
    python benchmarks/calibration.py --rows v4

Measured rates (MLPerf Training results, mlcommons/training_results_v0.6 and _v0.7,
Google/results/.../resnet/result_0.txt): steady 4-epoch blocks (block_start to block_stop,
training and its eval) of 1,281,167 images, divided by the chips of the slice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (generation, slice compiled, per-device batch, measured images/s per chip, source)
ROWS = [
    # tpu-v3-128: 64 chips, 128 cores, global batch 16384 (128 per core); the block from
    # 1558515760.228 to 1558515801.212 s: 4 x 1,281,167 / 40.98 s / 64 = 1,954 per chip.
    ("v3", "v3-8", 128, 1954.0,
     "MLPerf Training v0.6, Google tpu-v3-128, training_results_v0.6/Google/results/"
     "tpu-v3-128/resnet/result_0.txt"),
    # tpu-v4-16: 8 chips, global batch 2048 (256 per chip); the block from 1592969541201 to
    # 1592969725335 ms: 4 x 1,281,167 / 184.13 s / 8 = 3,479 per chip.
    ("v4", "v4-16", 256, 3479.0,
     "MLPerf Training v0.7, Google tpu-v4-16 (research), training_results_v0.7/Google/results/"
     "tpu-v4-16-TF/resnet/result_0.txt"),
]  # fmt: skip


def mlperf_config(per_device_batch: int, devices: int):
    """Supervised ResNet-50 v1.5, 224 px, bfloat16: the finetune mode from scratch (cross
    entropy on h, no projection head, nothing frozen), LARS."""
    from configs import imagenet_finetune

    config = imagenet_finetune.get_config("100pct,r50_1x,v1")
    config.model.dtype = "bfloat16"
    config.model.proj_head_mode = "none"
    config.model.ft_proj_selector = 0
    config.model.fine_tune_after_block = -1
    config.optim.optimizer = "lars"
    config.data.image_size = 224
    config.train_batch_size = per_device_batch * devices
    # finetune restores an encoder; MLPerf trains from scratch, which compiles to the same step.
    # A checkpoint the preflight cannot reach here is not read (no weights are needed).
    config.init_checkpoint = "/nonexistent/mlperf-trains-from-scratch"
    return config


def main(argv: list[str] | None = None) -> int:
    """Prints the calibration table (markdown)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="", help="only generations containing this")
    args = parser.parse_args(argv[1:] if argv else [])
    from simclr_jax import preflight

    preflight.quiet_libtpu_environment()
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    print("| generation | slice compiled | batch/chip | estimate img/s/chip | bound | MFU est. "
          "| measured img/s/chip | measured_over_estimate |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for generation, name, per_device, measured, _ in ROWS:
        if args.rows not in generation:
            continue
        tpu = preflight.parse_accelerator_type(name)
        result = preflight.run_preflight(mlperf_config(per_device, tpu.num_devices), tpu)
        r = result.report
        chips = tpu.num_devices // (2 if generation in ("v2", "v3") else 1)
        estimate = r["images_per_second_estimate"] / chips
        per_chip_batch = r["global_batch"] // chips
        print(f"| {generation} | {name} | {per_chip_batch} | {estimate:.0f} | "
              f"{r['roofline_bound']} | {r['mfu_estimate']:.0%} | {measured:.0f} | "
              f"{measured / estimate:.2f} |", flush=True)  # fmt: skip
        print(f"  {name}: {r['flops_per_step'] / tpu.num_devices / 1e12:.2f} TFLOP and "
              f"{r['bytes_accessed_per_step_per_chip'] / 1e9:.1f} GB per device, "
              f"step {r['step_seconds_estimate'] * 1e3:.1f} ms", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    from simclr_jax.preflight import rerun_with_raised_stack_limit

    rerun_with_raised_stack_limit()
    sys.exit(main(sys.argv))
