"""Ahead-of-time preflight: compiles the exact training step a config would run on a Cloud TPU
slice, on any machine with libtpu installed (no TPU needed), and reports whether it fits in HBM
and what the compiler estimates it costs.

    python -m simclr_jax.preflight --config=configs/smoke.py:pretrain --tpu=v4-8
    python -m simclr_jax.preflight --config=configs/imagenet_pretrain.py:r50_1x,v1 --tpu=v3-128 \
        --config.model.dtype=bfloat16 --out=/tmp/preflight.json
    python -m simclr_jax.preflight --config=... --tpu=v5litepod-16 --max_batch
    python -m simclr_jax.preflight --config=... --tpu=v4-128 --fit

Nothing is allocated: the state is jax.eval_shape of the init, the batch is ShapeDtypeStructs
with the run's shardings, on a mesh of the slice's devices as libtpu describes them (one
device per chip on v4/v5p megacore and v5e/v6e, one per TensorCore on v2/v3, as jax.devices()
shows them on the slice). Every figure is the XLA TPU compiler's own estimate, not a
measurement. Exit status 0 when the step fits, 1 (with a one-line reason) when it does not fit
or compile, 2 for a bad argument or a config the trainer refuses (the same one validation).

The package: `core` (one compile and its report), `hardware` (generations, slices, libtpu's
devices), `collectives` (the HLO's collectives), `search` (--max_batch), `fit` (--fit), `cli`
(the flags).
"""

from simclr_jax.preflight import fit as fit_module
from simclr_jax.preflight.cli import main
from simclr_jax.preflight.collectives import parse_collectives
from simclr_jax.preflight.core import (
    Result,
    analyse,
    format_report,
    roofline,
    run_preflight,
    write_json,
)
from simclr_jax.preflight.fit import FIT_REMAT_POLICIES, FitResult, fit, fit_candidates, fit_line
from simclr_jax.preflight.hardware import (
    GENERATIONS,
    GIB,
    LIBTPU_PIP,
    STACK_RAISED_ENV,
    Generation,
    Slice,
    gib,
    known_accelerator_types,
    libtpu_available,
    parse_accelerator_type,
    quiet_libtpu_environment,
    rerun_with_raised_stack_limit,
    slice_devices,
    with_hbm,
    with_slices,
)
from simclr_jax.preflight.search import (
    MAX_BATCH_LAYOUTS,
    BatchSearch,
    Trial,
    max_batch,
    max_batch_line,
)

__all__ = [
    "FIT_REMAT_POLICIES",
    "FitResult",
    "fit",
    "fit_candidates",
    "fit_line",
    "fit_module",
    "GENERATIONS",
    "GIB",
    "LIBTPU_PIP",
    "MAX_BATCH_LAYOUTS",
    "STACK_RAISED_ENV",
    "BatchSearch",
    "Generation",
    "Result",
    "Slice",
    "Trial",
    "analyse",
    "gib",
    "format_report",
    "known_accelerator_types",
    "libtpu_available",
    "main",
    "max_batch",
    "max_batch_line",
    "parse_accelerator_type",
    "parse_collectives",
    "quiet_libtpu_environment",
    "rerun_with_raised_stack_limit",
    "roofline",
    "run_preflight",
    "slice_devices",
    "with_hbm",
    "with_slices",
    "write_json",
]
