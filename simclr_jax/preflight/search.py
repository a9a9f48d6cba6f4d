"""--max_batch: the largest global batch whose step fits, found in a few compiles."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

from simclr_jax.preflight.core import run_preflight
from simclr_jax.preflight.hardware import Slice, gib


@dataclasses.dataclass(frozen=True)
class Trial:
    """One compile of the batch search: the global batch, whether it fits, the compiled total
    per chip (None when decided before compiling or the compiler gave up), and its seconds."""

    batch: int
    fits: bool
    total_bytes: int | None
    seconds: float
    reason: str


@dataclasses.dataclass
class BatchSearch:
    """Outcome of max_batch: the largest fitting global batch (0: none), every trial, and
    whether the next multiple was shown not to fit."""

    batch: int
    unit: int
    trials: list[Trial]
    closed: bool

    def trial(self, batch: int) -> Trial | None:
        """The trial of one global batch, if it was compiled."""
        return next((t for t in self.trials if t.batch == batch), None)


def _trial_line(label: str, trial: Trial, hbm_bytes: float) -> str:
    """One progress line: the batch tried, fits or not, GiB needed, seconds."""
    if trial.total_bytes is not None:
        need = f"needs {gib(trial.total_bytes, 4)} of {gib(hbm_bytes, 4)}"
    else:
        need = trial.reason
    verdict = "fits" if trial.fits else "does not fit"
    return f"  [{label}] global batch {trial.batch}: {verdict}, {need}, {trial.seconds:.0f} s"


def _estimate(trial: Trial, state_bytes: int, unit: int, hbm_bytes: float) -> int:
    """The multiple of unit where memory per chip reaches HBM, from one compile: everything
    beyond the state counted as growing with the batch, so it errs low where the program has
    other fixed buffers (less so the larger the batch compiled)."""
    per_image = max((trial.total_bytes or 0) - state_bytes, 1) / trial.batch
    return math.floor((hbm_bytes - state_bytes) / per_image / unit)


def max_batch(
    config: Any,
    tpu: Slice,
    devices: Sequence[Any],
    *,
    max_compiles: int = 8,
    label: str = "",
    log: Any = None,
) -> BatchSearch:
    """Largest global batch (a multiple of the data axis) whose step fits, by bisection from one
    estimate: the config's own batch, then the estimate its memory gives; while nothing has
    failed, steps of 1, 2, 4, ... multiples beyond the largest batch that fits; then bisection
    of the bracket down to adjacent multiples. At most max_compiles compiles, one progress
    line (log) each."""
    import ml_collections

    from simclr_jax import parallel

    mesh = parallel.create_mesh(
        data=config.mesh.get("data", -1), model=config.mesh.get("model", 1), devices=devices
    )
    unit = mesh.shape["data"]
    field = "eval_batch_size" if config.mode == "eval" else "train_batch_size"
    hbm = tpu.hbm_bytes_per_device
    trials: list[Trial] = []
    state_bytes = 0

    def attempt(multiple: int) -> Trial:
        nonlocal state_bytes
        trial_config = ml_collections.ConfigDict(config.to_dict())
        trial_config[field] = multiple * unit
        started = time.time()
        result = run_preflight(trial_config, tpu, devices=devices)
        if result.reason.startswith("does not compile"):  # not a matter of memory: no answer
            raise RuntimeError(f"{field}={multiple * unit} {result.reason}")
        total = result.report.get("bytes_per_chip", {}).get("total")
        state_bytes = result.report.get("state_bytes_per_chip", state_bytes)
        trial = Trial(multiple * unit, result.ok, total, time.time() - started, result.reason)
        trials.append(trial)
        if log:
            log(_trial_line(label, trial, hbm))
        return trial

    first = max(1, config[field] // unit)
    trial = attempt(first)
    lo, hi = (first, None) if trial.fits else (0, first)
    while (hi is None or hi - lo > 1) and len(trials) < max_compiles:
        guess = None if trial.total_bytes is None else _estimate(trial, state_bytes, unit, hbm)
        if hi is None:  # all fit so far: the estimate from the largest, 2x to 8x further
            # the first time (compiles slow with the batch), at least one multiple after
            low = 2 * lo if len(trials) == 1 else lo + 1
            nxt = min(max(guess or 0, low), 8 * lo)
        elif guess is not None and len(trials) == 1:  # the first did not fit: its estimate
            nxt = min(max(guess, hi // 8, 1), hi - 1)
        else:  # a bracket: bisection
            nxt = (lo + hi) // 2
        trial = attempt(nxt)
        lo, hi = (nxt, hi) if trial.fits else (lo, nxt)
    return BatchSearch(lo * unit, unit, trials, closed=hi is not None and hi - lo == 1)


# --max_batch's state layouts: fsdp_min_size 0 (replicated) and the config's own or 2**16.
MAX_BATCH_LAYOUTS = {"replicated": 0, "fsdp": 2**16}


def max_batch_line(tpu: Slice, label: str, min_size: int, search: BatchSearch) -> str:
    """The search's final line: the answer, its memory, and what bounds it."""
    head = (
        f"{tpu.accelerator_type}: largest global batch that fits ({label}, "
        f"fsdp_min_size={min_size}): "
    )
    seconds = sum(t.seconds for t in search.trials)
    tail = f"{len(search.trials)} compiles, {seconds:.0f} s"
    best = search.trial(search.batch)
    if best is None:
        return f"{head}none (not even {search.unit}, one per device); {tail}"
    memory = f"{gib(best.total_bytes or 0, 4)} of {gib(tpu.hbm_bytes_per_device, 4)} per chip"
    above = min((t.batch for t in search.trials if not t.fits), default=None)
    if search.closed:
        return f"{head}{search.batch} ({memory}; {above} does not fit); {tail}"
    bound = f"{above} does not fit" if above else "no larger batch was tried"
    return (
        f"{head}at least {search.batch} ({memory}; {bound}); stopped after {tail}; "
        "raise --max_compiles to close the bracket"
    )
