"""SIGTERM in one process: the training loop saves at the step it lands on, waits for nothing
else, raises Preempted, and the handler it replaced comes back. No model is compiled: the loop
runs a stand-in step (the real step and multi-process agreement are in test_multihost.py),
except in the tests of main.py's exit status, which run it in a subprocess."""

import json
import os
import signal

import jax.numpy as jnp
import ml_collections
import pytest
from pod_worker import complete_steps, run_pod, tiny_flags

from simclr_jax import checkpoint, loop, metrics, preemption
from simclr_jax.train_state import TrainState


def fake_step(state, batch):
    """A train step without a model: the step counter moves, the loss is finite."""
    return state.replace(step=state.step + 1, params={"w": state.params["w"] + 1.0}), {
        "loss": jnp.float32(1.0)
    }


def run_loop(workdir, sigterm_at=None, total=10):
    """train_loop with the stand-in step; SIGTERMs this process after step `sigterm_at`."""
    config = ml_collections.ConfigDict(
        {
            "mode": "pretrain",
            "log_every_steps": 100,
            "checkpoint_every_steps": 4,
            "train_batch_size": 8,
            "eval_every_steps": 0,
        }
    )

    def step(state, batch):
        new_state, metrics = fake_step(state, batch)
        if int(new_state.step) == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return new_state, metrics

    state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(3)}, {}, {})
    manager = checkpoint.create_manager(workdir, keep=10)
    try:
        with preemption.PreemptionWatcher() as watcher:
            return loop.train_loop(
                state,
                step,
                iter(lambda: {}, None),
                config=config,
                durations=loop.Durations(total, 0, 1.0),
                manager=manager,
                writer=metrics.ConsoleWriter(),
                watcher=watcher,
            )
    finally:
        manager.wait_until_finished()
        manager.close()


def test_sigterm_saves_at_that_step_and_raises(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(preemption.Preempted, match="step 6") as stopped:
        run_loop(tmp_path, sigterm_at=6)
    assert stopped.value.step == 6
    manager, latest = checkpoint.open_for_restore(tmp_path)
    assert latest == 6 and manager.all_steps() == [4, 6]  # periodic save + the agreed step
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored after the loop


def test_no_signal_runs_to_the_end(tmp_path):
    state, _ = run_loop(tmp_path)
    assert int(state.step) == 10
    assert checkpoint.open_for_restore(tmp_path)[0].all_steps() == [4, 8, 10]


def test_watcher_without_signal_never_fires():
    with preemption.PreemptionWatcher() as watcher:
        assert not any(watcher.reached_sync_point(step) for step in range(1, 5))


def test_preemption_uses_only_public_jax_api():
    """The mode is read from public JAX (process_count, the preemption-service flag and
    multihost_utils); a JAX release that drops one of them fails here, not on a pod."""
    import inspect

    import jax
    from jax.experimental import multihost_utils

    assert "_src" not in inspect.getsource(preemption)
    assert isinstance(jax.config.jax_enable_preemption_service, bool)
    assert callable(multihost_utils.reached_preemption_sync_point)
    assert preemption._distributed_mode() == "single"  # this pytest process


def test_exit_statuses_are_the_documented_ones():
    """The launchers and docs repeat these numbers (they cannot import JAX)."""
    assert preemption.EXIT_FINISHED == 0
    assert preemption.EXIT_CONFIG_ERROR == 2
    assert preemption.EXIT_PREEMPTED == 42  # xpk's default restart rules: 42 and 127-255
    assert preemption.STOP_MARKER == "stop_requested"


@pytest.mark.multiprocess  # a tiny run of main.py: about a minute on 2 busy cores
def test_sigterm_saves_and_exits_with_the_preemption_status(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    stale = preemption.stop_marker(workdir)
    stale.write_text("")  # left by an earlier stop: the run removes it when it starts
    flags = tiny_flags(workdir, train_steps=4)
    codes, logs = run_pod(1, 1, flags, tmp_path / "logs", hooks_for={0: {"sigterm_at": 2}})
    assert codes == [preemption.EXIT_PREEMPTED], logs[0][-3000:]
    assert "checkpoint saved at step 2" in logs[0] and "exit status 42" in logs[0]
    assert not stale.exists()
    assert complete_steps(workdir) == [2]
    assert not (workdir / "results.json").exists()  # the run did not finish


@pytest.mark.multiprocess  # a tiny run of main.py: about a minute on 2 busy cores
def test_sigterm_with_the_stop_marker_saves_and_exits_finished(tmp_path):
    workdir = tmp_path / "run"
    hooks = {0: {"sigterm_at": 2, "stop_requested": 1}}
    codes, logs = run_pod(
        1, 1, tiny_flags(workdir, train_steps=4), tmp_path / "logs", hooks_for=hooks
    )
    assert codes == [preemption.EXIT_FINISHED], logs[0][-3000:]
    assert "test hook: stop marker written" in logs[0]
    assert "checkpoint saved at step 2" in logs[0] and "(stop requested)" in logs[0]
    assert complete_steps(workdir) == [2]
    assert preemption.stop_marker(workdir).exists()  # removed by the next run's start


@pytest.mark.multiprocess  # two tiny runs of main.py: about a minute on 2 busy cores
def test_sigterm_during_restore_exits_cleanly_and_keeps_the_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    codes, logs = run_pod(1, 1, tiny_flags(workdir, train_steps=2), tmp_path / "first")
    assert codes == [0], logs[0][-3000:]
    finished = (workdir / "results.json").read_text()
    codes, logs = run_pod(
        1,
        1,
        tiny_flags(workdir, train_steps=4),
        tmp_path / "second",
        hooks_for={0: {"sigterm_in_restore": 1}},
    )
    assert codes == [preemption.EXIT_PREEMPTED], logs[0][-3000:]  # to be restarted
    assert "test hook: SIGTERM while restoring" in logs[0]
    assert "stopped before training, nothing written (resumes from step 2)" in logs[0]
    # The last complete checkpoint is intact and nothing half-written sits next to it.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    manager, latest = checkpoint.open_for_restore(workdir)
    assert latest == 2 and checkpoint.read_meta(manager, 2)["step"] == 2
    assert (workdir / "results.json").read_text() == finished  # the stopped run wrote none
    assert json.loads(finished)["step"] == 2
