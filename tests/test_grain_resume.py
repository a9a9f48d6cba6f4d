"""Exact resume of the Grain input path (data.backend='jax') through the real command line
(tests/pod_worker.py): SIGKILL at a random step, relaunch, and the final parameters are
bit-identical to an uninterrupted run. The Grain iterator state saved in each checkpoint's
metadata is what the relaunch restores. 1 process x 2 devices with 2 Grain worker processes,
and 2 processes x 1 device (threads)."""

import json
import random
import signal

import jax
import ml_collections
import numpy as np
import pytest
from pod_worker import run_pod, tiny_flags

from simclr_jax import checkpoint, evaluate, parallel

pytestmark = pytest.mark.multiprocess


def _variables(workdir, step):
    manager, step = checkpoint.open_for_restore(workdir, step)
    saved = ml_collections.ConfigDict(checkpoint.read_meta(manager, step)["config"])
    _, variables = evaluate.restore_model(manager, step, saved, parallel.create_mesh())
    return jax.device_get(variables)


def _meta(workdir, step):
    manager, step = checkpoint.open_for_restore(workdir, step)
    return checkpoint.read_meta(manager, step)


def _check(codes, logs, expected):
    assert codes == expected, "\n=====\n".join(log[-4000:] for log in logs)


@pytest.mark.parametrize(
    "processes,devices,steps,grain_workers", [(1, 2, 6, 2), (2, 1, 5, 0)], ids=["1proc", "2proc"]
)
def test_sigkill_then_relaunch_is_bit_identical(tmp_path, processes, devices, steps, grain_workers):
    overrides = {
        "data.backend": "jax",
        "data.grain_workers": grain_workers,
        "train_steps": steps,
        "data.eval_split": "test[:2]",
        "eval_batch_size": 16,
    }
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    timeout = 300 + 150 * steps * processes
    codes, logs = run_pod(
        processes, devices, tiny_flags(reference, **overrides), tmp_path / "l0",
        timeout=timeout,
    )  # fmt: skip
    _check(codes, logs, [0] * processes)
    kill_at = random.choice(range(3, steps))  # after checkpoint 2, which the hook waits for
    hooks = dict.fromkeys(range(processes), {"kill_at": kill_at, "kill_after_commit": 1})
    flags = tiny_flags(killed, **overrides)
    codes, logs = run_pod(
        processes, devices, flags, tmp_path / "l1", timeout=timeout, hooks_for=hooks
    )
    _check(codes, logs, [-signal.SIGKILL] * processes)
    saved = _meta(killed, -1)
    assert saved["step"] < kill_at and saved["data_state"]["next_step"] == saved["step"]
    assert saved["data_state"]["host"]["grain"], saved["data_state"]  # Grain's own state
    codes, logs = run_pod(processes, devices, flags, tmp_path / "l2", timeout=timeout)
    _check(codes, logs, [0] * processes)
    assert json.loads((killed / "results.json").read_text())["step"] == steps
    a, b = _variables(reference, steps), _variables(killed, steps)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
