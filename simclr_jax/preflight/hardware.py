"""The Cloud TPU hardware the preflight compiles for: per-generation figures with their
sources, slice shapes, accelerator-type parsing, the slice's devices as libtpu describes them,
and the process set-up libtpu needs on a host that is not a TPU VM."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
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
    # Data-center network (between slices) per chip, where Google publishes it; a host has
    # its chips' share (multislice traffic leaves through the host's NICs).
    dcn_gbits_per_s_per_chip: float | None = None
    dcn_source: str = ""


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
    # DCN: "Per-host NIC configuration 2 x 100 Gbps NIC" for 8 chips per host, and "Data
    # center network bandwidth per Pod 6.4 Tbps" for 256 chips: 25 Gb/s per chip either way.
    "v5litepod": Generation(
        "v5e", 16, 197, 819, 1, 1, "chips", False, None,
        "https://docs.cloud.google.com/tpu/docs/v5e",
        25, "https://docs.cloud.google.com/tpu/docs/v5e (2 x 100 Gbps NIC per 8-chip host)",
    ),
    "v5p": Generation(
        "v5p", 95, 459, 2765, 2, 1, "cores", True, "megacore",
        "https://docs.cloud.google.com/tpu/docs/v5p",
        50, "https://docs.cloud.google.com/tpu/docs/v5p (DCN bandwidth per chip 50 Gbps)",
    ),
    "v6e": Generation(
        "v6e", 32, 918, 1638, 1, 1, "chips", False, None,
        "https://docs.cloud.google.com/tpu/docs/v6e",
        100, "https://docs.cloud.google.com/tpu/docs/tpu7x (table: v6e DCN 100 Gbps per chip)",
    ),
    # Ironwood: two TensorCores per chip, each its own JAX device (no megacore; libtpu's
    # TPU7x:2x2x1 has 8 devices for 4 chips); gcloud/GKE/xpk name slices by TensorCores
    # (tpu7x-8 is 2x2x1, 4 chips on one tpu7x-standard-4t host; GKE accelerator 'tpu7x').
    "tpu7x": Generation(
        "TPU7x", 192, 2307, 7380, 2, 2, "cores", True, None,
        "https://docs.cloud.google.com/tpu/docs/tpu7x (two TPU devices per chip: its "
        "'Dual-chiplet architecture'; names: https://docs.cloud.google.com/kubernetes-engine/"
        "docs/concepts/tpu-ironwood)",
        100, "https://docs.cloud.google.com/tpu/docs/tpu7x (DCN bandwidth per chip 100 Gbps)",
    ),
}  # fmt: skip
ALIASES = {"v5e": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Measured ResNet-50 training images/s per chip of a generation beside the preflight's
    estimate of a ResNet-50 bfloat16 step there: how far to trust a step estimate."""

    measured_images_per_s_per_chip: float
    estimate_images_per_s_per_chip: float
    measured: str  # the results file
    estimate: str  # the compiled step the estimate comes from

    @property
    def measured_over_estimate(self) -> float:
        """Above 1: the chip ran faster than estimated; below 1: slower."""
        return self.measured_images_per_s_per_chip / self.estimate_images_per_s_per_chip


# docs/preflight.md ("Estimates beside measurements") derives each figure.
CALIBRATION: dict[str, Calibration] = {
    "v3": Calibration(
        1954, 3320,
        "MLPerf Training v0.6, Google tpu-v3-128, ResNet-50 at 128 images per core "
        "(mlcommons/training_results_v0.6 Google/results/tpu-v3-128/resnet/result_0.txt)",
        "MLPerf's step (supervised ResNet-50, LARS, bfloat16, 224 px) at 128 images per core, "
        "compiled for v3-8 (benchmarks/calibration.py)",
    ),
    "v4": Calibration(
        3479, 3507,
        "MLPerf Training v0.7, Google tpu-v4-16, ResNet-50 at 256 images per chip "
        "(mlcommons/training_results_v0.7 Google/results/tpu-v4-16-TF/resnet/result_0.txt)",
        "MLPerf's step (supervised ResNet-50, LARS, bfloat16, 224 px) at 256 images per chip, "
        "compiled for v4-16 (benchmarks/calibration.py)",
    ),
}  # fmt: skip

# Slice shapes in chips, as the Cloud TPU docs list them per generation.
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16), 512: (16, 32), 1024: (32, 32)}  # fmt: skip
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}  # fmt: skip
MAX_CHIPS = {"v2": 256, "v3": 1024, "v4": 4096, "v5litepod": 256, "v5p": 4096, "v6e": 256,
             "tpu7x": 4096}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Slice:
    """A Cloud TPU slice named by its gcloud accelerator type."""

    accelerator_type: str
    generation: Generation
    chips: int  # per slice
    num_slices: int = 1  # a multislice: identical slices joined over DCN

    @property
    def num_devices(self) -> int:
        """Devices jax.devices() lists on the slice (all slices of a multislice)."""
        return self.chips * self.generation.devices_per_chip * self.num_slices

    @property
    def name(self) -> str:
        """'v5litepod-256', or '2 x v5litepod-256' for a multislice."""
        prefix = f"{self.num_slices} x " if self.num_slices > 1 else ""
        return prefix + self.accelerator_type

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
    match = re.fullmatch(r"(v\d+[a-z]*|tpu7x)-(\d+)", name.strip().lower())
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


def with_slices(tpu: Slice, num_slices: int) -> Slice:
    """The multislice of num_slices such slices (--num_slices)."""
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"--num_slices={num_slices!r} must be a positive number of slices.")
    return dataclasses.replace(tpu, num_slices=num_slices)


def with_hbm(tpu: Slice, hbm_gib: float) -> Slice:
    """The slice with chips of hbm_gib GiB of HBM (--hbm_gib: headroom planning, or a small
    limit the search reaches at a small batch); the compiler still targets the real chip."""
    if not hbm_gib > 0:
        raise ValueError(f"--hbm_gib={hbm_gib} must be a positive number of GiB per chip.")
    gen = tpu.generation
    source = f"HBM {hbm_gib:g} GiB per chip from --hbm_gib; the rest: {gen.source}"
    generation = dataclasses.replace(gen, hbm_gib_per_chip=hbm_gib, source=source)
    return dataclasses.replace(tpu, generation=generation)


def quiet_libtpu_environment(environ: dict[str, str] | os._Environ = os.environ) -> None:
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
        platform="tpu", topology_name=tpu.topology_name, num_slices=tpu.num_slices, **kwargs
    )
    devices = sorted(topology.devices, key=lambda d: (getattr(d, "slice_index", 0), d.id))
    if len(devices) != tpu.num_devices:
        raise RuntimeError(
            f"libtpu described {tpu.num_slices} x {tpu.topology_name} with {len(devices)} "
            "devices, expected "
            f"{tpu.num_devices}; this libtpu does not match the table in "
            "simclr_jax/preflight/hardware.py."
        )
    return devices


def chips_per_host(devices: Sequence[Any], tpu: Slice) -> int:
    """Chips one host drives, from libtpu's description (devices of process 0)."""
    first = devices[0].process_index
    local = sum(1 for d in devices if d.process_index == first)
    return max(local // tpu.generation.devices_per_chip, 1)


def gib(nbytes: float, significant: int | None = None) -> str:
    """Bytes in GiB: one decimal ('12.3 GiB'), or `significant` digits ('15.93 GiB',
    '0.1219 GiB' with 4) for limits close to what is needed."""
    if significant is None:
        return f"{nbytes / GIB:.1f} GiB"
    return f"{nbytes / GIB:.{significant}g} GiB"
