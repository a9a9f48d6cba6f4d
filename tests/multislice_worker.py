"""Three SimCLR steps of a tiny model (16 px) on a mesh, for tests/test_multislice.py: the
loss, gradients and BatchNorm statistics of the first step and the parameters after the third,
saved by process 0 as an .npz. As one process with 8 devices and one slice it gives the 1 x 8
reference; as several processes it is a simulated multislice:

    python tests/multislice_worker.py OUT.npz NUM_PROCESSES PROCESS_ID PORT DEVICES NUM_SLICES

Each process stands for one slice of DEVICES CPU devices (gloo over a loopback coordinator,
in the 1-process reference too, so that both add partial sums in the same order);
the mesh is hybrid over process granules (parallel.create_mesh, mesh.num_slices).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES, IMAGE_SIZE, NUM_CLASSES, STEPS = 16, 16, 10, 3


def batches(steps: int = STEPS) -> list[dict[str, np.ndarray]]:
    """The global batches, the same in every process: {'image': (N, 2, H, W, 3), 'label': (N,)}."""
    out = []
    for index in range(steps):
        rng = np.random.default_rng(index)
        images = rng.random((NUM_IMAGES, 2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
        labels = rng.integers(0, NUM_CLASSES, NUM_IMAGES).astype(np.int32)
        out.append({"image": images, "label": labels})
    return out


def run_steps(mesh) -> dict[str, np.ndarray]:
    """Runs the steps on `mesh`; {name: array} of this process's (replicated) results."""
    import jax
    import jax.numpy as jnp

    from configs import smoke
    from simclr_jax import modes, optim, parallel, step
    from simclr_jax.models import create_model
    from simclr_jax.train_state import create_train_state

    config = smoke.get_config("pretrain")
    model = create_model(config.model, num_classes=NUM_CLASSES)
    tx, _ = optim.create_optimizer(
        config.optim,
        batch_size=NUM_IMAGES,
        total_steps=STEPS,
        warmup_steps=1,
        trust_ratio_excluded_modules=optim.trust_ratio_exclusions("pretrain"),
    )
    state, shardings = create_train_state(model, tx, mesh, image_size=IMAGE_SIZE, seed=0)
    # Zero-initialized last-BN scales would give each residual branch zero gradients; ones
    # make every gradient in the tree non-trivial (as tests/test_sharding.py does).
    ones = jax.jit(
        lambda params: jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.ones_like(x) if jax.tree_util.keystr(path).endswith("['scale']")
            else x,
            params,
        ),
        out_shardings=shardings.params,
    )  # fmt: skip
    state = state.replace(params=ones(state.params))
    config.model.num_classes = NUM_CLASSES
    loss_fn = modes.pretrain.loss(config, model, mesh)

    def step_fn(state, batch):  # step.make_step's body, with the gradients as an output
        def loss_of(params):
            return loss_fn(params, state.batch_stats, batch)

        (loss, (stats, _)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        new_state, _ = step.apply_update(state, tx, grads, stats)
        return new_state, loss, grads, stats

    replicated = parallel.replicated(mesh)
    jitted = jax.jit(
        step_fn,
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, replicated, replicated, replicated),
    )
    index, count = jax.process_index(), jax.process_count()
    results: dict[str, np.ndarray] = {}
    for number, batch in enumerate(batches()):
        rows = NUM_IMAGES // count  # this process's devices hold these rows of the batch
        local = {k: v[index * rows : (index + 1) * rows] for k, v in batch.items()}
        state, loss, grads, stats = jitted(state, parallel.host_batch_to_global(local, mesh))
        if number == 0:
            results["loss"] = local_copy(loss)
            results.update(flat("grads", grads))
            results.update(flat("batch_stats", stats))
    results.update(flat("params", state.params))
    results["mesh_processes"] = np.asarray([d.process_index for d in mesh.devices.flat])
    results["mesh_shape"] = np.asarray(mesh.devices.shape)
    return results


def local_copy(array) -> np.ndarray:
    """This process's copy of a replicated array (a multi-process array is not addressable
    as a whole)."""
    return np.asarray(array.addressable_data(0))


def flat(prefix: str, tree) -> dict[str, np.ndarray]:
    import jax

    return {
        f"{prefix}{jax.tree_util.keystr(path)}": local_copy(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def main() -> None:
    out, num_processes, process_id, port, devices, num_slices = sys.argv[1:]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    sys.path.insert(0, str(REPO))
    from launch import loopback

    loopback.start_loopback_socket_tuner(4 << 20)  # launch/simulate_pod.py's buffers

    import jax

    from simclr_jax import parallel

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    parallel.initialize_distributed(
        f"127.0.0.1:{port}", int(num_processes), int(process_id), timeout_seconds=120
    )
    mesh = parallel.create_mesh(num_slices=int(num_slices))
    results = run_steps(mesh)
    if jax.process_index() == 0:
        np.savez(out, **results)


if __name__ == "__main__":
    main()
