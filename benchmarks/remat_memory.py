"""What model.remat costs and saves: the pretraining step of a model compiled for a TPU slice
(libtpu on this CPU host) under every remat policy; FLOPs per chip, their overhead over no
remat, temporaries and total memory per chip. Compiler estimates, not measurements.

    python benchmarks/remat_memory.py --model=r50_1x --tpu=v4-8 --per_chip_batch=64
    python benchmarks/remat_memory.py --model=r152_3x_sk --tpu=v4-8 --per_chip_batch=64
    python benchmarks/remat_memory.py --model=r152_3x_sk --traced   # no compile: residuals, FLOPs

A step whose program exceeds the chip's real HBM still compiles when libtpu can place it; when
it cannot, the row gives the compiler's own out-of-memory figure.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30


def compile_policy(model: str, tpu_name: str, per_chip_batch: int, dtype: str, remat: str):
    """(flops per chip, temporaries, total bytes per chip, seconds, error) of one compile."""
    from configs import imagenet_pretrain
    from simclr_jax import parallel
    from simclr_jax.preflight import core, hardware

    tpu = hardware.parse_accelerator_type(tpu_name)
    config = imagenet_pretrain.get_config(model)
    config.model.dtype = dtype
    config.model.remat = remat
    config.train_batch_size = per_chip_batch * tpu.num_devices
    devices = hardware.slice_devices(tpu)
    mesh = parallel.create_mesh(devices=devices)
    config, info = core.prepare_config(config, mesh)
    step, args, _ = core.abstract_step(config, mesh, info)
    started = time.time()
    try:
        compiled = step.lower(*args).compile()
    except Exception as error:  # noqa: BLE001 - the compiler's message is the row
        found = re.search(r"[Uu]sed ([\d.]+)([KMG])", str(error))
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}
        used = float(found.group(1)) * scale[found.group(2)] if found else None
        return None, None, used, time.time() - started, " ".join(str(error).split())[:160]
    report = core.analyse(compiled, tpu, config, None)
    per = report["bytes_per_chip"]
    flops = report["flops_per_step"] / tpu.num_devices
    return flops, per["temporaries"], per["total"], time.time() - started, ""


def traced_rows(model: str, per_chip_batch: int, dtype: str, policies: list[str]) -> None:
    """--traced: per policy, the backward pass's residuals for the chip's views (eval_shape)
    and the encoder's forward+backward FLOPs for 8 images (lowered for the CPU); no compile."""
    import jax

    from configs import imagenet_pretrain
    from simclr_jax import parallel
    from simclr_jax.preflight.core import activation_bytes, prepare_config
    from simclr_jax.preflight.fit import backward_flops

    print(f"{model}, {dtype}, {per_chip_batch} images ({2 * per_chip_batch} views) per chip")
    print("| policy | residuals/chip (GiB) | saving | GFLOP per 8 images | FLOP overhead |")
    print("|---|---|---|---|---|")
    config = imagenet_pretrain.get_config(model)
    config.model.dtype = dtype
    config.train_batch_size = per_chip_batch
    config, _ = prepare_config(config, parallel.create_mesh(devices=jax.devices()[:1]))
    base = None
    for policy in policies:
        config.model.remat = policy
        residuals = activation_bytes(config, 2 * per_chip_batch)
        flops = backward_flops(config, 8)
        base = base or (residuals, flops)
        print(f"| {policy} | {residuals / GIB:.2f} | {1 - residuals / base[0]:.0%} | "
              f"{flops / 1e9:.1f} | {flops / base[1] - 1:+.1%} |", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Prints one markdown row per remat policy."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="r50_1x", help="imagenet_pretrain.py model token")
    parser.add_argument("--tpu", default="v4-8")
    parser.add_argument("--per_chip_batch", type=int, default=64, help="images per chip")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--policies", default="", help="comma separated; default: all")
    parser.add_argument("--traced", action="store_true", help="no compile: residuals, FLOPs")
    args = parser.parse_args(argv[1:] if argv else [])
    from simclr_jax import preflight
    from simclr_jax.models.resnet import REMAT_POLICIES

    preflight.quiet_libtpu_environment()
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    policies = args.policies.split(",") if args.policies else list(REMAT_POLICIES)
    if args.traced:
        traced_rows(args.model, args.per_chip_batch, args.dtype, policies)
        return 0
    print(f"{args.model}, {args.dtype}, {args.per_chip_batch} images (x2 views) per chip, "
          f"{args.tpu}")  # fmt: skip
    print("| policy | GFLOP/chip | FLOP overhead | temporaries (GiB) | total/chip (GiB) | "
          "saving | compile (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    base_flops = base_total = None
    for policy in policies:
        flops, temps, total, seconds, error = compile_policy(
            args.model, args.tpu, args.per_chip_batch, args.dtype, policy
        )
        if policy == "none":
            base_flops, base_total = flops, total
        overhead = f"{flops / base_flops - 1:+.1%}" if flops and base_flops else "-"
        saving = f"{1 - total / base_total:.0%}" if total and base_total else "-"
        cells = [
            policy,
            f"{flops / 1e9:.0f}" if flops else "-",
            overhead,
            f"{temps / GIB:.2f}" if temps is not None else "-",
            (f"{total / GIB:.2f}" if total else "-") + (" (compiler OOM)" if error else ""),
            saving,
            f"{seconds:.0f}",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
        if error and not total:
            print(f"  {policy}: {error}", flush=True)
    return 0


if __name__ == "__main__":
    from simclr_jax.preflight import rerun_with_raised_stack_limit

    rerun_with_raised_stack_limit()
    sys.exit(main(sys.argv))
