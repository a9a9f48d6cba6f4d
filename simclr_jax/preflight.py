"""Ahead-of-time preflight: compiles the exact training step a config would run on a Cloud TPU
slice, on any machine with libtpu installed (no TPU needed), and reports whether it fits in HBM
and what the compiler estimates it costs.

    python -m simclr_jax.preflight --config=configs/smoke.py:pretrain --tpu=v4-8
    python -m simclr_jax.preflight --config=configs/imagenet_pretrain.py:r50_1x,v1 --tpu=v3-128 \
        --config.model.dtype=bfloat16 --out=/tmp/preflight.json
    python -m simclr_jax.preflight --config=... --tpu=v5litepod-16 --max_batch

Nothing is allocated: the state is jax.eval_shape of the init, the batch is ShapeDtypeStructs
with the run's shardings, on a mesh of the slice's devices as libtpu describes them (one
device per chip on v4/v5p megacore and v5e/v6e, one per TensorCore on v2/v3, as jax.devices()
shows them on the slice). Every figure is the XLA TPU compiler's own estimate, not a
measurement. Exit status 0 when the step fits, 1 (with a one-line reason) otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

GIB = 2**30
LIBTPU_PIP = "pip install 'libtpu==0.0.42.1'"


# ------------------------------------------------------------------ hardware


@dataclasses.dataclass(frozen=True)
class Generation:
    """Per-chip figures of one TPU generation, with where each comes from."""

    topology_prefix: str  # libtpu's topology name prefix
    hbm_gib_per_chip: float
    peak_bf16_tflops_per_chip: float
    hbm_gbytes_per_s_per_chip: float
    cores_per_chip: int
    devices_per_chip: int  # what jax.devices() counts per chip (megacore: 1)
    accelerator_counts: str  # 'cores' or 'chips': what N in the gcloud type vN-N counts
    three_d: bool  # 3-D torus (x, y, z) or 2-D
    chip_config_name: str | None  # libtpu chip config matching the live slice
    source: str


GENERATIONS: dict[str, Generation] = {
    # The v2 docs page defers to the paper for its figures (Jouppi et al., CACM 2020, Table 3).
    "v2": Generation(
        "v2", 16, 46, 700, 2, 2, "cores", False, None,
        "https://docs.cloud.google.com/tpu/docs/v2 -> doi.org/10.1145/3360307 (Table 3)",
    ),
    "v3": Generation(
        "v3", 32, 123, 900, 2, 2, "cores", False, None,
        "https://docs.cloud.google.com/tpu/docs/v3",
    ),
    "v4": Generation(
        "v4", 32, 275, 1200, 2, 1, "cores", True, "megacore",
        "https://docs.cloud.google.com/tpu/docs/v4",
    ),
    "v5litepod": Generation(
        "v5e", 16, 197, 819, 1, 1, "chips", False, None,
        "https://docs.cloud.google.com/tpu/docs/v5e",
    ),
    "v5p": Generation(
        "v5p", 95, 459, 2765, 2, 1, "cores", True, "megacore",
        "https://docs.cloud.google.com/tpu/docs/v5p",
    ),
    "v6e": Generation(
        "v6e", 32, 918, 1638, 1, 1, "chips", False, None,
        "https://docs.cloud.google.com/tpu/docs/v6e",
    ),
}  # fmt: skip
ALIASES = {"v5e": "v5litepod"}

# Slice shapes in chips, as the Cloud TPU docs list them per generation.
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16), 512: (16, 32), 1024: (32, 32)}  # fmt: skip
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}  # fmt: skip
MAX_CHIPS = {"v2": 256, "v3": 1024, "v4": 4096, "v5litepod": 256, "v5p": 4096, "v6e": 256}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A Cloud TPU slice named by its gcloud accelerator type."""

    accelerator_type: str
    generation: Generation
    chips: int

    @property
    def num_devices(self) -> int:
        """Devices jax.devices() lists on the slice."""
        return self.chips * self.generation.devices_per_chip

    @property
    def topology_name(self) -> str:
        """libtpu's name of the slice, e.g. 'v4:2x2x2'."""
        gen = self.generation
        shape = SHAPES_3D[self.chips] if gen.three_d else SHAPES_2D[self.chips]
        return f"{gen.topology_prefix}:{'x'.join(map(str, shape))}"

    @property
    def hbm_bytes_per_device(self) -> float:
        """HBM one JAX device owns (half the chip's on v2/v3, whose devices are TensorCores)."""
        return self.generation.hbm_gib_per_chip * GIB / self.generation.devices_per_chip

    @property
    def peak_flops_per_device(self) -> float:
        """Peak bf16 FLOP/s of one JAX device."""
        return self.generation.peak_bf16_tflops_per_chip * 1e12 / self.generation.devices_per_chip

    @property
    def hbm_bytes_per_s_per_device(self) -> float:
        """HBM bandwidth of one JAX device."""
        return self.generation.hbm_gbytes_per_s_per_chip * 1e9 / self.generation.devices_per_chip


def known_accelerator_types() -> list[str]:
    """Every accelerator type this table can describe, smallest first per generation."""
    names = []
    for key, gen in GENERATIONS.items():
        shapes = SHAPES_3D if gen.three_d else SHAPES_2D
        per_name = gen.cores_per_chip if gen.accelerator_counts == "cores" else 1
        for chips in sorted(shapes):
            if chips <= MAX_CHIPS[key] and (key not in ("v2", "v3") or chips >= 4):
                names.append(f"{key}-{chips * per_name}")
    return names


def parse_accelerator_type(name: str) -> Slice:
    """'v4-32' -> Slice; ValueError listing the known types for anything else."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    key = ALIASES.get(match.group(1), match.group(1)) if match else ""
    if match and key in GENERATIONS:
        gen = GENERATIONS[key]
        count = int(match.group(2))
        per_name = gen.cores_per_chip if gen.accelerator_counts == "cores" else 1
        chips, rest = divmod(count, per_name)
        accelerator = f"{key}-{count}"
        if not rest and accelerator in known_accelerator_types():
            return Slice(accelerator, gen, chips)
    raise ValueError(
        f"--tpu={name!r} is not a known accelerator type; known: "
        f"{', '.join(known_accelerator_types())}."
    )


def with_hbm(tpu: Slice, hbm_gib: float) -> Slice:
    """The slice with chips of hbm_gib GiB of HBM (--hbm_gib: headroom planning, or a small
    limit the search reaches at a small batch); the compiler still targets the real chip."""
    if not hbm_gib > 0:
        raise ValueError(f"--hbm_gib={hbm_gib} must be a positive number of GiB per chip.")
    gen = tpu.generation
    source = f"HBM {hbm_gib:g} GiB per chip from --hbm_gib; the rest: {gen.source}"
    generation = dataclasses.replace(gen, hbm_gib_per_chip=hbm_gib, source=source)
    return dataclasses.replace(tpu, generation=generation)


def _quiet_libtpu_environment(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Sets what libtpu otherwise looks up (and warns about) on a host that is not a TPU VM.
    On a TPU VM the runtime's own values stay."""
    environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
    environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # No chip is opened, so several compiling processes (pytest -n 2) may load libtpu at once.
    environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # The preflight never runs on the accelerator: it must not take the TPU from a running job.
    environ.setdefault("JAX_PLATFORMS", "cpu")


# Set in the re-executed process, so that it runs the command instead of re-executing again.
STACK_RAISED_ENV = "SIMCLR_PREFLIGHT_STACK_RAISED"


def rerun_with_raised_stack_limit() -> None:
    """Re-executes this command (sys.orig_argv) once with RLIMIT_STACK's soft limit raised to
    the hard one, as `ulimit -s unlimited` would; returns when it is already there.

    libtpu 0.0.42's compiler recurses deeply (MigrateInstructionUsers) compiling the ResNet-50
    step for v6e and overflows the default 8 MiB stack (SIGSEGV) on one of its own threads,
    whose stack follows the limit the process started with: raising the limit in-process is
    too late, so the process starts again under the raised one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == hard or os.environ.get(STACK_RAISED_ENV):
        return
    resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
    os.environ[STACK_RAISED_ENV] = "1"  # execv passes os.environ on
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def libtpu_available() -> bool:
    """Whether the libtpu package (the TPU compiler) is importable."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def slice_devices(tpu: Slice) -> list[Any]:
    """The slice's devices as jax.devices() lists them there, from libtpu's description."""
    from jax.experimental import topologies

    gen = tpu.generation
    chips_per_host = (2, 2, 1)
    if not gen.three_d and tpu.chips <= 8:  # v5e / v6e hosts of up to 8 chips
        chips_per_host = (*SHAPES_2D[tpu.chips], 1)
    kwargs: dict[str, Any] = {"chips_per_host_bounds": chips_per_host}
    if gen.chip_config_name:
        kwargs["chip_config_name"] = gen.chip_config_name
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=tpu.topology_name, **kwargs
    )
    devices = sorted(topology.devices, key=lambda d: d.id)
    if len(devices) != tpu.num_devices:
        raise RuntimeError(
            f"libtpu described {tpu.topology_name} with {len(devices)} devices, expected "
            f"{tpu.num_devices}; this libtpu does not match the table in simclr_jax/preflight.py."
        )
    return devices


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


# ------------------------------------------------------------------ analysis

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip
# Synchronous ops, and the op of an async pair that carries the result shape.
_COLLECTIVE_OPS = {
    "all-reduce": "all-reduce",
    "all-reduce-start": "all-reduce",
    "all-gather": "all-gather",
    "all-gather-done": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all",
    "collective-permute": "collective-permute",
    "collective-permute-done": "collective-permute",
}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")


def parse_collectives(hlo_text: str) -> list[dict[str, Any]]:
    """Every cross-device collective of a compiled HLO module: kind, result shapes, bytes.

    The TPU compiler writes a reduce-scatter as an all-reduce inside a computation named
    all-reduce-scatter (then keeps only this device's part); it is counted as reduce-scatter,
    with the bytes it reduces."""
    found, computation = [], ""
    for raw in hlo_text.splitlines():
        line = _COMMENT.sub("", raw)
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(")[0]:
            computation = header.group(1)
            continue
        match = _INSTRUCTION.search(line)
        if not match or match.group(2) not in _COLLECTIVE_OPS:
            continue
        kind = _COLLECTIVE_OPS[match.group(2)]
        if kind == "all-reduce" and computation.startswith("all-reduce-scatter"):
            kind = "reduce-scatter"
        shapes = [
            (dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _SHAPE.findall(match.group(1))
        ]
        found.append(
            {
                "kind": kind,
                "shapes": [f"{dtype}[{','.join(map(str, dims))}]" for dtype, dims in shapes],
                "dims": [list(dims) for _, dims in shapes],
                "bytes": sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in shapes),
            }
        )
    return found


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
        "collective_bytes": _sum_by_kind(collectives),
    }
    return report


def _sum_by_kind(collectives: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Bytes per collective kind."""
    totals: dict[str, int] = {}
    for c in collectives:
        totals[c["kind"]] = totals.get(c["kind"], 0) + c["bytes"]
    return totals


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
                f"does not fit in {_gib(tpu.hbm_bytes_per_device)} HBM per chip: the state "
                f"({_gib(state)}) plus the activations the backward pass keeps "
                f"({_gib(activations)}) need {_gib(needed)}, and even 1/"
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
            reason = f"does not fit in {_gib(tpu.hbm_bytes_per_device)} HBM per chip: {oom}"
        else:
            reason = "does not compile: " + " ".join(message.split())[:400]
        return Result(False, reason, {**base, "fits": False, "reason": reason,
                                      "compile_seconds": seconds})  # fmt: skip
    report = {**base, **analyse(compiled, tpu, config, notes.get("total_steps"))}
    report["compile_seconds"] = time.time() - started
    if not report["fits"]:
        reason = (
            f"does not fit: needs {_gib(report['bytes_per_chip']['total'])} per chip, over the "
            f"{_gib(tpu.hbm_bytes_per_device)} HBM of a {tpu.accelerator_type} chip"
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


def _gib(nbytes: float, significant: int | None = None) -> str:
    """Bytes in GiB: one decimal ('12.3 GiB'), or `significant` digits ('15.93 GiB',
    '0.1219 GiB' with 4) for limits close to what is needed."""
    if significant is None:
        return f"{nbytes / GIB:.1f} GiB"
    return f"{nbytes / GIB:.{significant}g} GiB"


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
        need = f"needs {_gib(trial.total_bytes, 4)} of {_gib(hbm_bytes, 4)}"
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
    memory = f"{_gib(best.total_bytes or 0, 4)} of {_gib(tpu.hbm_bytes_per_device, 4)} per chip"
    above = min((t.batch for t in search.trials if not t.fits), default=None)
    if search.closed:
        return f"{head}{search.batch} ({memory}; {above} does not fit); {tail}"
    bound = f"{above} does not fit" if above else "no larger batch was tried"
    return (
        f"{head}at least {search.batch} ({memory}; {bound}); stopped after {tail}; "
        "raise --max_compiles to close the bracket"
    )


# ------------------------------------------------------------------ command line


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
            f"  memory per chip: {_gib(per['total'])} of {report['hbm_per_chip_gib']:.1f} GiB "
            f"(arguments {_gib(per['arguments'])}, temporaries {_gib(per['temporaries'])}, "
            f"outputs {_gib(per['outputs'])}, aliased {_gib(per['aliased'])}) -> "
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
        lines.append(f"  compiled in {report['compile_seconds']:.0f} s")
    if report.get("reason"):
        lines.append(f"  {report['reason']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit status (0 fits, 1 does not fit / does not compile)."""
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
    layouts_flag = flags.DEFINE_list(
        "max_batch_for", list(MAX_BATCH_LAYOUTS), "--max_batch: search for these state layouts "
        f"({', '.join(MAX_BATCH_LAYOUTS)}).", flag_values=flag_values,
    )  # fmt: skip
    max_compiles_flag = flags.DEFINE_integer(
        "max_compiles", 8, "--max_batch: at most this many compiles per search.",
        flag_values=flag_values,
    )  # fmt: skip
    hbm_flag = flags.DEFINE_float(
        "hbm_gib", None, "Pretend each chip has this much HBM (GiB), e.g. to keep headroom.",
        flag_values=flag_values,
    )  # fmt: skip
    try:
        flag_values(argv)
        if not config_flag.value or not tpu_flag.value:
            raise ValueError("--config and --tpu are required, e.g. --config=configs/smoke.py "
                             "--tpu=v4-8.")  # fmt: skip
        tpu = parse_accelerator_type(tpu_flag.value)
        if hbm_flag.value is not None:
            tpu = with_hbm(tpu, hbm_flag.value)
        unknown = sorted(set(layouts_flag.value) - set(MAX_BATCH_LAYOUTS))
        if unknown:
            raise ValueError(f"--max_batch_for={','.join(unknown)} is not a layout; use "
                             f"{' and/or '.join(MAX_BATCH_LAYOUTS)}.")  # fmt: skip
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
        if max_batch_flag.value:
            return _print_max_batch(
                config, tpu, devices, out_flag.value, max_compiles_flag.value, layouts_flag.value
            )
        result = run_preflight(config, tpu, devices=devices)
    except ValueError as error:
        print(f"preflight: {error}", file=sys.stderr)
        return 1
    print(format_report(result.report))
    if out_flag.value:
        write_json(out_flag.value, result.report)
    if not result.ok:
        print(f"preflight: {tpu.accelerator_type}: {result.reason}", file=sys.stderr)
    return 0 if result.ok else 1


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


def write_json(path: str, report: dict[str, Any]) -> None:
    """Writes the report (the preflight's only output file)."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")


if __name__ == "__main__":
    rerun_with_raised_stack_limit()
    _quiet_libtpu_environment()
    sys.exit(main())
