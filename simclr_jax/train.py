"""Training and evaluation: pretrain | linear_eval | finetune | distill | eval, one code path
for 1 CPU device, simulated devices and TPU pods (distill's step and teacher: distill.py).

The state is created already sharded (jit of the init with out_shardings); every step is ONE
jax.jit with explicit in/out shardings and the state donated. Durations (steps or epochs) are
converted to steps here and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metric_writers, periodic_actions
from etils import epath

from simclr_jax import (
    checkpoint,
    data,
    distill,
    evaluate,
    losses,
    metrics,
    optim,
    parallel,
    preemption,
)
from simclr_jax.models import (
    create_model,
    num_head_outputs,
    resolve_cifar_stem,
    validate_model_config,
)
from simclr_jax.train_state import TrainState

MODES = ("pretrain", "linear_eval", "finetune", "distill", "eval")
TRAINABLE, FROZEN = "trainable", "frozen"


# ------------------------------------------------------------------ config and durations


@dataclasses.dataclass(frozen=True)
class Durations:
    """Run length in optimizer steps, derived from steps or epochs in one place."""

    total_steps: int
    warmup_steps: int
    steps_per_epoch: float


def resolve_durations(config: ml_collections.ConfigDict, num_train_examples: int) -> Durations:
    """train_steps/warmup_steps when > 0, else epochs x examples / global batch (rounded up)."""
    steps_per_epoch = num_train_examples / config.train_batch_size
    total = int(config.train_steps) or math.ceil(config.train_epochs * steps_per_epoch)
    warmup = int(config.warmup_steps) or int(round(config.warmup_epochs * steps_per_epoch))
    if total <= 0:
        raise ValueError(
            f"train_steps={config.train_steps} and train_epochs={config.train_epochs} give no "
            "training steps; set one of them > 0."
        )
    if warmup > total:
        raise ValueError(
            f"warmup ({warmup} steps from warmup_steps={config.warmup_steps} / warmup_epochs="
            f"{config.warmup_epochs}) exceeds the {total} training steps; lower it."
        )
    return Durations(total, warmup, steps_per_epoch)


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


# ------------------------------------------------------------------ state and optimizer


def param_labels(params: Any, config: ml_collections.ConfigDict) -> Any:
    """'trainable' / 'frozen' per parameter: the frozen encoder part and head layers the
    classifier does not read are left untouched by the optimizer (no weight decay either)."""
    if config.mode == "pretrain":
        return jax.tree.map(lambda _: TRAINABLE, params)
    frozen_until = int(config.model.fine_tune_after_block)
    outputs = num_head_outputs(config.model.proj_head_mode, int(config.model.num_proj_layers))
    selector = int(config.model.ft_proj_selector) % outputs

    def label(path: tuple[Any, ...], _: Any) -> str:
        names = [str(getattr(p, "key", p)) for p in path]
        if names[0] == "encoder":
            part = names[1]
            stage = 0 if part == "stem" else int(part.removeprefix("stage"))
            return FROZEN if stage <= frozen_until else TRAINABLE
        if names[0] == "projection_head":
            return FROZEN if int(names[1].removeprefix("layer")) > selector else TRAINABLE
        return TRAINABLE

    return jax.tree_util.tree_map_with_path(label, params)


def create_optimizer(
    config: ml_collections.ConfigDict, durations: Durations
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The configured optimizer applied to trainable parameters only, and its LR schedule."""
    tx, schedule = optim.create_optimizer(
        config.optim,
        batch_size=config.train_batch_size,
        total_steps=durations.total_steps,
        warmup_steps=durations.warmup_steps,
        trust_ratio_excluded_modules=optim.trust_ratio_exclusions(config.mode),
    )
    tx = optax.multi_transform(
        {TRAINABLE: tx, FROZEN: optax.set_to_zero()}, lambda p: param_labels(p, config)
    )
    return tx, schedule


def create_train_state(
    model: Any,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    image_size: int,
    seed: int,
    fsdp_min_size: int = 0,
) -> tuple[TrainState, Any]:
    """Initializes the state directly in its shardings; returns (state, state shardings)."""

    def init(rng: jax.Array) -> TrainState:
        variables = model.init(rng, jnp.zeros((2, image_size, image_size, 3)), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
        )

    rng = jax.random.key(seed)
    abstract = jax.eval_shape(init, rng)
    shardings = parallel.state_shardings(abstract, mesh, fsdp_min_size)
    state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


# ------------------------------------------------------------------ step functions


def _update(
    state: TrainState,
    tx: optax.GradientTransformation,
    grads: Any,
    batch_stats: Any,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Applies one optimizer update; returns the new state and norm metrics."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    norms = {"grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params)}
    return new_state, norms


def _jit_step(step_fn: Callable, mesh: jax.sharding.Mesh, state_shardings: Any) -> Callable:
    """One jit with explicit shardings: state as given, batch on 'data', metrics replicated."""
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


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
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """SimCLR step on a batch {'image': (B, 2, H, W, 3), 'label': (B,)}: NT-Xent over the global
    batch plus the online linear probe's cross entropy (on stop_gradient(h), both views)."""

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        images = batch["image"]
        num_images = images.shape[0]
        # Interleaved views (image i -> rows 2i, 2i+1) keep every image's views on its device.
        views = images.reshape((2 * num_images, *images.shape[2:]))
        labels = jnp.repeat(batch["label"], 2)

        def loss_fn(params):
            out, updated = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
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

        (loss, (batch_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, norms = _update(state, tx, grads, batch_stats)
        step_metrics = {"loss": loss, **aux, **norms, "learning_rate": schedule(state.step)}
        return new_state, step_metrics

    return _jit_step(step_fn, mesh, state_shardings)


def make_supervised_step(
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    state_shardings: Any,
    *,
    num_classes: int,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Linear-eval / fine-tuning step on {'image': (B, H, W, 3), 'label': (B,)}; the frozen
    encoder part gets no gradient and keeps its BN in inference mode (model mode 'finetune')."""

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        def loss_fn(params):
            out, updated = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
            )
            loss = losses.softmax_cross_entropy(out["logits"], batch["label"], num_classes)
            accuracy = jnp.mean(losses.topk_correct(out["logits"], batch["label"], 1))
            return loss, (updated["batch_stats"], {"train_acc": accuracy})

        (loss, (batch_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, norms = _update(state, tx, grads, batch_stats)
        return new_state, {"loss": loss, **aux, **norms, "learning_rate": schedule(state.step)}

    return _jit_step(step_fn, mesh, state_shardings)


def make_train_step(
    config: ml_collections.ConfigDict,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    state_shardings: Any,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted step config.mode trains with: SimCLR pretraining or supervised."""
    num_classes = int(config.model.num_classes)
    if config.mode == "pretrain":
        return make_pretrain_step(
            model,
            tx,
            schedule,
            mesh,
            state_shardings,
            num_classes=num_classes,
            temperature=float(config.loss.temperature),
            hidden_norm=bool(config.loss.hidden_norm),
        )
    return make_supervised_step(model, tx, schedule, mesh, state_shardings, num_classes=num_classes)


# ------------------------------------------------------------------ evaluation


def evaluate_model(
    model: Any,
    variables: dict[str, Any],
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    knn: bool,
) -> dict[str, float]:
    """Top-1/top-5 of the classifier (the online probe when pretraining) on the eval split,
    plus weighted kNN on h (train split as the bank) when `knn`."""
    num_classes = int(config.model.num_classes)
    eval_data = data.make_eval_iterator(
        config.data, split=config.data.eval_split, batch_size=config.eval_batch_size
    )
    eval_step = evaluate.make_eval_step(model, mesh, num_classes)
    results, eval_features = evaluate.evaluate_split(
        eval_step, variables, eval_data, mesh, keep_features=knn
    )
    if knn:
        embed = evaluate.make_embed_fn(model, mesh)
        bank_data = data.make_eval_iterator(
            config.data, split=config.data.train_split, batch_size=config.eval_batch_size
        )
        results |= evaluate.knn_accuracy(
            evaluate.extract_features(embed, variables, bank_data, mesh),
            eval_features,
            num_classes=num_classes,
            k=int(config.knn_k),
            temperature=float(config.knn_temperature),
        )
    return results


# ------------------------------------------------------------------ restore


def init_checkpoint_prefixes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """What linear eval / fine-tuning reads from the pretraining checkpoint: the encoder and
    the projection-head layers up to ft_proj_selector."""
    outputs = num_head_outputs(config.model.proj_head_mode, int(config.model.num_proj_layers))
    selector = int(config.model.ft_proj_selector) % outputs
    return ("encoder", *(f"projection_head/layer{j}" for j in range(1, selector + 1)))


def restore_or_initialize(
    state: TrainState, manager: Any, config: ml_collections.ConfigDict
) -> TrainState:
    """Resumes from the workdir's latest checkpoint; otherwise, for linear_eval / finetune,
    loads the encoder (+ selected head layers) from config.init_checkpoint (distill: if set)."""
    latest = manager.latest_step()
    if latest is not None:
        logging.info("Resuming from %s step %d.", manager.directory, latest)
        return TrainState.from_tree(checkpoint.restore_state(manager, latest, state.to_tree()))
    if config.mode == "pretrain" or (config.mode == "distill" and not config.init_checkpoint):
        return state
    source, step = checkpoint.open_for_restore(config.init_checkpoint, config.init_checkpoint_step)
    merged, _ = checkpoint.restore_variables(
        source, step, state.variables(), prefixes=init_checkpoint_prefixes(config)
    )
    source.close()
    return state.replace(params=merged["params"], batch_stats=merged["batch_stats"])


def check_init_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Fails before anything compiles when linear_eval / finetune / eval would read
    config.init_checkpoint and it holds no checkpoint (FileNotFoundError saying what to pass)
    or one of another architecture (ValueError naming each parameter and both shapes)."""
    if config.mode == "pretrain" or (config.mode == "distill" and not config.init_checkpoint):
        return  # nothing to read: a distillation student may start from scratch
    own = checkpoint.checkpoint_dir(workdir)
    if config.mode != "eval" and own.exists() and any(p.name.isdigit() for p in own.iterdir()):
        return  # resuming this workdir's own run
    manager, step = checkpoint.open_for_restore(
        config.init_checkpoint or workdir, config.init_checkpoint_step
    )
    if config.mode != "eval":
        model = create_model(
            config.model,
            num_classes=config.model.num_classes,
            mode=evaluate.model_mode(config.mode),
        )
        size = int(config.data.image_size)
        abstract = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
        )
        checkpoint.check_compatible(manager, step, abstract, init_checkpoint_prefixes(config))
    manager.close()


# ------------------------------------------------------------------ loops


def train_loop(
    state: TrainState,
    train_step: Callable,
    batches: Iterator[dict[str, jax.Array]],
    *,
    config: ml_collections.ConfigDict,
    durations: Durations,
    manager: Any,
    writer: metric_writers.MetricWriter,
    on_eval: Callable[[TrainState], dict[str, float]] | None = None,
    watcher: preemption.PreemptionWatcher | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """Runs steps up to total_steps: logs, checks losses are finite before every save, saves
    every checkpoint_every_steps and at the end. Returns the state and the last train metrics.

    On a preemption notice (`watcher`) it saves at the step all processes agree on and raises
    preemption.Preempted; the caller waits for that save to finish."""
    total = durations.total_steps
    start = int(jax.device_get(state.step))
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer, every_secs=30)
    buffer, last, tick, ticked_steps = metrics.MetricBuffer(), {}, time.time(), 0
    log_every = config.log_every_steps or total
    # A notice during set-up or restore: stop before the first step (the state equals the
    # checkpoint it came from; nothing to write). All processes ask with the same step id.
    if watcher is not None and start < total and watcher.reached_sync_point(start):
        raise preemption.Preempted(start, saved=False)
    for step in range(start + 1, total + 1):
        state, step_metrics = train_step(state, next(batches))
        buffer.add(step, step_metrics)
        ticked_steps += 1
        report(step)
        # Asked at every step on every process: the sync protocol needs each step id.
        preempted = watcher is not None and watcher.reached_sync_point(step)
        save_now = (
            preempted
            or step == total
            or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
        )
        if save_now or step % log_every == 0:
            last = buffer.flush()  # raises FloatingPointError before any save
            elapsed = max(time.time() - tick, 1e-9)
            last["images_per_sec"] = ticked_steps * config.train_batch_size / elapsed
            last["steps_per_sec"] = ticked_steps / elapsed
            writer.write_scalars(step, last)
            metrics.log_progress(step, total, last["images_per_sec"], last["steps_per_sec"])
            tick, ticked_steps = time.time(), 0
        if save_now:
            checkpoint.save(manager, step, state.to_tree(), checkpoint_meta(config, step, batches))
        if preempted and step < total:
            raise preemption.Preempted(step)
        if on_eval and config.eval_every_steps and step % config.eval_every_steps == 0:
            writer.write_scalars(step, {f"eval/{k}": v for k, v in on_eval(state).items()})
    return state, last


def checkpoint_meta(
    config: ml_collections.ConfigDict, step: int, batches: Any = None
) -> dict[str, Any]:
    """JSON saved with each checkpoint: the data position is the step (deterministic data),
    plus the input iterator's own state when it has one (data.TrainBatches.state())."""
    meta = {"config": config.to_dict(), "step": step, "data_position": step, "mode": config.mode}
    data_state = getattr(batches, "state", None)
    if data_state is not None:
        meta["data_state"] = data_state()
    return meta


def saved_data_state(manager: Any, step: int) -> dict[str, Any] | None:
    """The input state saved with this workdir's checkpoint `step` (None for a fresh start, a
    checkpoint from before data_state existed, or an init_checkpoint from another run)."""
    if step == 0 or manager.latest_step() != step:
        return None
    return checkpoint.read_meta(manager, step).get("data_state")


def fit(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    mesh: jax.sharding.Mesh,
    durations: Durations,
    model: Any,
    tx: optax.GradientTransformation,
    writer: metric_writers.MetricWriter,
    *,
    make_step: Callable[[Any], Callable],
    make_batches: Callable[[int, dict[str, Any] | None], Any],
) -> tuple[TrainState, dict[str, Any]]:
    """What every training mode shares: the state created on the mesh, restored from this
    workdir (or initialized, from init_checkpoint), then trained to durations.total_steps with
    periodic checkpoints, evaluation and preemption handling.

    make_step(state shardings) -> step(state, batch). make_batches(start step, data_state saved
    with the restored checkpoint or None) -> the input; it is closed however training ends, so
    the input's worker processes (Grain) stop too."""
    state, shardings = create_train_state(
        model,
        tx,
        mesh,
        image_size=int(config.data.image_size),
        seed=int(config.seed),
        fsdp_min_size=int(config.mesh.get("fsdp_min_size", 0)),
    )
    # Listening from before the restore: a SIGTERM there ends the run cleanly too.
    watcher = preemption.PreemptionWatcher()
    manager = checkpoint.create_manager(workdir, keep=int(config.keep_checkpoints))
    try:
        state = restore_or_initialize(state, manager, config)
        train_step = make_step(shardings)
        start_step = int(jax.device_get(state.step))
        batches = make_batches(start_step, saved_data_state(manager, start_step))
        with watcher, contextlib.closing(batches):
            return train_loop(
                state,
                train_step,
                batches,
                config=config,
                durations=durations,
                manager=manager,
                writer=writer,
                on_eval=lambda s: evaluate_model(model, s.variables(), config, mesh, knn=False),
                watcher=watcher,
            )
    finally:
        watcher.close()
        # Also on preemption: the agreed step's checkpoint must be complete before exiting.
        manager.wait_until_finished()
        manager.close()


def run_training(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    mesh: jax.sharding.Mesh,
    info: data.DatasetInfo,
    writer: metric_writers.MetricWriter,
) -> dict[str, Any]:
    """pretrain / linear_eval / finetune: build, restore or init, train, evaluate."""
    durations = resolve_durations(config, info.num_examples[config.data.train_split])
    num_classes = int(config.model.num_classes)
    model = create_model(
        config.model, num_classes=num_classes, mode=evaluate.model_mode(config.mode)
    )
    tx, schedule = create_optimizer(config, durations)
    pretrain = config.mode == "pretrain"

    def make_batches(start_step: int, data_state: dict[str, Any] | None) -> data.TrainBatches:
        return data.make_train_batches(
            config.data,
            mesh,
            split=config.data.train_split,
            batch_size=config.train_batch_size,
            num_views=2 if pretrain else 1,
            augmentation="simclr" if pretrain else "crop_flip",
            seed=int(config.seed),
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
    state, last = fit(
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
    results = evaluate_model(model, state.variables(), config, mesh, knn=bool(config.knn_eval))
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
    results = evaluate_model(model, variables, eval_config, mesh, knn=bool(config.knn_eval))
    return {"mode": "eval", "checkpoint_mode": saved.mode, "step": step, **results}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs config.mode in workdir (local or gs://); writes config.json and results.json."""
    validate_config(config)
    mesh = parallel.mesh_from_config(config.mesh)
    parallel.check_batch_size(config.train_batch_size, mesh, "train_batch_size")
    parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    parallel.warn_if_host_local(str(workdir))
    check_init_checkpoint(config, str(workdir))
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
    logging.info("Results: %s", results)
    return results
