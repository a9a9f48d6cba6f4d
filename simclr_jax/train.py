"""Training and evaluation, one code path for 1 CPU device, simulated devices and TPU pods:
train_and_evaluate validates the config once and runs its mode. Pretraining (NT-Xent + the online
probe) and supervised training (linear_eval / finetune: cross entropy) live here as loss
functions handed to step.make_step; distillation is distill.py's; eval restores and evaluates.
The loop they share is training.fit.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from simclr_jax import (
    checkpoint,
    data,
    distill,
    evaluate,
    losses,
    metrics,
    parallel,
    step,
    training,
)
from simclr_jax.config import MODES
from simclr_jax.models import create_model, resolve_cifar_stem, validate_model_config
from simclr_jax.train_state import TrainState, abstract_train_state

# ------------------------------------------------------------------ config


def _require(ok: bool, message: str) -> None:
    """Raises ValueError(message) unless ok."""
    if not ok:
        raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field; runs before any data is read or compiled."""
    _require(config.mode in MODES, f"mode={config.mode!r} is not supported; choose one of {MODES}.")
    for field in ("train_batch_size", "eval_batch_size", "keep_checkpoints", "knn_k"):
        value = config[field]
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{field}={value!r} must be a positive integer.",
        )
    for field in ("train_steps", "warmup_steps", "log_every_steps", "checkpoint_every_steps"):
        value = config[field]
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            f"{field}={value!r} must be an integer >= 0.",
        )
    for field in ("train_epochs", "warmup_epochs"):
        _require(config[field] >= 0, f"{field}={config[field]!r} must be >= 0.")
    _require(
        config.train_steps > 0 or config.train_epochs > 0 or config.mode == "eval",
        "train_steps and train_epochs are both 0; set one of them > 0.",
    )
    _require(config.knn_temperature > 0, f"knn_temperature={config.knn_temperature!r} must be > 0.")
    if config.mode in ("linear_eval", "finetune"):
        _require(
            bool(config.init_checkpoint),
            f"mode={config.mode!r} needs init_checkpoint: pass "
            "--config.init_checkpoint=<pretraining workdir>.",
        )
    if config.mode == "distill":
        distill.validate_distill_config(config)
    if config.mode == "linear_eval":
        _require(
            config.model.fine_tune_after_block == 4,
            f"model.fine_tune_after_block={config.model.fine_tune_after_block} but linear_eval "
            "freezes the whole encoder; set it to 4 (or use mode=finetune).",
        )
    if config.mode != "eval":
        validate_model_config(
            config.model,
            num_classes=config.model.num_classes,
            mode=evaluate.model_mode(config.mode),
        )
        resolve_cifar_stem(config.model.cifar_stem, config.data.image_size)


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


# ------------------------------------------------------------------ the modes' losses


def pretrain_loss(
    model: Any, mesh: jax.sharding.Mesh, *, num_classes: int, temperature: float, hidden_norm: bool
) -> step.LossFn:
    """SimCLR loss on a batch {'image': (B, 2, H, W, 3), 'label': (B,)}: NT-Xent over the global
    batch plus the online linear probe's cross entropy (on stop_gradient(h), both views)."""

    def loss_fn(params: Any, batch_stats: Any, batch: step.Batch):
        images = batch["image"]
        num_images = images.shape[0]
        # Interleaved views (image i -> rows 2i, 2i+1) keep every image's views on its device.
        views = images.reshape((2 * num_images, *images.shape[2:]))
        labels = jnp.repeat(batch["label"], 2)
        out, updated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            views,
            train=True,
            mutable=["batch_stats"],
        )
        z = out["z"].reshape(num_images, 2, -1)
        contrast_loss, contrast = losses.nt_xent(
            z[:, 0], z[:, 1], mesh, temperature=temperature, hidden_norm=hidden_norm
        )
        probe_loss = losses.softmax_cross_entropy(out["logits"], labels, num_classes)
        aux = {
            "contrast_loss": contrast_loss,
            **contrast,
            "probe_loss": probe_loss,
            "probe_acc": jnp.mean(losses.topk_correct(out["logits"], labels, 1)),
        }
        return contrast_loss + probe_loss, (updated["batch_stats"], aux)

    return loss_fn


def supervised_loss(model: Any, *, num_classes: int) -> step.LossFn:
    """Linear-eval / fine-tuning cross entropy on {'image': (B, H, W, 3), 'label': (B,)}; the
    frozen encoder part gets no gradient and keeps its BN in inference mode (model mode
    'finetune')."""

    def loss_fn(params: Any, batch_stats: Any, batch: step.Batch):
        out, updated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = losses.softmax_cross_entropy(out["logits"], batch["label"], num_classes)
        accuracy = jnp.mean(losses.topk_correct(out["logits"], batch["label"], 1))
        return loss, (updated["batch_stats"], {"train_acc": accuracy})

    return loss_fn


def make_pretrain_step(
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    state_shardings: Any,
    *,
    num_classes: int,
    temperature: float,
    hidden_norm: bool = True,
) -> step.StepFn:
    """The jitted SimCLR pretraining step (pretrain_loss through step.make_step)."""
    loss_fn = pretrain_loss(
        model, mesh, num_classes=num_classes, temperature=temperature, hidden_norm=hidden_norm
    )
    return step.make_step(loss_fn, tx, schedule, mesh, state_shardings)


def make_supervised_step(
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    state_shardings: Any,
    *,
    num_classes: int,
) -> step.StepFn:
    """The jitted linear-eval / fine-tuning step (supervised_loss through step.make_step)."""
    loss_fn = supervised_loss(model, num_classes=num_classes)
    return step.make_step(loss_fn, tx, schedule, mesh, state_shardings)


def make_train_step(
    config: ml_collections.ConfigDict,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    state_shardings: Any,
) -> step.StepFn:
    """The jitted step config.mode trains with: SimCLR pretraining or supervised."""
    if config.mode == "pretrain":
        return make_pretrain_step(
            model,
            tx,
            schedule,
            mesh,
            state_shardings,
            num_classes=config.model.num_classes,
            temperature=config.loss.temperature,
            hidden_norm=config.loss.hidden_norm,
        )
    return make_supervised_step(
        model, tx, schedule, mesh, state_shardings, num_classes=config.model.num_classes
    )


def abstract_step_and_state(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[step.StepFn, TrainState, Any]:
    """(jitted step, abstract state, state shardings) of a pretrain / linear_eval / finetune
    run, exactly what run_training trains with, without allocating: lower the step with the
    abstract state and an abstract batch to compile it ahead of time."""
    abstract, shardings = abstract_train_state(
        model,
        tx,
        mesh,
        image_size=config.data.image_size,
        fsdp_min_size=config.mesh.fsdp_min_size,
    )
    return make_train_step(config, model, tx, schedule, mesh, shardings), abstract, shardings


# ------------------------------------------------------------------ modes


def run_training(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    mesh: jax.sharding.Mesh,
    info: data.DatasetInfo,
    writer: metrics.MetricWriter,
) -> dict[str, Any]:
    """pretrain / linear_eval / finetune: build, restore or init, train, evaluate."""
    durations = training.resolve_durations(config, info.num_examples[config.data.train_split])
    model = create_model(
        config.model, num_classes=config.model.num_classes, mode=evaluate.model_mode(config.mode)
    )
    tx, schedule = training.create_optimizer(config, durations)
    pretrain = config.mode == "pretrain"

    def make_batches(start_step: int, data_state: dict[str, Any] | None) -> data.TrainBatches:
        return data.make_train_batches(
            config.data,
            mesh,
            split=config.data.train_split,
            batch_size=config.train_batch_size,
            num_views=2 if pretrain else 1,
            augmentation="simclr" if pretrain else "crop_flip",
            seed=config.seed,
            start_step=start_step,
            data_state=data_state,
        )

    logging.info(
        "mode=%s: %d steps (%.1f steps/epoch, warmup %d), global batch %d on %d devices.",
        config.mode,
        durations.total_steps,
        durations.steps_per_epoch,
        durations.warmup_steps,
        config.train_batch_size,
        mesh.size,
    )
    state, last = training.fit(
        config,
        workdir,
        mesh,
        durations,
        model,
        tx,
        writer,
        make_step=lambda shardings: make_train_step(config, model, tx, schedule, mesh, shardings),
        make_batches=make_batches,
    )
    results = evaluate.evaluate_model(model, state.variables(), config, mesh, knn=config.knn_eval)
    return {"mode": config.mode, "step": int(jax.device_get(state.step)), **last, **results}


def run_eval(
    config: ml_collections.ConfigDict, workdir: epath.Path, mesh: jax.sharding.Mesh
) -> dict[str, Any]:
    """mode eval: restores any checkpoint (init_checkpoint, else this workdir) and evaluates
    it with the architecture it was trained with, on this config's data."""
    source = config.init_checkpoint or str(workdir)
    manager, step = checkpoint.open_for_restore(source, config.init_checkpoint_step)
    saved = ml_collections.ConfigDict(checkpoint.read_meta(manager, step)["config"])
    model, variables = evaluate.restore_model(manager, step, saved, mesh)
    eval_config = ml_collections.ConfigDict(config.to_dict())
    eval_config.model = saved.model
    results = evaluate.evaluate_model(model, variables, eval_config, mesh, knn=config.knn_eval)
    return {"mode": "eval", "checkpoint_mode": saved.mode, "step": step, **results}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs config.mode in workdir (local or gs://); writes config.json and results.json."""
    validate_config(config)
    mesh = parallel.mesh_from_config(config.mesh)
    parallel.check_batch_size(config.train_batch_size, mesh, "train_batch_size")
    parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    parallel.warn_if_host_local(str(workdir))
    training.check_init_checkpoint(config, str(workdir))
    info = data.get_dataset_info(config.data)
    if config.mode == "distill":
        distill.check_teacher(config, info.num_classes)
    config = resolve_config(config, info)
    workdir = epath.Path(workdir)
    if metrics.is_writer_process():
        workdir.mkdir(parents=True, exist_ok=True)
    metrics.write_json(workdir / "config.json", config.to_dict())
    # TensorBoard files need TensorFlow: the TF-free backend writes metrics.jsonl only.
    writer = metrics.create_writer(workdir, tensorboard=config.data.get("backend") != "jax")
    started = time.time()
    if config.mode == "eval":
        results = run_eval(config, workdir, mesh)
    elif config.mode == "distill":
        results = distill.run_distill(config, workdir, mesh, info, writer)
    else:
        results = run_training(config, workdir, mesh, info, writer)
    results["wall_time_s"] = time.time() - started
    writer.write_scalars(
        results["step"],
        {f"final/{k}": v for k, v in results.items() if isinstance(v, (int, float))},
    )
    writer.flush()
    metrics.write_json(workdir / "results.json", results)
    logging.info("Results in %s.", workdir / "results.json")
    return results
