"""Test set-up: 8 simulated CPU devices, so sharding and cross-replica code is exercised."""

import os
import shutil
import signal
import tempfile

from pod_worker import COLLECTIVE_WAIT_LIMIT_FLAG

# Must happen before JAX initializes its backends; a mesh over devices[:1] gives the
# single-device reference the 8-device results are compared with. XLA:CPU aborts a process
# whose devices wait at a collective past a limit: 300 s, far above any lag of 8 simulated
# devices on 2 busy cores, so that a deadlock (models/conv.py says which one we had) fails
# in minutes, with XLA's message naming the collective, rather than at CI's time limit.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + f" {COLLECTIVE_WAIT_LIMIT_FLAG}"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# libtpu (the test extra: the preflight compiles for TPU topologies) would otherwise make every
# process try to open a TPU, print warnings and take /tmp/libtpu_lockfile; the tests run on
# CPU devices, and the preflight reaches libtpu through its topology API all the same.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run: every train_and_evaluate builds a new
# step function, so tests compile the same programs again and again. The first process to
# import this file (pytest's controller, before xdist starts its workers, which inherit the
# variable) makes the directory and removes it at the end; the runs tests start share it too.
# A cached executable is the one XLA would compile, so bit-for-bit comparisons are unaffected.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="simclr_jax_test_jit_")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tight numerical comparisons against NumPy need full-precision float32 matmuls.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices():
    """All 8 simulated CPU devices."""
    assert len(jax.devices()) == 8, "tests expect 8 simulated CPU devices"
    return jax.devices()


@pytest.fixture(scope="session")
def tiny_pretrain_workdir(tmp_path_factory):
    """Two pretraining steps of the smoke model at 16 px on slices of the bundled sample, with
    one in-training eval so metrics.jsonl has eval/* lines too."""
    workdir = tmp_path_factory.mktemp("pretrain")
    from configs import smoke
    from simclr_jax import dispatch

    config = smoke.get_config("pretrain")
    config.update_from_flattened_dict(
        {
            "data.image_size": 16,
            "data.train_split": "train[:50]",  # 500 images, 50 per class
            "data.eval_split": "test[:10]",  # 100 images
            "data.shuffle_buffer": 500,
            "train_batch_size": 16,
            "eval_batch_size": 64,
            "train_steps": 2,
            "warmup_steps": 1,
            "log_every_steps": 1,
            "checkpoint_every_steps": 2,
            "eval_every_steps": 2,
            "knn_eval": False,
        }
    )
    dispatch.train_and_evaluate(config, str(workdir))
    return workdir


# A suite started in the background of a shell without job control (`pytest ... &`) inherits
# SIGINT ignored, and so would every process a test starts; the tests that press Ctrl-C need
# Python's own handler back (an exec then resets it to the default, as in a terminal).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# Markers that say why a test is slow; each implies `slow`, so `-m "not slow"` leaves them out.
SLOW_REASONS = ("tpu_compile", "multiprocess", "end_to_end", "alone")
# tests/run.sh runs the suite in two phases: SIMCLR_TEST_PHASE=shared (every test but those
# marked `alone`, in parallel), then =alone (those, one at a time, beside nothing else).
TEST_PHASE = os.environ.get("SIMCLR_TEST_PHASE", "")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW_REASONS):
            item.add_marker(pytest.mark.slow)
    if TEST_PHASE:
        keep = [i for i in items if bool(i.get_closest_marker("alone")) == (TEST_PHASE == "alone")]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
