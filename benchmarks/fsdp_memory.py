"""Per-device memory of the pretraining step, replicated vs FSDP, from XLA's compiled analysis.

Nothing is allocated: the state and batch are jax.ShapeDtypeStructs carrying their shardings,
and the real pretraining step (step.make_step with modes.pretrain's loss) is lowered and
compiled for an 8-device simulated mesh.

    PYTHONPATH=. python benchmarks/fsdp_memory.py                      # R152-3x-SK, 2 img/device
    PYTHONPATH=. python benchmarks/fsdp_memory.py --model r50_1x --per_device_batch 4
"""

from __future__ import annotations

import os

# 8 simulated devices, set before JAX starts (the mesh the numbers below are per device of).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import imagenet_pretrain  # noqa: E402
from simclr_jax import loop, modes, parallel  # noqa: E402
from simclr_jax.models import create_model  # noqa: E402
from simclr_jax.step import make_step  # noqa: E402
from simclr_jax.train_state import TrainState  # noqa: E402

GIB = 2**30


def abstract_state(config, model, tx):
    """The train state's shapes and dtypes (jax.eval_shape: no parameter is allocated)."""
    size = int(config.data.image_size)

    def init(rng):
        variables = model.init(rng, jnp.zeros((2, size, size, 3)), train=False)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(variables["params"]),
        )

    return jax.eval_shape(init, jax.random.key(0))


def with_shardings(tree, shardings):
    """ShapeDtypeStructs that carry the shardings the step will see."""
    return jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, shardings
    )


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` under `shardings` (largest shard per array)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shard = sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


def analyse(config, fsdp_min_size: int) -> dict[str, float]:
    """Compiles the pretraining step once; returns its per-device memory and FLOPs."""
    mesh = parallel.create_mesh()
    num_classes = int(config.model.num_classes)
    model = create_model(config.model, num_classes=num_classes, mode="pretrain")
    tx, schedule = loop.create_optimizer(config, loop.Durations(1000, 10, 1.0))
    state = abstract_state(config, model, tx)
    shardings = parallel.state_shardings(state, mesh, fsdp_min_size)
    step = make_step(
        modes.get(config.mode).loss(config, model, mesh), tx, schedule, mesh, shardings
    )
    size, batch = int(config.data.image_size), int(config.train_batch_size)
    data = parallel.batch_sharding(mesh)
    batch_spec = {
        "image": jax.ShapeDtypeStruct((batch, 2, size, size, 3), jnp.float32, sharding=data),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data),
    }
    started = time.perf_counter()
    compiled = step.lower(with_shardings(state, shardings), batch_spec).compile()
    compile_s = time.perf_counter() - started
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return {
        "params_m": params / 1e6,
        "state_gib": shard_bytes(state, shardings) / GIB,
        "param_gib": shard_bytes(state.params, shardings.params) / GIB,
        "args_gib": memory.argument_size_in_bytes / GIB,
        "temp_gib": memory.temp_size_in_bytes / GIB,
        "out_gib": memory.output_size_in_bytes / GIB,
        "alias_gib": memory.alias_size_in_bytes / GIB,
        "gflop": float(cost.get("flops", float("nan"))) / 1e9,
        "compile_s": compile_s,
    }


def main() -> None:
    """Prints one row per sharding mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="r152_3x_sk", help="imagenet_pretrain.py model token")
    parser.add_argument("--per_device_batch", type=int, default=2, help="images per device")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--fsdp_min_size", type=int, default=2**16, help="elements")
    args = parser.parse_args()
    config = imagenet_pretrain.get_config(args.model)
    config.model.num_classes = 1000
    config.data.image_size = args.image_size
    config.train_batch_size = args.per_device_batch * jax.device_count()
    print(
        f"{args.model} at {args.image_size} px, global batch {config.train_batch_size} "
        f"({args.per_device_batch} per device) on {jax.device_count()} devices; GiB per device"
    )
    print(
        "| sharding | params (M) | state (params+opt) | params | arguments | temporaries "
        "| outputs (aliased) | GFLOP/step (per device) | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, min_size in (
        ("replicated", 0),
        (f"FSDP (>= {args.fsdp_min_size})", args.fsdp_min_size),
    ):
        r = analyse(config, min_size)
        print(
            f"| {name} | {r['params_m']:.1f} | {r['state_gib']:.2f} | {r['param_gib']:.2f} "
            f"| {r['args_gib']:.2f} | {r['temp_gib']:.2f} "
            f"| {r['out_gib']:.2f} ({r['alias_gib']:.2f}) "
            f"| {r['gflop']:.1f} | {r['compile_s']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
