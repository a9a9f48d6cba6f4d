"""Every mode's record drives both the trainer and the preflight: per mode, the step the
preflight lowers for the smoke config is the computation loop.fit runs (identical lowered
text, real batch and state against the record's abstract ones), and the preflight refuses each
config train_and_evaluate refuses, with the same one validation."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import smoke
from simclr_jax import checkpoint, dispatch, evaluate, loop, parallel, train_state
from simclr_jax import preflight as pf
from simclr_jax.models import model_from_config

REPO = Path(__file__).resolve().parents[1]


def smoke_config(mode, **overrides):
    """The smoke config of `mode`, one short step, no kNN; the kernel gradient the preflight
    compiles for TPU (XLA's) so that the CPU trainer builds the same program."""
    config = smoke.get_config(mode)
    config.update_from_flattened_dict(
        {
            "train_batch_size": 16,
            "eval_batch_size": 16,
            "train_steps": 1,
            "warmup_steps": 0,
            "knn_eval": False,
            "data.eval_split": "test[:16]",
            "model.conv_kernel_grad": "xla",
            **overrides,
        }
    )
    return config


def untrained_checkpoint(workdir, mode):
    """A checkpoint of the smoke architecture (10 classes) written as by `mode`, all zeros:
    these tests read architectures, not values, so nothing is compiled to make it."""
    config = smoke_config(mode)
    config.model.num_classes = 10
    tx, _ = loop.create_optimizer(config, loop.Durations(10, 0, 1.0))
    abstract, _ = train_state.abstract_train_state(
        model_from_config(config), tx, parallel.create_mesh(), image_size=16
    )
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    manager = checkpoint.create_manager(workdir, keep=1)
    checkpoint.save(manager, 0, state.to_tree(), loop.checkpoint_meta(config, 0))
    manager.wait_until_finished()
    manager.close()
    return str(workdir)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{'pretrain': a pretraining workdir, 'finetune': a fine-tuned classifier's}."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {mode: untrained_checkpoint(root / mode, mode) for mode in ("pretrain", "finetune")}


def mode_overrides(mode, checkpoints):
    """What the smoke config of `mode` needs to run: the checkpoints it reads."""
    if mode in ("linear_eval", "finetune"):
        return {"init_checkpoint": checkpoints["pretrain"]}
    if mode == "distill":
        return {
            "init_checkpoint": checkpoints["pretrain"],
            "distill.teacher_checkpoint": checkpoints["finetune"],
        }
    if mode == "eval":
        return {"init_checkpoint": checkpoints["finetune"]}
    return {}


class Captured(Exception):
    """Raised by the spies once they hold what the trainer was about to run."""


def lowered_by_the_trainer(monkeypatch, config, workdir):
    """The HLO text of the step the trainer runs for config (lowered with its real state and
    first batch), and the jitted function itself."""
    seen = {}

    def train_loop(state, train_step, batches, *, extra=(), **_):
        seen["text"] = train_step.lower(state, next(batches), *extra).as_text()
        seen["step"] = train_step
        raise Captured

    def evaluate_split(eval_step, variables, eval_data, mesh, **_):
        batch = parallel.host_batch_to_global(next(iter(eval_data)), mesh)
        seen["text"] = eval_step.lower(variables, batch).as_text()
        seen["step"] = eval_step
        raise Captured

    monkeypatch.setattr(loop, "train_loop", train_loop)
    monkeypatch.setattr(evaluate, "evaluate_split", evaluate_split)
    # Restoring init_checkpoint changes values, never what is lowered: skipped, for time.
    monkeypatch.setattr(loop, "restore_or_initialize", lambda state, manager, config: state)
    with pytest.raises(Captured):
        dispatch.train_and_evaluate(config, str(workdir))
    return seen["text"], seen["step"]


@pytest.mark.slow  # per mode: the trainer's set-up and first batch, two lowerings (10-40 s)
@pytest.mark.parametrize("mode", ["pretrain", "linear_eval", "finetune", "distill", "eval"])
def test_the_preflight_lowers_the_step_the_trainer_runs(tmp_path, monkeypatch, checkpoints, mode):
    config = smoke_config(mode, **mode_overrides(mode, checkpoints))
    trained_text, trained_step = lowered_by_the_trainer(monkeypatch, config, tmp_path / "w")
    mesh = parallel.mesh_from_config(config.mesh)  # the trainer's mesh: all 8 CPU devices
    prepared, info = pf.core.prepare_config(config, mesh)
    step, args, notes = pf.core.abstract_step(prepared, mesh, info)
    assert step is not trained_step  # built separately, from the same record...
    assert step.lower(*args).as_text() == trained_text  # ...into the same computation
    if mode == "distill":
        assert notes["teacher"] == checkpoints["finetune"] and len(args) == 3


# ------------------------------------------------------------------ refused by both


def refused_by_the_trainer(monkeypatch, config, workdir) -> Exception:
    """The error train_and_evaluate stops with, before anything is compiled."""

    def compiled(*args, **kwargs):
        raise AssertionError("compiled before the bad config was refused")

    monkeypatch.setattr(loop, "create_train_state", compiled)
    with pytest.raises((ValueError, OSError)) as refused:
        dispatch.train_and_evaluate(config, str(workdir))
    return refused.value


def refused_by_the_preflight(config) -> Exception:
    """The error the preflight stops with for config on a v4-8 (4 devices), before compiling."""
    with pytest.raises((ValueError, OSError)) as refused:
        pf.run_preflight(config, pf.parse_accelerator_type("v4-8"), devices=jax.devices()[:4])
    return refused.value


REFUSED = {
    "distill without a teacher": ("distill", {}, "needs distill.teacher_checkpoint"),
    "linear_eval without init_checkpoint": ("linear_eval", {}, "needs init_checkpoint"),
    "finetune without init_checkpoint": ("finetune", {}, "needs init_checkpoint"),
    "eval without init_checkpoint": ("eval", {}, "init_checkpoint"),
    "linear_eval that trains encoder blocks": (
        "linear_eval",
        {"init_checkpoint": "pretrain", "model.fine_tune_after_block": 2},
        "model.fine_tune_after_block=2 but linear_eval freezes the whole encoder",
    ),
    "an eval batch the devices do not divide": (
        "pretrain",
        {"eval_batch_size": 6},
        "eval_batch_size=6 is not divisible by the",
    ),
    "warmup longer than the run": ("pretrain", {"warmup_steps": 5}, "exceeds the 1 training"),
    "a teacher that is not a classifier": (
        "distill",
        {"init_checkpoint": "pretrain", "distill.teacher_checkpoint": "pretrain"},
        "mode='pretrain', not a fine-tuned classifier",
    ),
    "an init_checkpoint of another architecture": (
        "finetune",
        {"init_checkpoint": "pretrain", "model.width_multiplier": 2},
        "params/encoder/",
    ),
    "a labelled subset for distillation's unlabeled split": (
        "distill",
        {"distill.teacher_checkpoint": "finetune", "data.label_subset": "10pct"},
        "data.label_subset='10pct': distillation trains on the whole unlabeled split",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_preflight_refuses_what_the_trainer_refuses(tmp_path, monkeypatch, checkpoints, case):
    mode, overrides, message = REFUSED[case]
    overrides = {k: checkpoints.get(v, v) if isinstance(v, str) else v
                 for k, v in overrides.items()}  # fmt: skip
    trainer = refused_by_the_trainer(monkeypatch, smoke_config(mode, **overrides), tmp_path / "w")
    preflight = refused_by_the_preflight(smoke_config(mode, **overrides))
    assert message in str(trainer) and message in str(preflight), (trainer, preflight)
    assert not (tmp_path / "w" / "checkpoints").exists()  # nothing trained, nothing saved


@pytest.mark.parametrize(
    "mode, message",
    [
        ("distill", "mode='distill' needs distill.teacher_checkpoint"),
        ("eval", "mode='eval' needs init_checkpoint"),
    ],
)
def test_the_preflight_command_refuses_in_one_line_with_exit_status_2(mode, message):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'libtpu==0.0.42.1')")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run(
        [sys.executable, "-m", "simclr_jax.preflight", f"--config={REPO}/configs/smoke.py:{mode}",
         "--tpu=v4-8"], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("preflight: ") and message in line
    assert not result.stdout
