"""The dispatcher: train_and_evaluate validates a run's config once (modes.validate), picks its
mode's record and runs it: a training mode through the one loop (loop.fit) with the step
modes.train_program builds from the record, then evaluates; mode eval restores a checkpoint and
evaluates it. One code path for 1 CPU device, simulated devices and TPU pods.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import ml_collections
from etils import epath

from simclr_jax import checkpoint, data, evaluate, loop, metrics, modes, parallel


def run_training(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    mesh: jax.sharding.Mesh,
    info: data.DatasetInfo,
    writer: metrics.MetricWriter,
) -> dict[str, Any]:
    """pretrain / linear_eval / finetune / distill: build, restore or init, train, evaluate."""
    program = modes.train_program(config, mesh, info.num_examples[config.data.train_split])
    durations = program.durations
    logging.info(
        "mode=%s: %d steps (%.1f steps/epoch, warmup %d), global batch %d on %d devices.",
        config.mode,
        durations.total_steps,
        durations.steps_per_epoch,
        durations.warmup_steps,
        config.train_batch_size,
        mesh.size,
    )
    state, last = loop.fit(config, workdir, mesh, program, writer)
    results = evaluate.evaluate_model(
        program.model, state.variables(), config, mesh, knn=config.knn_eval
    )
    if program.mode.extra_results:
        results |= program.mode.extra_results(config, mesh, program.extra)
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
    mesh = parallel.mesh_from_config(config.mesh)
    modes.validate(config, mesh, workdir=str(workdir))
    parallel.warn_if_host_local(str(workdir))
    info = data.get_dataset_info(config.data)
    modes.check_checkpoints(config, str(workdir), info.num_classes)
    config = modes.resolve_config(config, info)
    workdir = epath.Path(workdir)
    if metrics.is_writer_process():
        workdir.mkdir(parents=True, exist_ok=True)
    metrics.write_json(workdir / "config.json", config.to_dict())
    # TensorBoard files need TensorFlow: the TF-free backend writes metrics.jsonl only.
    writer = metrics.create_writer(workdir, tensorboard=config.data.get("backend") != "jax")
    started = time.time()
    if config.mode == "eval":
        results = run_eval(config, workdir, mesh)
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
