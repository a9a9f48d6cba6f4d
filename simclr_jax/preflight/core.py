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

from simclr_jax.preflight.collectives import parse_collectives, sum_by_kind
from simclr_jax.preflight.hardware import CALIBRATION, GIB, Slice, gib, slice_devices

# ------------------------------------------------------------------ config -> abstract step

# Used when the dataset is not on this machine: (classes, training examples per split).
KNOWN_DATASETS = {
    "imagenet2012": (1000, {"train": 1_281_167, "validation": 50_000}),
    "cifar10": (10, {"train": 50_000, "test": 10_000}),
    "cifar100": (100, {"train": 50_000, "test": 10_000}),
}
LABEL_SUBSET_FRACTION = {"1pct": 0.01, "10pct": 0.1}


def dataset_info(config: Any) -> Any:
    """num_classes and split sizes: the bundled sample's own, else the known table, else read
    from the data (a folder or prepared TFDS dataset on this machine)."""
    from simclr_jax import data

    name = str(config.data.get("name", ""))
    if config.data.source != "bundled" and name in KNOWN_DATASETS:
        classes, counts = KNOWN_DATASETS[name]
        counts = dict(counts)
        fraction = LABEL_SUBSET_FRACTION.get(str(config.data.get("label_subset", "")), 1.0)
        split = str(config.data.train_split)
        counts[split] = int(counts.get(split.split("[")[0], counts["train"]) * fraction)
        return data.DatasetInfo(num_classes=classes, num_examples=counts, class_names=())
    return data.get_dataset_info(config.data)


def prepare_config(config: Any) -> tuple[Any, Any]:
    """(the config main would resolve for this run on a TPU, dataset info). Checkpoint paths
    are not read: the preflight needs shapes only."""
    import ml_collections

    from simclr_jax import train

    values = config.to_dict()
    # 'auto' resolves by jax.default_backend() when the model is built, which is 'cpu' here;
    # on the TPU slice it is XLA's own kernel gradient.
    if values["model"].get("conv_kernel_grad", "auto") == "auto":
        values["model"]["conv_kernel_grad"] = "xla"
    values["init_checkpoint"] = values.get("init_checkpoint") or "<preflight: not read>"
    if "distill" in values:
        d = values["distill"]
        d["teacher_checkpoint"] = d.get("teacher_checkpoint") or "<preflight: not read>"
    prepared = ml_collections.ConfigDict(values)
    train.validate_config(prepared)
    info = dataset_info(prepared)
    return train.resolve_config(prepared, info), info


def abstract_step(config: Any, mesh: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """(jitted step, its abstract arguments with shardings, notes) for config.mode: the same
    model, optimizer and step constructors train.py / distill.py / evaluate.py use, called with
    jax.eval_shape'd state instead of arrays. The one place that reaches into the training code."""
    import jax
    import jax.numpy as jnp

    from simclr_jax import distill, evaluate, parallel, train, training
    from simclr_jax.models import create_model
    from simclr_jax.train_state import abstract_train_state

    info = dataset_info(config)
    size = config.data.image_size
    batch_sharding = parallel.batch_sharding(mesh)
    fsdp = config.mesh.fsdp_min_size
    notes: dict[str, Any] = {}

    def batch_spec(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)

    def with_shardings(abstract: Any, shardings: Any) -> Any:
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )

    def variables_of(model: Any) -> tuple[Any, Any]:
        abstract = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
        )
        abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
        return abstract, parallel.state_shardings(abstract, mesh, fsdp)

    model = create_model(
        config.model,
        num_classes=config.model.num_classes,
        mode=evaluate.model_mode(config.mode if config.mode != "eval" else "finetune"),
    )
    if config.mode == "eval":
        variables, _ = variables_of(model)
        # restore_model keeps evaluation variables replicated.
        abstract = with_shardings(
            variables, jax.tree.map(lambda _: parallel.replicated(mesh), variables)
        )
        b = config.eval_batch_size
        batch = {
            "image": batch_spec((b, size, size, 3), jnp.float32),
            "label": batch_spec((b,), jnp.int32),
            "mask": batch_spec((b,), jnp.float32),
        }
        step = evaluate.make_eval_step(model, mesh, config.model.num_classes)
        return step, (abstract, batch), notes

    durations = training.resolve_durations(config, info.num_examples[config.data.train_split])
    notes["total_steps"] = durations.total_steps
    tx, schedule = training.create_optimizer(config, durations)
    b = config.train_batch_size
    if config.mode == "pretrain":
        batch = {
            "image": batch_spec((b, 2, size, size, 3), jnp.float32),
            "label": batch_spec((b,), jnp.int32),
        }
    else:
        batch = {"image": batch_spec((b, size, size, 3), jnp.float32)}
    if config.mode != "distill":
        if config.mode != "pretrain":
            batch["label"] = batch_spec((b,), jnp.int32)
        step, abstract_state, shardings = train.abstract_step_and_state(
            config, mesh, model, tx, schedule
        )
        return step, (with_shardings(abstract_state, shardings), batch), notes
    abstract_state, shardings = abstract_train_state(
        model, tx, mesh, image_size=size, fsdp_min_size=fsdp
    )
    # distill: the frozen teacher's variables are an argument of the step, as in run_distill.
    step, teacher_variables, notes["teacher"] = distill.abstract_distill_step(
        config, mesh, model, tx, schedule, shardings
    )
    if config.distill.alpha < 1.0:
        batch["labeled_image"] = batch_spec((b, size, size, 3), jnp.float32)
        batch["labeled_label"] = batch_spec((b,), jnp.int32)
    return step, (with_shardings(abstract_state, shardings), teacher_variables, batch), notes


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


def analyse(compiled: Any, tpu: Slice, config: Any, total_steps: int | None) -> dict[str, Any]:
    """The report's figures from a compiled executable (per device unless said otherwise)."""
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
        "collectives": [{k: c[k] for k in ("kind", "shapes", "bytes")} for c in collectives],
        "collective_bytes": sum_by_kind(collectives),
    }
    return report


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

    from simclr_jax import evaluate
    from simclr_jax.models import create_model

    size = config.data.image_size
    model = create_model(
        config.model,
        num_classes=config.model.num_classes,
        mode=evaluate.model_mode(config.mode),
    )
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    images = jax.ShapeDtypeStruct((images_per_device, size, size, 3), jnp.float32)

    def pullback(params: Any, batch_stats: Any, x: jax.Array) -> Any:
        def forward(p: Any) -> Any:
            out, _ = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return out

        return jax.vjp(forward, params)[1]

    residuals = jax.eval_shape(
        pullback, variables["params"], variables.get("batch_stats", {}), images
    )
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

    config, _ = prepare_config(config)
    devices = list(devices if devices is not None else slice_devices(tpu))
    mesh = parallel.create_mesh(
        data=config.mesh.get("data", -1), model=config.mesh.get("model", 1), devices=devices
    )
    batch_field = "eval_batch_size" if config.mode == "eval" else "train_batch_size"
    check_divisible(config[batch_field], mesh, batch_field)
    step, args, notes = abstract_step(config, mesh)
    base = {
        "tpu": tpu.accelerator_type,
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
        views = 2 if config.mode == "pretrain" else 1
        per_device = config.train_batch_size // mesh.shape["data"] * views
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
    report = {**base, **analyse(compiled, tpu, config, notes.get("total_steps"))}
    report["compile_seconds"] = time.time() - started
    if not report["fits"]:
        reason = (
            f"does not fit: needs {gib(report['bytes_per_chip']['total'])} per chip, over the "
            f"{gib(tpu.hbm_bytes_per_device)} HBM of a {tpu.accelerator_type} chip"
        )
        report["reason"] = reason
        return Result(False, reason, report)
    return Result(True, "fits", report)


def check_divisible(batch_size: int, mesh: Any, field: str) -> None:
    """ValueError in one line unless the global batch splits over the data axis."""
    replicas = mesh.shape["data"]
    if batch_size <= 0 or batch_size % replicas:
        raise ValueError(
            f"{field}={batch_size} is not divisible by the {replicas} devices on the 'data' "
            f"mesh axis of this slice; use a multiple of {replicas}."
        )


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
        kinds = ", ".join(
            f"{kind} {nbytes / 2**20:.1f} MiB"
            for kind, nbytes in report["collective_bytes"].items()
        )
        lines.append(f"  collectives per step per chip: {kinds or 'none'}")
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
