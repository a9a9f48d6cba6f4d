"""What several test files share: the shared test data's paths, tiny configs, restoring a
checkpoint's variables, abstract variables of a model, tree and NumPy comparisons, and the
preflight's command line as a user runs it.

The shared test data sits beside the repository (../shared/data; each part has a README
there). A test that needs a part of it skips on a user's machine without it, and fails under
CI, which must run it (`.ci/run` sets CI=1).
"""

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import smoke
from simclr_jax import checkpoint, evaluate, parallel
from simclr_jax.config import get_base_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_TARBALL = SHARED_DATA / "cifar10-train-jpeg.tar.gz"  # train/<class>/<n>.jpg
OFFICIAL_CHECKPOINTS = SHARED_DATA / "official-checkpoints"  # with the reference's outputs
IMAGENET_SUBSETS = SHARED_DATA / "imagenet-subsets"  # the published 1% / 10% lists

IMAGE_SIZE = 16
# rbg keys: the threefry initializers take several times longer to compile on CPU.
INIT_KEY = jax.random.key(0, impl="rbg")


def require(path: Path, what: str) -> Path:
    """path, if it exists; else skips the test (fails it under CI) naming what is missing."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide {what} at {path}")
        pytest.skip(f"{what} not found at {path} (the shared test data is not present)")
    return path


def tiny_config(mode="pretrain", **overrides):
    """Smoke config shrunk for tests: 16 px, batch 16, a few steps, deterministic data;
    overrides are flattened names ('data.train_split')."""
    config = smoke.get_config(mode)
    config.data.image_size = IMAGE_SIZE
    config.train_batch_size = 16
    config.eval_batch_size = 200
    config.train_steps = 4
    config.warmup_steps = 1
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.knn_eval = False
    config.knn_k = 20
    config.update_from_flattened_dict(overrides)
    return config


def model_config(base=None, **overrides):
    """A copy of `base` (a model config), by default the schema's shrunk to ResNet-18 with the
    CIFAR stem and a 2-layer head of width 16, plus overrides."""
    if base is None:
        config = get_base_config().model
        config.resnet_depth = 18
        config.cifar_stem = True
        config.num_proj_layers = 2
        config.proj_out_dim = 16
    else:
        config = ml_collections.ConfigDict(base.to_dict())
    config.update(overrides)
    return config


def abstract_variables(model, image_size, **init_kwargs):
    """Variable shapes of model on a (2, image_size, image_size, 3) batch, without computing."""
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, **init_kwargs), INIT_KEY, images)


def read_variables(workdir, step=-1):
    """Params and batch stats of a workdir's checkpoint (latest: -1) as NumPy trees, restored
    in this process."""
    manager, step = checkpoint.open_for_restore(str(workdir), step)
    saved = ml_collections.ConfigDict(checkpoint.read_meta(manager, step)["config"])
    _, variables = evaluate.restore_model(manager, step, saved, parallel.create_mesh())
    manager.close()
    return jax.device_get(variables)


def assert_trees_close(a, b, rtol, atol=0.0):
    """Same structure, every leaf close."""
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def np_softmax(x, axis=-1):
    """Softmax in NumPy (the reference the JAX code is compared with)."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def require_libtpu() -> None:
    """Skips without libtpu on a user's machine; fails under CI, which installs it (lock)."""
    if importlib.util.find_spec("libtpu") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install libtpu (requirements/lock.txt, the `test` extra)")
        pytest.skip("libtpu is not installed (pip install 'libtpu==0.0.42.1')")


def preflight_env() -> dict[str, str]:
    """The test process's environment minus what is only meant for the CPU tests (the
    simulated devices, JAX_PLATFORMS)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def preflight(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `python -m simclr_jax.preflight ARGS` (configs relative to the repository)."""
    args = [a.replace("configs/", f"{REPO}/configs/", 1) if a.startswith("--config=configs/")
            else a for a in args]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "simclr_jax.preflight", *args], cwd=cwd, env=preflight_env(),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
