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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import checkpoint, data, evaluate, losses, parallel
from simclr_jax.models import abstract_variables, model_from_config, variables_init
from simclr_jax.modes.base import BatchSpec, ExtraInputs, Mode

# Checkpoint modes whose model is a classifier trained end to end (a distilled student can
# teach the next round).
TEACHER_MODES = ("finetune", "distill")


def validate(config: ml_collections.ConfigDict) -> None:
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


def restore_teacher(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[Any, dict[str, Any], Any]:
    """(teacher model, its variables sharded like a train state, their shardings)."""
    manager, step, saved = open_teacher(config)
    model = model_from_config(saved)
    size = config.data.image_size
    shardings = parallel.state_shardings(
        abstract_variables(model, size), mesh, config.mesh.fsdp_min_size
    )
    target = jax.jit(variables_init(model, size), out_shardings=shardings)(jax.random.key(0))
    variables, _ = checkpoint.restore_variables(
        manager, step, target, prefixes=("encoder", "projection_head", "classifier")
    )
    manager.close()
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    logging.info("Teacher: %s step %d (%s).", config.distill.teacher_checkpoint, step, saved.model)
    return model, variables, shardings


def unreachable_errors() -> tuple[type[Exception], ...]:
    """The errors of opening a checkpoint that mean this host has nothing there to read: no
    checkpoint at the path (checkpoint.open_for_restore's FileNotFoundError) or storage it
    cannot reach (OSError; TensorFlow's OpError, through which epath reads gs:// paths)."""
    tensorflow = sys.modules.get("tensorflow")  # not imported: none of its errors was raised
    return (OSError, tensorflow.errors.OpError) if tensorflow else (OSError,)


def abstract_teacher(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[Any, dict[str, Any], Any, str]:
    """(teacher model, its abstract variables with shardings, their shardings, where its
    architecture came from), reading no parameter: distill.teacher_checkpoint's architecture
    when a checkpoint is there, else (nothing at the path, or storage this host cannot reach)
    the student's (self-distillation). One that is not a readable fine-tuned classifier is a
    ValueError, as when training."""
    teacher_config, source = config, "the student's architecture"
    try:
        manager, _, saved = open_teacher(config)
    except unreachable_errors():  # nothing to read here: self-distillation's shapes
        pass
    else:
        manager.close()
        teacher_config, source = saved, str(config.distill.teacher_checkpoint)
    model = model_from_config(teacher_config)
    abstract = abstract_variables(model, config.data.image_size)
    shardings = parallel.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
    variables = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return model, variables, shardings, source


def extra_inputs(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, abstract: bool
) -> ExtraInputs:
    """The frozen teacher: its variables are the step's one extra input (read, never donated
    or trained), its module what the loss applies them with."""
    if abstract:
        model, variables, shardings, source = abstract_teacher(config, mesh)
        notes = {"teacher": source}
    else:
        model, variables, shardings = restore_teacher(config, mesh)
        notes = {"teacher": str(config.distill.teacher_checkpoint)}
    return ExtraInputs((variables,), (shardings,), {"teacher": model}, notes)


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


def loss(
    config: ml_collections.ConfigDict, model: Any, mesh: jax.sharding.Mesh, *, teacher: Any
) -> Any:
    """loss_fn(params, batch_stats, batch, teacher_variables): distill_loss_fn with
    config.distill's temperature and alpha."""
    del mesh  # a per-example loss: nothing crosses devices but BN's statistics
    temperature, alpha = config.distill.temperature, config.distill.alpha

    def loss_fn(params: Any, batch_stats: Any, batch: Any, teacher_variables: Any):
        return distill_loss_fn(
            model,
            teacher,
            params,
            batch_stats,
            teacher_variables,
            batch,
            temperature=temperature,
            alpha=alpha,
        )

    return loss_fn


def batch_spec(config: ml_collections.ConfigDict) -> BatchSpec:
    """Unlabeled images; with alpha < 1 labelled images and their labels too."""
    b, size = config.train_batch_size, config.data.image_size
    spec = {"image": ((b, size, size, 3), jnp.float32)}
    if config.distill.alpha < 1.0:
        spec |= {"labeled_image": ((b, size, size, 3), jnp.float32),
                 "labeled_label": ((b,), jnp.int32)}  # fmt: skip
    return spec


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


def batches(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    start_step: int,
    data_state: dict[str, Any] | None = None,
) -> DistillBatches:
    """The distillation input from batch start_step; batch k depends only on (seed, k) with
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


def teacher_results(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, extra: ExtraInputs
) -> dict[str, float]:
    """The teacher's own top-1 / top-5 / loss on the eval split, beside the student's."""
    taught = evaluate.evaluate_model(
        extra.modules["teacher"], extra.values[0], config, mesh, knn=False
    )
    return {f"teacher_{k}": taught[k] for k in ("top1", "top5", "eval_loss")}


MODE = Mode(
    name="distill",
    validate=validate,
    batch_spec=batch_spec,
    batches=batches,
    loss=loss,
    extra_inputs=extra_inputs,
    metrics=("distill_loss", "teacher_agreement", "labeled_loss"),
    extra_results=teacher_results,
)
