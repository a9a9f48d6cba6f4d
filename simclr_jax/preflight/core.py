"""One preflight: a config's training step lowered with abstract, sharded inputs on a TPU
slice's devices, compiled by libtpu, and reported (memory per chip, FLOPs, roofline time,
collectives) with a one-line reason when it does not fit."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Sequence
from typing import Any

from simclr_jax.preflight.collectives import by_network, parse_collectives, sum_by_kind
from simclr_jax.preflight.hardware import (
    CALIBRATION,
    GIB,
    Slice,
    chips_per_host,
    gib,
    slice_devices,
)

# ------------------------------------------------------------------ config -> abstract step


def prepare_config(config: Any, mesh: Any) -> Any:
    """The config the trainer would resolve for this run on the slice, after the one validation
    it runs (modes.validate: a config it refuses is refused here, with the same ValueError).
    There is no workdir: mode eval needs init_checkpoint. The checkpoints the run reads are
    checked as the trainer checks them (modes.check_checkpoints) when this host can reach
    them; their parameters are never read."""
    import ml_collections

    from simclr_jax import data, modes

    values = config.to_dict()
    # 'auto' resolves by jax.default_backend() when the model is built, which is 'cpu' here;
    # on the TPU slice it is XLA's own kernel gradient.
    if values["model"].get("conv_kernel_grad", "auto") == "auto":
        values["model"]["conv_kernel_grad"] = "xla"
    prepared = ml_collections.ConfigDict(values)
    modes.validate(prepared, mesh, workdir=None)
    info = data.planned_dataset_info(prepared.data)
    modes.check_checkpoints(prepared, None, info.num_classes)
    return modes.resolve_config(prepared, info), info


def abstract_step(config: Any, mesh: Any, info: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """(jitted step, its abstract arguments with shardings, notes) of a prepared config: the
    step and batch of its mode record, built by modes.train_program exactly as the trainer
    builds them (mode eval: the eval step), with abstract state and extra inputs."""
    from simclr_jax import modes

    mode = modes.get(config.mode)
    batch = modes.abstract_batch(mode, config, mesh)
    if mode.loss is None:
        step, variables = modes.eval_step_and_variables(config, mesh)
        return step, (variables, batch), {}
    program = modes.train_program(
        config, mesh, info.num_examples[config.data.train_split], abstract=True
    )
    notes = {"total_steps": program.durations.total_steps, **program.extra.notes}
    args = (program.abstract_state(config, mesh), batch, *program.extra.values)
    return program.step, args, notes


# ------------------------------------------------------------------ analysis


def _cost(compiled: Any) -> dict[str, float]:
    """The compiled program's cost analysis as one dict (older JAX returns a list of one)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def roofline(flops: float, bytes_accessed: float, tpu: Slice) -> tuple[float, str]:
    """(seconds, bound) of one device's program: the slower of compute at peak bf16 FLOP/s
    and HBM traffic at peak bandwidth."""
    compute = flops / tpu.peak_flops_per_device
    memory = bytes_accessed / tpu.hbm_bytes_per_s_per_device
    return max(compute, memory), ("compute" if compute >= memory else "memory")


def analyse(
    compiled: Any,
    tpu: Slice,
    config: Any,
    total_steps: int | None,
    devices: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """The report's figures from a compiled executable (per device unless said otherwise).
    `devices` in the mesh's order (the program's device assignment) tell the collectives over
    DCN (between slices) from those over ICI."""
    memory = compiled.memory_analysis()
    arguments = int(memory.argument_size_in_bytes)
    outputs = int(memory.output_size_in_bytes)
    temporaries = int(memory.temp_size_in_bytes)
    aliased = int(getattr(memory, "alias_size_in_bytes", 0))
    code = int(getattr(memory, "generated_code_size_in_bytes", 0))
    # Donated state: outputs reuse the arguments' buffers.
    total = arguments + outputs - aliased + temporaries + code
    cost = _cost(compiled)
    flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    seconds, bound = roofline(flops, bytes_accessed, tpu)
    batch = config.eval_batch_size if config.mode == "eval" else config.train_batch_size
    collectives = parse_collectives(compiled.as_text())
    by_network(collectives, list(devices) if devices is not None else [])
    compute_seconds = flops / tpu.peak_flops_per_device
    report = {
        "hbm_per_chip_gib": tpu.hbm_bytes_per_device / GIB,
        "bytes_per_chip": {
            "arguments": arguments,
            "temporaries": temporaries,
            "outputs": outputs,
            "aliased": aliased,
            "generated_code": code,
            "total": total,
        },
        "fits": total <= tpu.hbm_bytes_per_device,
        "flops_per_step": flops * tpu.num_devices,
        "bytes_accessed_per_step_per_chip": bytes_accessed,
        "step_seconds_estimate": seconds,
        "roofline_bound": bound,
        "images_per_second_estimate": batch / seconds if seconds > 0 else None,
        "mfu_estimate": compute_seconds / seconds if seconds > 0 else None,
        "run_hours_estimate": seconds * total_steps / 3600 if total_steps else None,
        "collectives": [
            {k: c[k] for k in ("kind", "shapes", "bytes", "network", "slices")} for c in collectives
        ],
        "collective_bytes": sum_by_kind(collectives),
        "collective_bytes_ici": sum_by_kind(collectives, "ici"),
        "collective_bytes_dcn": sum_by_kind(collectives, "dcn"),
        **dcn_estimate(collectives, tpu, devices),
    }
    return report


def dcn_estimate(
    collectives: Sequence[dict[str, Any]], tpu: Slice, devices: Sequence[Any] | None
) -> dict[str, Any]:
    """Bytes a host sends between slices per step and the seconds that takes at the host's
    published DCN bandwidth (the table's per-chip figure times the host's chips)."""
    gen = tpu.generation
    per_chip = sum(c["dcn_bytes"] for c in collectives) * gen.devices_per_chip
    host_chips = chips_per_host(devices, tpu) if devices else 1
    out: dict[str, Any] = {
        "dcn_send_bytes_per_step_per_host": per_chip * host_chips,
        "chips_per_host": host_chips,
        "dcn_gbits_per_s_per_host": None,
        "dcn_seconds_estimate": None,
        "dcn_bandwidth_source": gen.dcn_source or "no published DCN figure in the table",
    }
    if gen.dcn_gbits_per_s_per_chip:
        host_gbits = gen.dcn_gbits_per_s_per_chip * host_chips
        out["dcn_gbits_per_s_per_host"] = host_gbits
        out["dcn_seconds_estimate"] = per_chip * host_chips * 8 / (host_gbits * 1e9)
    return out


_OOM = re.compile(
    r"(?:[Uu]sed|requires?)\s+([\d.]+)([KMGT]?)(?:i?B)?\b.*?(?:of|limit)\s+([\d.]+)([KMGT]?)"
)


def _oom_reason(message: str) -> str | None:
    """The compiler's out-of-HBM message in one line, or None for another error."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    first = next((line for line in message.splitlines() if "memory" in line.lower()), message)
    return " ".join(first.split())[:400]


# ------------------------------------------------------------------ one preflight


@dataclasses.dataclass
class Result:
    """Outcome of one preflight: fits and the report, or the one-line reason it does not."""

    ok: bool
    reason: str
    report: dict[str, Any]


def _parameter_bytes(abstract: Any) -> int:
    """Bytes of an abstract pytree, whole (unsharded)."""
    import jax

    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))


def _per_device_bytes(abstract: Any) -> int:
    """Bytes one device holds of an abstract pytree with shardings."""
    import jax

    total = 0
    for a in jax.tree.leaves(abstract):
        shard = a.sharding.shard_shape(a.shape)
        total += math.prod(shard) * a.dtype.itemsize
    return total


def activation_bytes(config: Any, images_per_device: int) -> int:
    """Bytes of the activations one device's backward pass keeps (the model forward's jax.vjp
    residuals with a batch dimension), traced with eval_shape: a cheap estimate, before any
    compile, of what the step needs beyond its state (the compiler may rematerialize some)."""
    import jax
    import jax.numpy as jnp

    from simclr_jax.models import abstract_variables, model_from_config

    size = config.data.image_size
    model = model_from_config(config)
    variables = abstract_variables(model, size)
    images = jax.ShapeDtypeStruct((images_per_device, size, size, 3), jnp.float32)

    def pullback(params: Any, batch_stats: Any, x: jax.Array) -> Any:
        def forward(p: Any) -> Any:
            out, _ = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return out

        return jax.vjp(forward, params)[1]

    residuals = jax.eval_shape(pullback, variables["params"], variables["batch_stats"], images)
    return sum(
        leaf.size * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(residuals)
        if leaf.ndim and leaf.shape[0] == images_per_device
    )


# How far the eval_shape'd backward residuals may exceed the compiled program's activations:
# measured 1.2x (ResNet-50, 224 px, float32), 1.8x (bfloat16), 8x (ResNet-18, 16 px).
ACTIVATION_ESTIMATE_EXCESS = 10


def run_preflight(config: Any, tpu: Slice, *, devices: Sequence[Any] | None = None) -> Result:
    """Builds and compiles config's step for the slice; never allocates a parameter."""
    from simclr_jax import parallel

    devices = list(devices if devices is not None else slice_devices(tpu))
    mesh = parallel.mesh_from_config(config.mesh, devices)
    config, info = prepare_config(config, mesh)
    batch_field = "eval_batch_size" if config.mode == "eval" else "train_batch_size"
    step, args, notes = abstract_step(config, mesh, info)
    base = {
        "tpu": tpu.name,
        "num_slices": tpu.num_slices,
        "topology": tpu.topology_name,
        "num_devices": tpu.num_devices,
        "device_kind": devices[0].device_kind,
        "mode": config.mode,
        "global_batch": config[batch_field],
        "dtype": str(config.model.dtype),
        "fsdp_min_size": config.mesh.fsdp_min_size,
        "hbm_per_chip_gib": tpu.hbm_bytes_per_device / GIB,
        "state_bytes_per_chip": _per_device_bytes(args[0]),
        "state_bytes_whole": _parameter_bytes(args[0]),
        "hardware_source": tpu.generation.source,
        **notes,
    }
    calibration = CALIBRATION.get(tpu.generation.topology_prefix)
    if calibration is not None:
        base["measured_over_estimate"] = round(calibration.measured_over_estimate, 2)
        base["calibration"] = dataclasses.asdict(calibration)
    # Cheap decision first: the state plus the backward's activations far over HBM needs no
    # compile. The residuals overestimate what the compiler keeps (it fuses and recomputes),
    # so only a clear excess is decided without it.
    if config.mode != "eval":
        # Every image of the batch (pretraining's two views each) goes through the model.
        images = sum(math.prod(a.shape[:-3]) for a in args[1].values() if a.ndim >= 4)
        per_device = images // mesh.shape["data"]
        base["activation_bytes_per_chip"] = activation_bytes(config, per_device)
        state, activations = base["state_bytes_per_chip"], base["activation_bytes_per_chip"]
        needed = state + activations
        if state + activations / ACTIVATION_ESTIMATE_EXCESS > tpu.hbm_bytes_per_device:
            reason = (
                f"does not fit in {gib(tpu.hbm_bytes_per_device)} HBM per chip: the state "
                f"({gib(state)}) plus the activations the backward pass keeps "
                f"({gib(activations)}) need {gib(needed)}, and even 1/"
                f"{ACTIVATION_ESTIMATE_EXCESS} of those activations (the estimate's margin) "
                "would not fit (decided before compiling; lower the batch or set "
                "mesh.fsdp_min_size)"
            )
            return Result(False, reason, {**base, "fits": False, "reason": reason})
    started = time.time()
    try:
        compiled = step.lower(*args).compile()
    except Exception as error:  # noqa: BLE001 - the compiler's message is the reason
        message = str(error)
        oom = _oom_reason(message)
        seconds = time.time() - started
        if oom:
            reason = f"does not fit in {gib(tpu.hbm_bytes_per_device)} HBM per chip: {oom}"
        else:
            reason = "does not compile: " + " ".join(message.split())[:400]
        return Result(False, reason, {**base, "fits": False, "reason": reason,
                                      "compile_seconds": seconds})  # fmt: skip
    report = {
        **base,
        **analyse(compiled, tpu, config, notes.get("total_steps"), list(mesh.devices.flat)),
    }
    report["compile_seconds"] = time.time() - started
    if not report["fits"]:
        needs, hbm = report["bytes_per_chip"]["total"], tpu.hbm_bytes_per_device
        # Four significant digits where one decimal would print the same figure twice.
        digits = 4 if gib(needs) == gib(hbm) else None
        reason = (
            f"does not fit: needs {gib(needs, digits)} per chip, over the "
            f"{gib(hbm, digits)} HBM of a {tpu.accelerator_type} chip"
        )
        report["reason"] = reason
        return Result(False, reason, report)
    return Result(True, "fits", report)


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of one report."""
    lines = [
        f"{report['tpu']} ({report['topology']}, {report['num_devices']} x "
        f"{report.get('device_kind', 'TPU')}), mode {report['mode']}, global batch "
        f"{report['global_batch']}, {report['dtype']}, fsdp_min_size {report['fsdp_min_size']}",
    ]
    per = report.get("bytes_per_chip")
    if per:
        lines.append(
            f"  memory per chip: {gib(per['total'])} of {report['hbm_per_chip_gib']:.1f} GiB "
            f"(arguments {gib(per['arguments'])}, temporaries {gib(per['temporaries'])}, "
            f"outputs {gib(per['outputs'])}, aliased {gib(per['aliased'])}) -> "
            f"{'fits' if report['fits'] else 'DOES NOT FIT'}"
        )
        lines.append(
            f"  compiler estimate: {report['flops_per_step'] / 1e12:.1f} TFLOP per step (slice), "
            f"step {report['step_seconds_estimate'] * 1e3:.1f} ms ({report['roofline_bound']}-"
            f"bound roofline), {report['images_per_second_estimate']:.0f} images/s, MFU "
            f"{report['mfu_estimate']:.0%}"
            + (
                f", {report['run_hours_estimate']:.2f} h for {report['total_steps']} steps"
                if report.get("run_hours_estimate")
                else ""
            )
        )

        def kinds(totals: dict[str, int]) -> str:
            return ", ".join(f"{kind} {n / 2**20:.1f} MiB" for kind, n in totals.items())

        if report.get("num_slices", 1) > 1:
            lines.append(
                "  collectives per step per chip over ICI (inside a slice): "
                f"{kinds(report['collective_bytes_ici']) or 'none'}"
            )
            dcn = f"  over DCN (between slices): {kinds(report['collective_bytes_dcn']) or 'none'}"
            if report.get("dcn_seconds_estimate") is not None:
                dcn += (
                    f"; a host sends ~{report['dcn_send_bytes_per_step_per_host'] / 2**20:.1f} "
                    f"MiB, ~{report['dcn_seconds_estimate'] * 1e3:.1f} ms at "
                    f"{report['dcn_gbits_per_s_per_host']:g} Gb/s per host "
                    f"({report['dcn_bandwidth_source']})"
                )
            lines.append(dcn)
        else:
            lines.append(
                f"  collectives per step per chip: {kinds(report['collective_bytes']) or 'none'}"
            )
        if report.get("measured_over_estimate"):
            lines.append(
                f"  measured_over_estimate {report['measured_over_estimate']:.2f} on this "
                "generation (MLPerf ResNet-50 against this estimator; docs/preflight.md)"
            )
        lines.append(f"  compiled in {report['compile_seconds']:.0f} s")
    if report.get("reason"):
        lines.append(f"  {report['reason']}")
    return "\n".join(lines)


def write_json(path: str, report: dict[str, Any]) -> None:
    """Writes the report (the preflight's only output file)."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")
