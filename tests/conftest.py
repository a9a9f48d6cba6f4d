"""Test set-up: 8 simulated CPU devices, so sharding and cross-replica code is exercised."""

import os

# Must happen before JAX initializes its backends; a mesh over devices[:1] gives the
# single-device reference the 8-device results are compared with.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tight numerical comparisons against NumPy need full-precision float32 matmuls.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices():
    """All 8 simulated CPU devices."""
    assert len(jax.devices()) == 8, "tests expect 8 simulated CPU devices"
    return jax.devices()
