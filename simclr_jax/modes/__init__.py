"""The modes of a run, one record each (base.Mode: pretrain.py, supervised.py, distill.py,
eval.py), the one config validation every entry point runs, and the one place a mode's step is
built from its record: `train_program` for the loop (real inputs) and the preflight (abstract
ones) alike, so the preflight compiles exactly what the loop jits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from simclr_jax import data, evaluate, loop, parallel, step
from simclr_jax.config import MODES
from simclr_jax.models import (
    abstract_variables,
    model_from_config,
    model_mode,
    resolve_cifar_stem,
    validate_model_config,
)
from simclr_jax.modes import distill, pretrain, supervised
from simclr_jax.modes import eval as eval_mode
from simclr_jax.modes.base import ExtraInputs, Mode, abstract_batch, require
from simclr_jax.train_state import abstract_train_state

BY_NAME: dict[str, Mode] = {
    "pretrain": pretrain.MODE,
    "linear_eval": supervised.LINEAR_EVAL,
    "finetune": supervised.FINETUNE,
    "distill": distill.MODE,
    "eval": eval_mode.MODE,
}
assert tuple(BY_NAME) == MODES, "every mode of config.MODES has a record here"

__all__ = [
    "BY_NAME",
    "ExtraInputs",
    "Mode",
    "TrainProgram",
    "abstract_batch",
    "check_checkpoints",
    "eval_step_and_variables",
    "get",
    "resolve_config",
    "train_program",
    "validate",
    "validate_config",
]


def get(name: str) -> Mode:
    """The record of mode `name`; ValueError naming the modes there are."""
    require(name in BY_NAME, f"mode={name!r} is not supported; choose one of {MODES}.")
    return BY_NAME[name]


# ------------------------------------------------------------------ the one validation


def validate_config(config: ml_collections.ConfigDict, *, workdir: str | None = "") -> None:
    """Raises ValueError naming the first bad field; runs before any data is read or compiled.

    workdir: where the run writes; None when there is none (the preflight), so that mode eval,
    which otherwise evaluates the workdir's own checkpoint, needs init_checkpoint."""
    mode = get(config.mode)
    for field in ("train_batch_size", "eval_batch_size", "keep_checkpoints", "knn_k"):
        value = config[field]
        require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{field}={value!r} must be a positive integer.",
        )
    for field in ("train_steps", "warmup_steps", "log_every_steps", "checkpoint_every_steps"):
        value = config[field]
        require(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            f"{field}={value!r} must be an integer >= 0.",
        )
    for field in ("train_epochs", "warmup_epochs"):
        require(config[field] >= 0, f"{field}={config[field]!r} must be >= 0.")
    require(
        config.train_steps > 0 or config.train_epochs > 0 or config.mode == "eval",
        "train_steps and train_epochs are both 0; set one of them > 0.",
    )
    require(config.knn_temperature > 0, f"knn_temperature={config.knn_temperature!r} must be > 0.")
    require(
        config.mode != "eval" or workdir is not None or bool(config.init_checkpoint),
        "mode='eval' needs init_checkpoint (there is no workdir to evaluate): pass "
        "--config.init_checkpoint=<workdir to evaluate>.",
    )
    mode.validate(config)
    if config.mode != "eval":
        validate_model_config(
            config.model, num_classes=config.model.num_classes, mode=model_mode(config.mode)
        )
        resolve_cifar_stem(config.model.cifar_stem, config.data.image_size)


def validate(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, workdir: str | None
) -> None:
    """The one check of a run's config before anything is read or compiled, for the trainer
    and the preflight alike: its fields (validate_config) and both global batches on the mesh."""
    validate_config(config, workdir=workdir)
    parallel.check_batch_size(config.train_batch_size, mesh, "train_batch_size")
    parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")


def check_checkpoints(
    config: ml_collections.ConfigDict, workdir: str | None, num_classes: int
) -> None:
    """Fails before anything compiles when a checkpoint the run reads is missing or does not
    fit it: init_checkpoint (loop.check_init_checkpoint) and distill's teacher (a fine-tuned
    classifier of the data's num_classes). workdir None (the preflight, planning a run that
    reads its checkpoints elsewhere): a checkpoint this host cannot reach is not checked."""
    unreachable = distill.unreachable_errors() if workdir is None else ()
    try:
        loop.check_init_checkpoint(config, workdir)
    except unreachable:
        pass
    if config.mode == "distill":
        try:
            distill.check_teacher(config, num_classes)
        except unreachable:
            pass


def resolve_config(
    config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> ml_collections.ConfigDict:
    """An unlocked copy with model.num_classes taken from the dataset and model.cifar_stem
    'auto' resolved to True/False, so checkpoints record the architecture explicitly."""
    values = config.to_dict()
    values["model"]["num_classes"] = int(info.num_classes)
    if config.mode != "eval":
        # In the dict: a ConfigDict keeps the type of 'auto' (str) and would refuse a bool.
        values["model"]["cifar_stem"] = resolve_cifar_stem(
            config.model.cifar_stem, config.data.image_size
        )
    return ml_collections.ConfigDict(values)


# ------------------------------------------------------------------ the step of a run


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What a training run jits, built once from its (resolved) config: loop.fit runs `step`
    with the state and `extra.values`; the preflight lowers the same `step` with abstract ones.

    step(state, batch, *extra.values) -> (state, metrics), jitted with explicit shardings and
    the state donated (step.make_step)."""

    mode: Mode
    model: Any
    durations: loop.Durations
    tx: Any
    schedule: Any
    state_shardings: Any
    step: step.StepFn
    extra: ExtraInputs

    def abstract_state(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
        """The train state as ShapeDtypeStructs in its shardings (nothing allocated)."""
        abstract, shardings = abstract_train_state(
            self.model,
            self.tx,
            mesh,
            image_size=config.data.image_size,
            fsdp_min_size=config.mesh.fsdp_min_size,
        )
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )


def train_program(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    num_train_examples: int,
    *,
    abstract: bool = False,
) -> TrainProgram:
    """The model, optimizer and jitted step of config.mode (a training mode), from its record.
    abstract: the extra inputs (distill's teacher) as ShapeDtypeStructs, no parameter read."""
    mode = get(config.mode)
    require(mode.loss is not None, f"mode={config.mode!r} trains nothing.")
    durations = loop.resolve_durations(config, num_train_examples)
    model = model_from_config(config)
    tx, schedule = loop.create_optimizer(config, durations)
    _, state_shardings = abstract_train_state(
        model,
        tx,
        mesh,
        image_size=config.data.image_size,
        fsdp_min_size=config.mesh.fsdp_min_size,
    )
    extra = mode.extra_inputs(config, mesh, abstract) if mode.extra_inputs else ExtraInputs()
    loss_fn = mode.loss(config, model, mesh, **extra.modules)
    train_step = step.make_step(loss_fn, tx, schedule, mesh, state_shardings, extra.shardings)
    return TrainProgram(mode, model, durations, tx, schedule, state_shardings, train_step, extra)


def eval_step_and_variables(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[Any, Any]:
    """(jitted eval step, abstract variables held whole by every device) of mode eval: the
    step evaluate.evaluate_model runs on the variables evaluate.restore_model restores."""
    model = model_from_config(config)
    variables = abstract_variables(model, config.data.image_size)
    replicated = parallel.replicated(mesh)
    variables = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), variables
    )
    return evaluate.make_eval_step(model, mesh, config.model.num_classes), variables
