"""A simulated pod and killed runs, through the real command line (tests/pod_worker.py).

One uninterrupted 1-process x 8-device run is the reference for everything here:
- pod: 2 processes x 4 devices (gloo, loopback coordinator) resume the reference's step-2
  checkpoint, one host gets SIGTERM, both save at the agreed step and exit with the preemption
  status (42, which schedulers restart), the relaunch
  finishes; parameters and metrics equal the reference's, its eval counts every example once.
- killed: 1 process, SIGKILL at a random step, then SIGKILL while the last checkpoint is being
  committed, then a relaunch: parameters bit-identical to the reference (deterministic data).
All runs share the test run's XLA compilation cache, so relaunches skip compiling.
"""

import functools
import json
import random
import re
import shutil
import signal
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import assert_trees_close
from helpers import read_variables as restore_variables
from pod_worker import complete_steps, run_pod, tiny_flags

from simclr_jax import preemption

pytestmark = pytest.mark.multiprocess

TOTAL_STEPS = 6
# each restore costs tens of seconds on 2 busy cores; tests share them
read_variables = functools.cache(restore_variables)
EVAL_EXAMPLES, EVAL_BATCH = 100, 48  # tiny_flags: test[:10] is 10 images per class
SAME_BATCH = {"same_global_batch": 1}
METRICS = ("loss", "contrast_loss", "contrast_acc", "probe_loss", "grad_norm", "param_norm")
EVAL_METRICS = ("eval_loss", "top1", "top5", "num_eval_examples")


def results(workdir):
    return json.loads((workdir / "results.json").read_text())


def check_ran(codes, logs, expected):
    assert codes == expected, "\n=====\n".join(log[-4000:] for log in logs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted run: 1 process x 8 devices, checkpoints at steps 2, 4, 6."""
    root = tmp_path_factory.mktemp("reference")
    codes, logs = run_pod(1, 8, tiny_flags(root / "run"), root / "logs")
    check_ran(codes, logs, [0])
    return root / "run"


@pytest.fixture(scope="module")
def pod(tmp_path_factory, reference):
    """2 processes x 4 devices from the reference's step 2; SIGTERM to process 1 at step 3."""
    root = tmp_path_factory.mktemp("pod")
    workdir = root / "run"
    shutil.copytree(reference / "checkpoints" / "2", workdir / "checkpoints" / "2")
    hooks = {0: SAME_BATCH, 1: {**SAME_BATCH, "sigterm_at": 3}}
    first = run_pod(2, 4, tiny_flags(workdir), root / "preempted", hooks_for=hooks)
    after_first = SimpleNamespace(
        steps=complete_steps(workdir), finished=(workdir / "results.json").exists()
    )
    second = run_pod(
        2,
        4,
        tiny_flags(workdir),
        root / "relaunch",
        hooks_for=dict.fromkeys(range(2), SAME_BATCH),
    )
    return SimpleNamespace(workdir=workdir, first=first, after_first=after_first, second=second)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, reference):
    """1 process x 8 devices: SIGKILL at a random step, SIGKILL while committing checkpoint 6,
    then a relaunch that finishes."""
    root = tmp_path_factory.mktemp("killed")
    workdir, flags = root / "run", tiny_flags(root / "run")
    kill_at = random.choice([3, 4, 5])
    runs = [run_pod(1, 8, flags, root / "sigkill", hooks_for={0: {"kill_at": kill_at}})]
    steps = [complete_steps(workdir)]
    runs.append(
        run_pod(1, 8, flags, root / "in_save", hooks_for={0: {"kill_in_save": TOTAL_STEPS}})
    )
    steps.append(complete_steps(workdir))
    leftovers = sorted(p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name)
    runs.append(run_pod(1, 8, flags, root / "finish"))
    return SimpleNamespace(
        workdir=workdir, kill_at=kill_at, runs=runs, steps=steps, leftovers=leftovers
    )


# ------------------------------------------------------------------ the simulated pod


def test_sigterm_on_one_host_saves_at_the_agreed_step_on_both(pod):
    codes, logs = pod.first
    # Preempted, checkpoint saved: the status a scheduler restarts, on every host.
    check_ran(codes, logs, [preemption.EXIT_PREEMPTED] * 2)
    agreed = [re.findall(r"checkpoint saved at step (\d+)", log) for log in logs]
    assert agreed[0] == agreed[1] and len(agreed[0]) == 1, agreed
    step = int(agreed[0][0])
    assert 3 <= step < TOTAL_STEPS
    assert pod.after_first.steps[-1] == step, pod.after_first.steps
    assert not pod.after_first.finished  # results.json must not claim the run finished
    assert "test hook: SIGTERM at step 3" in logs[1]  # only host 1 got the notice


def test_one_process_checkpoint_restores_on_the_pod_and_back(pod, reference):
    codes, logs = pod.first
    for log in logs:  # the reference's (1-process) step 2, read by both pod processes
        assert re.search(r"Resuming from \S+ step 2\b", log), log[-3000:]
    # ... and the pod's checkpoints restore here, in one process with 8 devices.
    assert read_variables(pod.workdir, TOTAL_STEPS)["params"]


def test_pod_matches_one_process_on_the_same_global_batch(pod, reference):
    codes, logs = pod.second
    check_ran(codes, logs, [0, 0])
    assert all(re.search(r"Resuming from \S+ step [3-5]\b", log) for log in logs)
    assert_trees_close(
        read_variables(pod.workdir, TOTAL_STEPS),
        read_variables(reference, TOTAL_STEPS),
        rtol=1e-5,
        atol=1e-6,
    )
    pod_results, ref_results = results(pod.workdir), results(reference)
    assert pod_results["step"] == ref_results["step"] == TOTAL_STEPS
    for key in METRICS + EVAL_METRICS:
        np.testing.assert_allclose(pod_results[key], ref_results[key], rtol=1e-4, err_msg=key)


def test_pod_eval_counts_every_example_once(pod):
    assert EVAL_EXAMPLES % EVAL_BATCH and (EVAL_EXAMPLES // 2) % (EVAL_BATCH // 2)
    assert results(pod.workdir)["num_eval_examples"] == EVAL_EXAMPLES


# ------------------------------------------------------------------ kills


def test_sigkill_at_a_random_step_then_relaunch_is_exact(killed, reference):
    codes, logs = killed.runs[0]
    check_ran(codes, logs, [-signal.SIGKILL])
    assert max(killed.steps[0], default=0) < killed.kill_at, killed.steps
    codes, logs = killed.runs[-1]
    check_ran(codes, logs, [0])
    assert results(killed.workdir)["step"] == TOTAL_STEPS
    assert_trees_close(
        read_variables(killed.workdir, TOTAL_STEPS),
        read_variables(reference, TOTAL_STEPS),
        rtol=0,
        atol=0,
    )


def test_kill_during_checkpoint_write_resumes_from_last_complete(killed):
    codes, logs = killed.runs[1]
    check_ran(codes, logs, [-signal.SIGKILL])
    assert "test hook: SIGKILL while committing" in logs[0]
    last_complete = killed.steps[1][-1]
    assert last_complete < TOTAL_STEPS, killed.steps  # the half-written step is not a step
    assert any(name.startswith(f"{TOTAL_STEPS}.") for name in killed.leftovers), killed.leftovers
    _, logs = killed.runs[2]
    assert re.search(rf"Resuming from \S+ step {last_complete}\b", logs[0]), logs[0][-3000:]
