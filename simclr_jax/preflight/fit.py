"""--fit: the cheapest change that makes a config's step fit a slice, found by compiling.

The ways to fit, in order of what they cost a run: the config as it is; FSDP (parameters and
optimizer state sharded over the data axis: collectives, no extra FLOPs); remat (residual
blocks recomputed in the backward pass: extra FLOPs, the cheaper policy first); FSDP and remat
together; then the largest global batch that fits with both (a different recipe). The first
that fits is the answer; its estimated step time comes with it, and for remat the FLOPs that
recomputation adds (the compiled step against the same step without remat).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from simclr_jax.preflight.core import run_preflight
from simclr_jax.preflight.hardware import Slice, gib
from simclr_jax.preflight.search import MAX_BATCH_LAYOUTS, max_batch

# remat policies --fit tries, the one that recomputes least first (benchmarks/README.md).
FIT_REMAT_POLICIES = ("conv_outputs", "block")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to fit: its label, the config fields it changes, and the compile's outcome."""

    label: str
    changes: dict[str, Any]
    fits: bool
    total_bytes: int | None
    step_seconds: float | None
    flops_per_step: float | None
    seconds: float
    reason: str


@dataclasses.dataclass
class FitResult:
    """The candidates tried in order; `chosen` is the first that fits (None: nothing did)."""

    candidates: list[Candidate]
    chosen: Candidate | None
    recompute_flops: float | None = None  # FLOPs per step the chosen remat adds
    max_batch: int | None = None  # when only a smaller batch fits

    def to_json(self) -> dict[str, Any]:
        """The --out report."""
        return {
            "candidates": [dataclasses.asdict(c) for c in self.candidates],
            "chosen": dataclasses.asdict(self.chosen) if self.chosen else None,
            "recompute_flops_per_step": self.recompute_flops,
            "max_batch": self.max_batch,
        }


def _with_changes(config: Any, changes: dict[str, Any]) -> Any:
    import ml_collections

    trial = ml_collections.ConfigDict(config.to_dict())
    for field, value in changes.items():
        node = trial
        *parents, leaf = field.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return trial


def fit_candidates(config: Any, remat_policies: Sequence[str]) -> list[tuple[str, dict]]:
    """(label, config changes) in the order --fit tries them; a way the config already takes
    (its own FSDP or remat) is not tried again."""
    fsdp_min_size = config.mesh.fsdp_min_size or MAX_BATCH_LAYOUTS["fsdp"]
    own_remat = config.model.get("remat", "none")
    policies = [own_remat] if own_remat != "none" else list(remat_policies)
    fsdp = {"mesh.fsdp_min_size": fsdp_min_size}
    ways: list[tuple[str, dict]] = [("as configured", {})]
    if not config.mesh.fsdp_min_size:
        ways.append(("fsdp", fsdp))
    if own_remat == "none":
        ways += [(f"remat={p}", {"model.remat": p}) for p in policies]
    if not config.mesh.fsdp_min_size:
        ways += [(f"fsdp+remat={p}", {**fsdp, "model.remat": p}) for p in policies]
    return ways


def candidate_line(candidate: Candidate, hbm_bytes: float) -> str:
    """One progress line: the way tried, fits or not, memory, step estimate, seconds."""
    if candidate.total_bytes is not None:
        need = f"needs {gib(candidate.total_bytes, 4)} of {gib(hbm_bytes, 4)}"
    else:
        need = candidate.reason
    step = f", step {candidate.step_seconds:.3f} s" if candidate.step_seconds else ""
    verdict = "fits" if candidate.fits else "does not fit"
    return f"  [{candidate.label}] {verdict}, {need}{step}, {candidate.seconds:.0f} s"


def _try(config: Any, tpu: Slice, devices: Sequence[Any], label: str, changes: dict) -> Candidate:
    started = time.time()
    result = run_preflight(_with_changes(config, changes), tpu, devices=devices)
    if result.reason.startswith("does not compile"):
        raise ValueError(f"{label}: {result.reason}")
    report = result.report
    return Candidate(
        label,
        changes,
        result.ok,
        report.get("bytes_per_chip", {}).get("total"),
        report.get("step_seconds_estimate"),
        report.get("flops_per_step"),
        time.time() - started,
        result.reason,
    )


def backward_flops(config: Any, images_per_device: int) -> float:
    """FLOPs of the encoder's forward and backward pass on one device's images, counted by
    XLA's cost analysis of the program lowered for the CPU (nothing compiles or runs): under
    remat its recomputation is explicit there, so the difference with and without remat is
    what recomputation adds, before the TPU compiler's own choices."""
    import jax
    import jax.numpy as jnp

    from simclr_jax.models import abstract_variables, model_from_config

    size = config.data.image_size
    model = model_from_config(config)
    variables = abstract_variables(model, size)
    images = jax.ShapeDtypeStruct((images_per_device, size, size, 3), jnp.float32)

    def gradients(params: Any, batch_stats: Any, x: jax.Array) -> Any:
        def loss(p: Any) -> jax.Array:
            variables = {"params": p, "batch_stats": batch_stats}
            out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return sum(jnp.sum(v) for v in jax.tree.leaves(out))

        return jax.grad(loss)(params)

    lowered = jax.jit(gradients, backend="cpu").lower(
        variables["params"], variables.get("batch_stats", {}), images
    )
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: a list of one
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def fit(
    config: Any,
    tpu: Slice,
    devices: Sequence[Any],
    *,
    remat_policies: Sequence[str] = FIT_REMAT_POLICIES,
    max_compiles: int = 8,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Tries fit_candidates in order and stops at the first that fits; when none does, the
    largest global batch that fits with FSDP and the last remat policy."""
    candidates: list[Candidate] = []
    ways = fit_candidates(config, remat_policies)
    for label, changes in ways:
        candidate = _try(config, tpu, devices, label, changes)
        candidates.append(candidate)
        if log:
            log(candidate_line(candidate, tpu.hbm_bytes_per_device))
        if candidate.fits:
            result = FitResult(candidates, candidate)
            if "model.remat" in changes:
                result.recompute_flops = _recompute_flops(config, tpu, devices, candidate)
            return result
    label, changes = ways[-1]
    search = max_batch(
        _with_changes(config, changes), tpu, devices, max_compiles=max_compiles,
        label=f"{label}, smaller batch", log=log,
    )  # fmt: skip
    if search.batch == 0:
        return FitResult(candidates, None)
    field = "eval_batch_size" if config.mode == "eval" else "train_batch_size"
    best = search.trial(search.batch)
    chosen = Candidate(
        f"{label}, batch {search.batch}",
        {**changes, field: search.batch},
        True,
        best.total_bytes if best else None,
        None,
        None,
        sum(t.seconds for t in search.trials),
        "fits",
    )
    candidates.append(chosen)
    return FitResult(candidates, chosen, max_batch=search.batch)


def _recompute_flops(config: Any, tpu: Slice, devices: Sequence[Any], chosen: Candidate) -> float:
    """FLOPs per step (whole slice) the chosen remat adds: backward_flops with the chosen
    policy minus without, per device, times the devices on the data axis."""
    from simclr_jax import parallel
    from simclr_jax.preflight.core import prepare_config

    changed = _with_changes(config, chosen.changes)
    mesh = parallel.mesh_from_config(changed.mesh, devices)
    prepared, _ = prepare_config(changed, mesh)
    views = 2 if prepared.mode == "pretrain" else 1
    per_device = prepared.train_batch_size // mesh.shape["data"] * views
    with_remat = backward_flops(prepared, per_device)
    prepared.model.remat = "none"
    return max(with_remat - backward_flops(prepared, per_device), 0.0) * mesh.shape["data"]


def fit_line(tpu: Slice, config: Any, result: FitResult) -> str:
    """The answer in one line: the overrides to pass, memory, step estimate, recomputation."""
    head = f"{tpu.accelerator_type}: "
    chosen = result.chosen
    if chosen is None:
        return head + "nothing fits: not as configured, with FSDP, remat or both, not even at " \
            "one image per device; use a larger slice"  # fmt: skip
    if not chosen.changes:
        return head + f"fits as configured ({gib(chosen.total_bytes or 0)} per chip)"
    flags = " ".join(f"--config.{k}={v}" for k, v in chosen.changes.items())
    parts = [f"{gib(chosen.total_bytes or 0)} of {gib(tpu.hbm_bytes_per_device)} per chip"]
    if chosen.step_seconds:
        parts.append(f"step {chosen.step_seconds:.3f} s estimated")
    if result.recompute_flops is not None and chosen.flops_per_step:
        share = result.recompute_flops / (chosen.flops_per_step - result.recompute_flops)
        added = result.recompute_flops
        amount = f"{added / 1e12:.1f} TFLOP" if added >= 1e11 else f"{added / 1e9:.1f} GFLOP"
        parts.append(f"recomputation adds {amount} per step (+{share:.1%})")
    if result.max_batch:
        parts.append(f"global batch {config.train_batch_size} does not fit with FSDP and remat")
    return head + f"does not fit as configured; cheapest that fits: {flags} ({'; '.join(parts)})"
