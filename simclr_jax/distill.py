"""SimCLRv2 stage 3, mode 'distill': a frozen fine-tuned teacher labels the unlabeled training
split with its temperature-scaled softmax and a student learns to match it (paper section 2,
eqs. 2-3), optionally mixed with the cross entropy of a labelled subset.

The teacher is restored from a fine-tuned workdir with the architecture it was trained with;
the student is config.model (any architecture), initialised from config.init_checkpoint (a
pretraining workdir: encoder + selected head layers, as fine-tuning does) or from scratch. The
teacher's forward pass (BN in inference mode, stop_gradient) runs in the student's jitted,
sharded step; its variables are an argument of that step, never donated or checkpointed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from simclr_jax import checkpoint, data, evaluate, losses, parallel, step, training
from simclr_jax.metrics import MetricWriter
from simclr_jax.models import create_model

# Checkpoint modes whose model is a classifier trained end to end (a distilled student can
# teach the next round).
TEACHER_MODES = ("finetune", "distill")


def validate_distill_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad distill.* / data.* field of a distill config."""
    d = config.get("distill")
    if d is None:
        raise ValueError("mode='distill' needs config.distill; start from simclr_jax/config.py.")
    if not d.teacher_checkpoint:
        raise ValueError(
            "mode='distill' needs distill.teacher_checkpoint: pass "
            "--config.distill.teacher_checkpoint=<fine-tuned workdir>."
        )
    if isinstance(d.temperature, bool) or not float(d.temperature) > 0:
        raise ValueError(f"distill.temperature={d.temperature!r} must be > 0 (paper: 0.1 or 1).")
    if not 0.0 <= float(d.alpha) <= 1.0:
        raise ValueError(
            f"distill.alpha={d.alpha!r} must be in [0, 1] (1: distillation only, the paper's "
            "default; below 1 mixes in the labelled cross entropy)."
        )
    if float(d.alpha) < 1.0 and not d.labeled_split:
        raise ValueError(
            f"distill.alpha={d.alpha} mixes in a labelled loss but distill.labeled_split is "
            "empty; set it (e.g. 'train' with distill.label_subset='10pct') or alpha=1."
        )
    if config.data.get("label_subset", ""):
        raise ValueError(
            f"data.label_subset={config.data.label_subset!r}: distillation trains on the whole "
            "unlabeled split; put the labelled subset in distill.label_subset instead."
        )


def open_teacher(
    config: ml_collections.ConfigDict,
) -> tuple[Any, int, ml_collections.ConfigDict]:
    """(read-only manager, step, saved config) of the teacher; ValueError unless it is a
    fine-tuned classifier."""
    d = config.distill
    manager, step = checkpoint.open_for_restore(
        d.teacher_checkpoint, d.teacher_checkpoint_step, field="config.distill.teacher_checkpoint"
    )
    where = f"distill.teacher_checkpoint={d.teacher_checkpoint!r} (step {step})"
    try:
        saved = ml_collections.ConfigDict(checkpoint.read_meta(manager, step)["config"])
        shapes = checkpoint.saved_shapes(manager, step)
    except (KeyError, ValueError) as error:  # a missing item or unparsable metadata
        manager.close()
        raise ValueError(
            f"{where} is not a readable checkpoint ({type(error).__name__}: {error}); point it "
            "at a fine-tuning workdir whose training finished saving it."
        ) from error
    if saved.mode not in TEACHER_MODES:
        manager.close()
        raise ValueError(
            f"{where} was trained with mode={saved.mode!r}, not a fine-tuned classifier; point "
            f"it at a workdir of mode {' or '.join(TEACHER_MODES)} (e.g. configs/"
            "imagenet_finetune.py's) or a converted fine-tuned checkpoint."
        )
    if not any(k.startswith("params/classifier/") for k in shapes):
        manager.close()
        raise ValueError(f"{where} holds no classifier parameters (params/classifier/...).")
    return manager, step, saved


def check_teacher(config: ml_collections.ConfigDict, num_classes: int) -> None:
    """Fails before anything compiles unless the teacher is a fine-tuned classifier over the
    dataset's num_classes classes."""
    manager, _, saved = open_teacher(config)
    manager.close()
    teacher_classes = int(saved.model.num_classes)
    if teacher_classes != int(num_classes):
        raise ValueError(
            f"distill.teacher_checkpoint={config.distill.teacher_checkpoint!r} predicts "
            f"{teacher_classes} classes but data {config.data.source}:{config.data.train_split} "
            f"has {num_classes}; distil on the data the teacher was fine-tuned for."
        )


def teacher_variables_and_shardings(
    model: Any, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[Callable[[jax.Array], dict[str, Any]], dict[str, Any], Any]:
    """(init, abstract variables, their shardings) of a teacher model: params and batch stats,
    sharded like a train state (config.mesh.fsdp_min_size)."""
    size = config.data.image_size

    def init(rng: jax.Array) -> dict[str, Any]:
        variables = model.init(rng, jnp.zeros((1, size, size, 3)), train=False)
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    abstract = jax.eval_shape(init, jax.random.key(0))
    return init, abstract, parallel.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)


def restore_teacher(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[Any, dict[str, Any], Any]:
    """(teacher model, its variables sharded like a train state, their shardings)."""
    manager, step, saved = open_teacher(config)
    model = create_model(
        saved.model, num_classes=int(saved.model.num_classes), mode=evaluate.model_mode(saved.mode)
    )
    init, _, shardings = teacher_variables_and_shardings(model, config, mesh)
    target = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    variables, _ = checkpoint.restore_variables(
        manager, step, target, prefixes=("encoder", "projection_head", "classifier")
    )
    manager.close()
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    logging.info("Teacher: %s step %d (%s).", config.distill.teacher_checkpoint, step, saved.model)
    return model, variables, shardings


def distill_loss_fn(
    student: Any,
    teacher: Any,
    params: Any,
    batch_stats: Any,
    teacher_variables: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    temperature: float,
    alpha: float,
) -> tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]:
    """Loss of the student params on one batch -> (loss, (new batch stats, metrics)).

    batch: 'image' (unlabeled), optional 'labeled_image' / 'labeled_label' (alpha < 1). The
    teacher runs in inference mode on the same views; its outputs are constants."""
    images = batch["image"]
    teacher_logits = jax.lax.stop_gradient(
        teacher.apply(teacher_variables, images, train=False)["logits"]
    )
    labeled = alpha < 1.0
    if labeled:
        # One student pass over both sets: BatchNorm sees them as one batch.
        images = jnp.concatenate([images, batch["labeled_image"]], axis=0)
    out, updated = student.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    num_unlabeled = batch["image"].shape[0]
    logits = out["logits"]
    loss, metrics = losses.distillation_loss(
        logits[:num_unlabeled],
        teacher_logits,
        temperature=temperature,
        labeled_logits=logits[num_unlabeled:] if labeled else None,
        labels=batch["labeled_label"] if labeled else None,
        alpha=alpha,
    )
    return loss, (updated["batch_stats"], metrics)


def make_distill_step(
    student: Any,
    teacher: Any,
    teacher_variables: dict[str, Any],
    teacher_shardings: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    state_shardings: Any,
    *,
    temperature: float,
    alpha: float,
) -> step.StepFn:
    """step(state, batch) -> (state, metrics): one jit (explicit shardings, state donated)
    holding the teacher's and the student's forward passes and the student's update."""

    def loss_fn(params: Any, batch_stats: Any, batch: step.Batch, teacher_variables: Any):
        return distill_loss_fn(
            student,
            teacher,
            params,
            batch_stats,
            teacher_variables,
            batch,
            temperature=temperature,
            alpha=alpha,
        )

    # The teacher is an argument of the step (read, never donated or trained), not a constant.
    return step.make_step(
        loss_fn,
        tx,
        schedule,
        mesh,
        state_shardings,
        constants={"teacher_variables": teacher_variables},
        constants_shardings={"teacher_variables": teacher_shardings},
    )


def distill_step_factory(
    config: ml_collections.ConfigDict,
    student: Any,
    teacher: Any,
    teacher_shardings: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
) -> Callable[[Any, Any], step.StepFn]:
    """make(state_shardings, teacher_variables) -> step(state, batch): make_distill_step with
    config.distill's temperature and alpha, the one place its arguments are assembled (for
    run_distill's restored teacher and the preflight's abstract one)."""

    def make(state_shardings: Any, teacher_variables: Any) -> step.StepFn:
        return make_distill_step(
            student,
            teacher,
            teacher_variables,
            teacher_shardings,
            tx,
            schedule,
            mesh,
            state_shardings,
            temperature=config.distill.temperature,
            alpha=config.distill.alpha,
        )

    return make


def unreachable_errors() -> tuple[type[Exception], ...]:
    """The errors of opening a checkpoint that mean this host has nothing there to read: no
    checkpoint at the path (checkpoint.open_for_restore's FileNotFoundError) or storage it
    cannot reach (OSError; TensorFlow's OpError, through which epath reads gs:// paths)."""
    tensorflow = sys.modules.get("tensorflow")  # not imported: none of its errors was raised
    return (OSError, tensorflow.errors.OpError) if tensorflow else (OSError,)


def abstract_distill_step(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    student: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    state_shardings: Any,
) -> tuple[Callable[..., Any], dict[str, Any], str]:
    """(jitted step(state, teacher_variables, batch), the teacher's abstract variables with
    their shardings, where its architecture came from): run_distill's step to lower and compile
    ahead of time, reading no parameter. The teacher is distill.teacher_checkpoint's
    architecture when a checkpoint is there, else (nothing at the path, or storage this host
    cannot reach) the student's (self-distillation); one that is not a readable fine-tuned
    classifier is a ValueError, as in run_distill."""
    teacher_config, mode, source = config.model, "finetune", "the student's architecture"
    try:
        manager, _, saved = open_teacher(config)
    except unreachable_errors():  # nothing to read here: self-distillation's shapes
        pass
    else:
        manager.close()
        teacher_config, mode = saved.model, evaluate.model_mode(saved.mode)
        source = str(config.distill.teacher_checkpoint)
    teacher = create_model(teacher_config, num_classes=int(config.model.num_classes), mode=mode)
    _, abstract, teacher_shardings = teacher_variables_and_shardings(teacher, config, mesh)
    make = distill_step_factory(config, student, teacher, teacher_shardings, tx, schedule, mesh)

    def distill_step(state: Any, teacher_variables: Any, batch: Any) -> Any:
        return make(state_shardings, teacher_variables)(state, batch)

    jitted = jax.jit(
        distill_step,
        in_shardings=(state_shardings, teacher_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
    teacher_variables = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, teacher_shardings
    )
    return jitted, teacher_variables, source


class DistillBatches:
    """The distillation input: global batches {'image'} of the unlabeled train split
    (fine-tuning augmentation), plus {'labeled_image', 'labeled_label'} from the labelled subset
    when distill.alpha < 1, the two streams advanced together. state() and close() cover both,
    so a resumed run continues both where they were (Grain's iterator state included)."""

    def __init__(self, unlabeled: data.TrainBatches, labeled: data.TrainBatches | None) -> None:
        self._unlabeled, self._labeled = unlabeled, labeled

    def __iter__(self) -> DistillBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = {"image": next(self._unlabeled)["image"]}
        if self._labeled is not None:
            labeled = next(self._labeled)
            batch.update(labeled_image=labeled["image"], labeled_label=labeled["label"])
        return batch

    def state(self) -> dict[str, Any]:
        """The unlabeled stream's TrainBatches.state(), with the labelled one's under 'labeled'."""
        labeled = self._labeled.state() if self._labeled is not None else None
        return {**self._unlabeled.state(), "labeled": labeled}

    def close(self) -> None:
        for stream in (self._unlabeled, self._labeled):
            if stream is not None:
                stream.close()


def distill_batches(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    start_step: int,
    data_state: dict[str, Any] | None = None,
) -> DistillBatches:
    """The input of run_distill from batch start_step; batch k depends only on (seed, k) with
    deterministic data. data_state: a DistillBatches.state() saved with the checkpoint."""
    common = {"num_views": 1, "augmentation": "crop_flip", "start_step": start_step}
    unlabeled = data.make_train_batches(
        config.data,
        mesh,
        split=config.data.train_split,
        batch_size=config.train_batch_size,
        seed=config.seed,
        data_state=data_state,
        **common,
    )
    if config.distill.alpha >= 1.0:
        return DistillBatches(unlabeled, None)
    labeled_data = ml_collections.ConfigDict(config.data.to_dict())
    labeled_data.label_subset = config.distill.label_subset
    labeled = data.make_train_batches(
        labeled_data,
        mesh,
        split=config.distill.labeled_split,
        batch_size=config.train_batch_size,
        seed=config.seed + 1,  # another order than the unlabeled stream's
        data_state=(data_state or {}).get("labeled"),
        **common,
    )
    return DistillBatches(unlabeled, labeled)


def run_distill(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    mesh: jax.sharding.Mesh,
    info: data.DatasetInfo,
    writer: MetricWriter,
) -> dict[str, Any]:
    """mode distill: restore the teacher, build / restore the student, train, evaluate both."""
    durations = training.resolve_durations(config, info.num_examples[config.data.train_split])
    teacher, teacher_variables, teacher_shardings = restore_teacher(config, mesh)
    student = create_model(config.model, num_classes=config.model.num_classes, mode="finetune")
    tx, schedule = training.create_optimizer(config, durations)

    make = distill_step_factory(config, student, teacher, teacher_shardings, tx, schedule, mesh)

    logging.info(
        "mode=distill: %d steps (%.1f steps/epoch), tau %g, alpha %g, batch %d on %d devices.",
        durations.total_steps,
        durations.steps_per_epoch,
        config.distill.temperature,
        config.distill.alpha,
        config.train_batch_size,
        mesh.size,
    )
    state, last = training.fit(
        config,
        workdir,
        mesh,
        durations,
        student,
        tx,
        writer,
        make_step=lambda shardings: make(shardings, teacher_variables),
        make_batches=lambda start_step, data_state: distill_batches(
            config, mesh, start_step, data_state
        ),
    )
    results = evaluate.evaluate_model(student, state.variables(), config, mesh, knn=config.knn_eval)
    taught = evaluate.evaluate_model(teacher, teacher_variables, config, mesh, knn=False)
    teacher_results = {f"teacher_{k}": taught[k] for k in ("top1", "top5", "eval_loss")}
    return {
        "mode": "distill",
        "step": int(jax.device_get(state.step)),
        **last,
        **results,
        **teacher_results,
    }
