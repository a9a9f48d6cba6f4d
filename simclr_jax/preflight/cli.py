"""The preflight's command line: one preflight, or the --max_batch search."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Sequence
from typing import Any

from simclr_jax import cli
from simclr_jax.preflight.core import format_report, run_preflight, write_json
from simclr_jax.preflight.fit import FIT_REMAT_POLICIES, fit, fit_line
from simclr_jax.preflight.hardware import (
    GIB,
    LIBTPU_PIP,
    Slice,
    libtpu_available,
    parse_accelerator_type,
    slice_devices,
    with_hbm,
    with_slices,
)
from simclr_jax.preflight.search import MAX_BATCH_LAYOUTS, max_batch, max_batch_line


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit status (0 fits, 1 does not fit / does not compile, 2 a
    bad argument or a config the trainer refuses)."""
    return _absl_main(list(sys.argv if argv is None else argv))


def _absl_main(argv: list[str]) -> int:
    """Parses --config/--tpu/--out/--max_batch and runs one preflight."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file[:arg].", flag_values=flag_values
    )
    tpu_flag = flags.DEFINE_string(
        "tpu", None, "gcloud accelerator type, e.g. v4-32.", flag_values=flag_values
    )
    out_flag = flags.DEFINE_string(
        "out", None, "Write the JSON report here.", flag_values=flag_values
    )
    max_batch_flag = flags.DEFINE_bool(
        "max_batch", False, "Search the largest global batch that fits.", flag_values=flag_values
    )
    fit_flag = flags.DEFINE_bool(
        "fit", False, "Find the cheapest way to fit: as configured, FSDP, model.remat, both, "
        "then a smaller batch.", flag_values=flag_values,
    )  # fmt: skip
    fit_remat_flag = flags.DEFINE_list(
        "fit_remat", list(FIT_REMAT_POLICIES), "--fit: the model.remat policies to try, in "
        "order.", flag_values=flag_values,
    )  # fmt: skip
    layouts_flag = flags.DEFINE_list(
        "max_batch_for", list(MAX_BATCH_LAYOUTS), "--max_batch: search for these state layouts "
        f"({', '.join(MAX_BATCH_LAYOUTS)}).", flag_values=flag_values,
    )  # fmt: skip
    max_compiles_flag = flags.DEFINE_integer(
        "max_compiles", 8, "--max_batch: at most this many compiles per search.",
        flag_values=flag_values,
    )  # fmt: skip
    slices_flag = flags.DEFINE_integer(
        "num_slices", 1, "Slices of --tpu joined over DCN (a multislice: the mesh is hybrid, "
        "the report splits collectives into ICI and DCN).", flag_values=flag_values,
    )  # fmt: skip
    hbm_flag = flags.DEFINE_float(
        "hbm_gib", None, "Pretend each chip has this much HBM (GiB), e.g. to keep headroom.",
        flag_values=flag_values,
    )  # fmt: skip
    try:
        cli.parse_flags(argv, flag_values, prog="preflight")
        if not config_flag.value or not tpu_flag.value:
            raise ValueError("--config and --tpu are required, e.g. --config=configs/smoke.py "
                             "--tpu=v4-8.")  # fmt: skip
        tpu = with_slices(parse_accelerator_type(tpu_flag.value), slices_flag.value)
        if hbm_flag.value is not None:
            tpu = with_hbm(tpu, hbm_flag.value)
        unknown = sorted(set(layouts_flag.value) - set(MAX_BATCH_LAYOUTS))
        if unknown:
            raise ValueError(f"--max_batch_for={','.join(unknown)} is not a layout; use "
                             f"{' and/or '.join(MAX_BATCH_LAYOUTS)}.")  # fmt: skip
        from simclr_jax.models.resnet import REMAT_POLICIES

        bad = [p for p in fit_remat_flag.value if p not in REMAT_POLICIES or p == "none"]
        if bad:
            raise ValueError(f"--fit_remat={','.join(bad)} is not a remat policy; choose from "
                             f"{', '.join(p for p in REMAT_POLICIES if p != 'none')}.")  # fmt: skip
        if max_compiles_flag.value < 1:
            raise ValueError(f"--max_compiles={max_compiles_flag.value} must be at least 1.")
    except (flags.Error, ValueError) as error:
        print(f"preflight: {error}", file=sys.stderr)
        return 2
    if not libtpu_available():
        print(f"preflight: libtpu is not installed (the TPU compiler); run `{LIBTPU_PIP}` "
              "(linux x86_64 only).", file=sys.stderr)  # fmt: skip
        return 2
    config = config_flag.value
    import jax

    # Nothing but the report is written: no persistent compilation cache entries either.
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        devices = slice_devices(tpu)
        if fit_flag.value:
            return _print_fit(config, tpu, devices, out_flag.value, max_compiles_flag.value,
                              fit_remat_flag.value)  # fmt: skip
        if max_batch_flag.value:
            return _print_max_batch(
                config, tpu, devices, out_flag.value, max_compiles_flag.value, layouts_flag.value
            )
        result = run_preflight(config, tpu, devices=devices)
    except (ValueError, OSError) as error:  # a config the trainer refuses: exit status 2 too
        print(f"preflight: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a search stopped by a compile error; a libtpu mismatch
        print(f"preflight: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(format_report(result.report))
    if out_flag.value:
        write_json(out_flag.value, result.report)
    if not result.ok:
        hint = ""
        if not result.reason.startswith("does not compile"):
            hint = "; --fit finds the cheapest way to fit (FSDP, model.remat, a smaller batch)"
        print(f"preflight: {tpu.name}: {result.reason}{hint}", file=sys.stderr)
    return 0 if result.ok else 1


def _print_fit(config: Any, tpu: Slice, devices: Sequence[Any], out: str | None,
               max_compiles: int, remat_policies: Sequence[str]) -> int:  # fmt: skip
    """--fit: one line per way tried, then the answer; exit 0 only when the config fits as
    it is, and the answer as the last line on stderr otherwise (what the launcher shows)."""
    log = functools.partial(print, flush=True)
    result = fit(config, tpu, devices, remat_policies=remat_policies, max_compiles=max_compiles,
                 log=log)  # fmt: skip
    line = fit_line(tpu, config, result)
    if out:
        write_json(out, {"tpu": tpu.accelerator_type,
                         "hbm_per_chip_gib": tpu.hbm_bytes_per_device / GIB,
                         "fit": result.to_json(), "answer": line})  # fmt: skip
    as_configured = result.chosen is not None and not result.chosen.changes
    if as_configured:
        log(line)
        return 0
    print(f"preflight: {line}", file=sys.stderr, flush=True)
    return 1


def _print_max_batch(
    config: Any,
    tpu: Slice,
    devices: Sequence[Any],
    out: str | None,
    max_compiles: int,
    layouts: Sequence[str] = MAX_BATCH_LAYOUTS,
) -> int:
    """--max_batch: searches without and with FSDP, one line per compile, then the answers."""
    import ml_collections

    log = functools.partial(print, flush=True)

    results = {}
    for label, min_size in MAX_BATCH_LAYOUTS.items():
        if label not in layouts:
            continue
        trial = ml_collections.ConfigDict(config.to_dict())
        trial.mesh.fsdp_min_size = config.mesh.fsdp_min_size or min_size
        if label == "replicated":
            trial.mesh.fsdp_min_size = 0
        search = max_batch(trial, tpu, devices, max_compiles=max_compiles, label=label, log=log)
        log(max_batch_line(tpu, label, trial.mesh.fsdp_min_size, search))
        results[label] = {
            "fsdp_min_size": int(trial.mesh.fsdp_min_size),
            "max_batch": search.batch,
            "closed": search.closed,
            "trials": [dataclasses.asdict(t) for t in search.trials],
        }
    if out:
        write_json(out, {"tpu": tpu.accelerator_type,
                         "hbm_per_chip_gib": tpu.hbm_bytes_per_device / GIB,
                         "max_batch": results})  # fmt: skip
    return 0 if max(r["max_batch"] for r in results.values()) > 0 else 1
