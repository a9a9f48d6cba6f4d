"""The one training loop every mode runs, and what it needs to know of a run: durations (steps
or epochs, converted here and nowhere else), the optimizer over the trainable parameters,
restore or init (this workdir, else init_checkpoint), and the loop itself (input, checkpoints
with their metadata, preemption, periodic eval) that `fit` runs with a mode's step
(modes.train_program). This module knows no mode's loss.
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
import ml_collections
import optax
from etils import epath

from simclr_jax import checkpoint, evaluate, metrics, optim, preemption
from simclr_jax.models import abstract_variables, model_from_config, num_head_outputs
from simclr_jax.train_state import TrainState, create_train_state

TRAINABLE, FROZEN = "trainable", "frozen"


# ------------------------------------------------------------------ durations and optimizer


@dataclasses.dataclass(frozen=True)
class Durations:
    """Run length in optimizer steps, derived from steps or epochs in one place."""

    total_steps: int
    warmup_steps: int
    steps_per_epoch: float


def resolve_durations(config: ml_collections.ConfigDict, num_train_examples: int) -> Durations:
    """train_steps/warmup_steps when > 0, else epochs x examples / global batch (rounded up)."""
    steps_per_epoch = num_train_examples / config.train_batch_size
    total = config.train_steps or math.ceil(config.train_epochs * steps_per_epoch)
    warmup = config.warmup_steps or int(round(config.warmup_epochs * steps_per_epoch))
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


def head_selector(model_config: ml_collections.ConfigDict) -> int:
    """The projection-head output the classifier reads (0 = h): ft_proj_selector, negative
    values counted from the end as Python indexes hiddens."""
    outputs = num_head_outputs(model_config.proj_head_mode, int(model_config.num_proj_layers))
    return int(model_config.ft_proj_selector) % outputs


def param_labels(params: Any, config: ml_collections.ConfigDict) -> Any:
    """'trainable' / 'frozen' per parameter: the frozen encoder part and head layers the
    classifier does not read are left untouched by the optimizer (no weight decay either)."""
    if config.mode == "pretrain":
        return jax.tree.map(lambda _: TRAINABLE, params)
    frozen_until = int(config.model.fine_tune_after_block)
    selector = head_selector(config.model)

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


# ------------------------------------------------------------------ restore


def reads_init_checkpoint(config: ml_collections.ConfigDict) -> bool:
    """Whether the run starts from config.init_checkpoint: every mode but pretraining, and
    distillation only when one is given (a student may start from scratch)."""
    return not (
        config.mode == "pretrain" or (config.mode == "distill" and not config.init_checkpoint)
    )


def init_checkpoint_prefixes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """What linear eval / fine-tuning reads from the pretraining checkpoint: the encoder and
    the projection-head layers up to ft_proj_selector."""
    selector = head_selector(config.model)
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
    if not reads_init_checkpoint(config):
        return state
    source, step = checkpoint.open_for_restore(config.init_checkpoint, config.init_checkpoint_step)
    merged, _ = checkpoint.restore_variables(
        source, step, state.variables(), prefixes=init_checkpoint_prefixes(config)
    )
    source.close()
    return state.replace(params=merged["params"], batch_stats=merged["batch_stats"])


def check_init_checkpoint(config: ml_collections.ConfigDict, workdir: str | None) -> None:
    """Fails before anything compiles when linear_eval / finetune / eval would read
    config.init_checkpoint and it holds no checkpoint (FileNotFoundError saying what to pass)
    or one of another architecture (ValueError naming each parameter and both shapes).
    workdir None: a run planned without one (the preflight), never a resumed one."""
    if not reads_init_checkpoint(config):
        return  # nothing to read: a distillation student may start from scratch
    if workdir is not None and config.mode != "eval":
        own = checkpoint.checkpoint_dir(workdir)
        if own.exists() and any(p.name.isdigit() for p in own.iterdir()):
            return  # resuming this workdir's own run
    manager, step = checkpoint.open_for_restore(
        config.init_checkpoint or workdir, config.init_checkpoint_step
    )
    if config.mode != "eval":
        abstract = abstract_variables(model_from_config(config), config.data.image_size)
        checkpoint.check_compatible(manager, step, abstract, init_checkpoint_prefixes(config))
    manager.close()


# ------------------------------------------------------------------ the loop


def train_loop(
    state: TrainState,
    train_step: Callable,
    batches: Iterator[dict[str, jax.Array]],
    *,
    extra: tuple[Any, ...] = (),
    config: ml_collections.ConfigDict,
    durations: Durations,
    manager: Any,
    writer: metrics.MetricWriter,
    on_eval: Callable[[TrainState], dict[str, float]] | None = None,
    watcher: preemption.PreemptionWatcher | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """Runs train_step(state, batch, *extra) up to total_steps: logs, checks losses are finite
    before every save, saves every checkpoint_every_steps and at the end. Returns the state and
    the last train metrics.

    On a preemption notice (`watcher`) it saves at the step all processes agree on and raises
    preemption.Preempted; the caller waits for that save to finish."""
    total = durations.total_steps
    start = int(jax.device_get(state.step))
    buffer, last, tick, ticked_steps = metrics.MetricBuffer(), {}, time.time(), 0
    log_every = config.log_every_steps or total
    # A notice during set-up or restore: stop before the first step (the state equals the
    # checkpoint it came from; nothing to write). All processes ask with the same step id.
    if watcher is not None and start < total and watcher.reached_sync_point(start):
        raise preemption.Preempted(start, saved=False)
    for step in range(start + 1, total + 1):
        state, step_metrics = train_step(state, next(batches), *extra)
        buffer.add(step, step_metrics)
        ticked_steps += 1
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
    program: Any,
    writer: metrics.MetricWriter,
) -> tuple[TrainState, dict[str, Any]]:
    """What every training mode shares: the state created on the mesh, restored from this
    workdir (or initialized, from init_checkpoint), then trained to the program's total steps
    with periodic checkpoints, evaluation and preemption handling.

    program: a modes.TrainProgram, whose step runs as step(state, batch, *extra inputs) on the
    batches of its mode record (from the start step, with the data_state saved with the
    restored checkpoint); the input is closed however training ends, so its worker processes
    (Grain) stop too."""
    state, _ = create_train_state(
        program.model,
        program.tx,
        mesh,
        image_size=config.data.image_size,
        seed=config.seed,
        fsdp_min_size=config.mesh.fsdp_min_size,
    )
    # Listening from before the restore: a SIGTERM there ends the run cleanly too.
    watcher = preemption.PreemptionWatcher()
    manager = checkpoint.create_manager(workdir, keep=config.keep_checkpoints)
    try:
        state = restore_or_initialize(state, manager, config)
        start_step = int(jax.device_get(state.step))
        batches = program.mode.batches(
            config, mesh, start_step, saved_data_state(manager, start_step)
        )
        with watcher, contextlib.closing(batches):
            return train_loop(
                state,
                program.step,
                batches,
                extra=program.extra.values,
                config=config,
                durations=program.durations,
                manager=manager,
                writer=writer,
                on_eval=lambda s: evaluate.evaluate_model(
                    program.model, s.variables(), config, mesh, knn=False
                ),
                watcher=watcher,
            )
    finally:
        watcher.close()
        # Also on preemption: the agreed step's checkpoint must be complete before exiting.
        manager.wait_until_finished()
        manager.close()
