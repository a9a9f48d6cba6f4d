"""Preflight table of the paper's configurations: memory per chip, fits, estimated step time,
images/s, hours for the recipe and implied MFU, float32 and bfloat16 (compiler estimates).

    python benchmarks/preflight_table.py            # every row (each compile takes minutes)
    python benchmarks/preflight_table.py --rows r50_v4   # rows whose name contains r50_v4
    python benchmarks/preflight_table.py --rows tpu7x --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (row name, config, accelerator, overrides, what the paper reports for the row)
ROWS = [
    ("r50_v1_v3", "configs/imagenet_pretrain.py:r50_1x,v1,e100", "v3-128", {},
     "paper: ~1.5 h / 100 epochs on 128 v3 cores = ~0.17 s/step"),
    ("r50_v2_v4", "configs/imagenet_pretrain.py:r50_1x,v2", "v4-128", {}, ""),
    ("r50_v2_v5e", "configs/imagenet_pretrain.py:r50_1x,v2", "v5litepod-256", {}, ""),
    ("r50_v2_v6e", "configs/imagenet_pretrain.py:r50_1x,v2", "v6e-64", {}, ""),
    ("r50_v2_v5e_x2", "configs/imagenet_pretrain.py:r50_1x,v2", "2 x v5litepod-256", {}, ""),
    ("r50_v2_tpu7x", "configs/imagenet_pretrain.py:r50_1x,v2", "tpu7x-128", {}, ""),
    ("r152_3x_sk", "configs/imagenet_pretrain.py:r152_3x_sk", "v4-128", {}, ""),
    ("r152_3x_sk_fsdp", "configs/imagenet_pretrain.py:r152_3x_sk", "v4-128",
     {"mesh.fsdp_min_size": 2**16}, ""),
    ("r152_3x_sk_remat", "configs/imagenet_pretrain.py:r152_3x_sk", "v4-128",
     {"model.remat": "block"}, ""),
    ("r152_3x_sk_fsdp_remat", "configs/imagenet_pretrain.py:r152_3x_sk", "v4-128",
     {"mesh.fsdp_min_size": 2**16, "model.remat": "block"}, ""),
]  # fmt: skip
DTYPES = ("float32", "bfloat16")


def load_config(spec: str, overrides: dict, dtype: str):
    """The config of 'file.py:arg' with overrides and model.dtype applied."""
    import importlib

    path, _, arg = spec.partition(":")
    config = importlib.import_module("configs." + Path(path).stem).get_config(arg or None)
    for field, value in overrides.items():
        node = config
        *parents, leaf = field.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    config.model.dtype = dtype
    return config


def main(argv: list[str] | None = None) -> int:
    """Prints the table (markdown), one row per configuration and dtype."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="", help="only rows whose name contains this")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="model.dtype of each row")
    args = parser.parse_args(argv[1:] if argv else [])
    from simclr_jax import preflight

    preflight.quiet_libtpu_environment()
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    print(
        "| row | slice | dtype | memory/chip (GiB) | fits | step (s) | bound | images/s "
        "| hours | MFU | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, spec, accelerator, overrides, note in ROWS:
        if args.rows not in name:
            continue
        slices, _, single = accelerator.rpartition(" x ")  # "2 x v5litepod-256": multislice
        tpu = preflight.with_slices(preflight.parse_accelerator_type(single), int(slices or 1))
        for dtype in args.dtypes.split(","):
            result = preflight.run_preflight(load_config(spec, overrides, dtype), tpu)
            r = result.report
            total = r.get("bytes_per_chip", {}).get("total")
            total = (
                total
                if total is not None
                else r.get("state_bytes_per_chip", 0) + r.get("activation_bytes_per_chip", 0)
            )
            if "step_seconds_estimate" in r:
                cells = (
                    f"{r['step_seconds_estimate']:.3f}",
                    r["roofline_bound"],
                    f"{r['images_per_second_estimate']:.0f}",
                    f"{r['run_hours_estimate']:.1f}",
                    f"{r['mfu_estimate']:.0%}",
                )
            else:
                cells = ("-",) * 5
            row_note = note
            if r.get("dcn_seconds_estimate") is not None and r.get("num_slices", 1) > 1:
                dcn = sum(r["collective_bytes_dcn"].values()) / 2**20
                row_note = "; ".join(filter(None, [
                    f"DCN {dcn:.0f} MiB/chip/step, ~{r['dcn_seconds_estimate'] * 1e3:.0f} ms at "
                    f"{r['dcn_gbits_per_s_per_host']:g} Gb/s/host", note]))  # fmt: skip
            print(f"| {name} | {accelerator} | {dtype} | {total / 2**30:.1f} | "
                  f"{'yes' if result.ok else 'no'} | " + " | ".join(cells) + f" | {row_note} |",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    from simclr_jax.preflight import rerun_with_raised_stack_limit

    rerun_with_raised_stack_limit()  # the v6e row's compile needs more than 8 MiB of stack
    sys.exit(main(sys.argv))
