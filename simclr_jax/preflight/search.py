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


def _linear_guess(trials: Sequence[Trial], unit: int, hbm_bytes: float) -> int | None:
    """The multiple of unit at which memory per chip, as a line through two compiled trials,
    reaches HBM (floored); None without two. The line goes through the largest trial that fits
    and the smallest that does not when both were compiled (interpolation), else through the
    two nearest the limit. Per-image buffers (activations, their gradients) grow linearly with
    the batch; the state, the gradients and the code do not."""
    known = [t for t in trials if t.total_bytes is not None]
    fitting = [t for t in known if t.fits]
    failing = [t for t in known if not t.fits]
    if fitting and failing:
        pair = [max(fitting, key=lambda t: t.batch), min(failing, key=lambda t: t.batch)]
    else:
        pair = sorted(known, key=lambda t: abs(t.total_bytes - hbm_bytes))[:2]
    if len(pair) < 2 or pair[0].batch == pair[1].batch:
        return None
    a, b = pair
    slope = (b.total_bytes - a.total_bytes) / (b.batch - a.batch)
    if slope <= 0:
        return None
    # The small epsilon keeps a batch exactly at the limit from flooring one multiple below.
    return math.floor((a.batch + (hbm_bytes - a.total_bytes) / slope) / unit + 1e-9)


def _second_multiple(first: Trial, state_bytes: int, unit: int, hbm_bytes: float) -> int:
    """Where to compile after the first trial: far enough from it for a useful slope (2x to
    8x when it fits, half when not), near the one-point extrapolation that counts everything
    beyond the state as per image."""
    multiple = first.batch // unit
    if not first.fits or first.total_bytes is None:
        return multiple // 2
    per_image = max(first.total_bytes - state_bytes, 1) / first.batch
    guess = math.floor((hbm_bytes - state_bytes) / per_image / unit)
    return min(max(guess, 2 * multiple), 8 * multiple)


def _next_multiple(lo: int, hi: int | None, guess: int | None, same_side: bool) -> int:
    """The next multiple to compile (lo fits, hi does not, None: nothing failed yet): the
    linear guess, kept inside the bracket (and under 8x lo). When two guesses in a row fell on
    the same side (memory is not quite linear in the batch): the middle of the bracket, or,
    with nothing failed yet, twice as far beyond lo as the guess."""
    if guess is not None and guess <= lo:  # the line ends at lo: check the next multiple
        return lo + 1
    if hi is None:  # extrapolating: at most 8x at a time, as compiles slow with the batch
        if guess is None:
            return 2 * lo
        return min(lo + 2 * (guess - lo) if same_side else guess, 8 * lo)
    if guess is None or (same_side and hi - lo > 2):
        return (lo + hi) // 2
    return min(guess, hi - 1)


def max_batch(
    config: Any,
    tpu: Slice,
    devices: Sequence[Any],
    *,
    max_compiles: int = 8,
    label: str = "",
    log: Any = None,
) -> BatchSearch:
    """Largest global batch (a multiple of the data axis) whose step fits: a line through the
    memory of the first compiles estimates it, then bisection closes the bracket of adjacent
    multiples; at most max_compiles compiles, one progress line (log) each."""
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
            raise ValueError(f"{field}={multiple * unit} {result.reason}")
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
    sides: list[bool] = []
    while (hi is None or hi - lo > 1) and len(trials) < max_compiles:
        guess = _linear_guess(trials, unit, hbm)
        if len(trials) == 1:
            multiple = _second_multiple(trial, state_bytes, unit, hbm)
        else:
            same_side = len(sides) >= 2 and sides[-1] == sides[-2]
            multiple = _next_multiple(lo, hi, guess, same_side)
        multiple = min(max(multiple, lo + 1), hi - 1) if hi is not None else max(multiple, lo + 1)
        trial = attempt(multiple)
        sides.append(trial.fits)
        lo, hi = (multiple, hi) if trial.fits else (lo, multiple)
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
