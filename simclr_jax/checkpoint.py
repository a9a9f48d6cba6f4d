"""Orbax checkpoints: save and resume the train state, partial restore for eval and fine-tuning.

Layout: <workdir>/checkpoints/<step>/{state, meta}. 'state' is TrainState.to_tree() (step,
params, batch_stats, opt_state); 'meta' is JSON: the config, the step and the data position.
Orbax writes each step into a temporary directory and renames it when complete (a commit
marker on GCS), so an interrupted save never becomes the latest step.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

CHECKPOINT_SUBDIR = "checkpoints"
STATE_ITEM = "state"
META_ITEM = "meta"
ITEM_NAMES = (STATE_ITEM, META_ITEM)
MAX_LISTED = 12


def checkpoint_dir(path: str | epath.Path) -> epath.Path:
    """A workdir (or its checkpoints/ directory itself) -> the checkpoints directory."""
    path = epath.Path(path)
    if path.name != CHECKPOINT_SUBDIR and (path / CHECKPOINT_SUBDIR).exists():
        return path / CHECKPOINT_SUBDIR
    if path.name == CHECKPOINT_SUBDIR:
        return path
    return path / CHECKPOINT_SUBDIR


def create_manager(
    workdir: str | epath.Path, *, keep: int, use_async: bool = True
) -> ocp.CheckpointManager:
    """Manager writing <workdir>/checkpoints, keeping the newest `keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=use_async
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_handlers=_item_handlers()
    )


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """Explicit handlers, so read-only managers can read metadata before any restore."""
    return {STATE_ITEM: ocp.PyTreeCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()}


def open_for_restore(
    path: str | epath.Path, step: int = -1, field: str = "config.init_checkpoint"
) -> tuple[ocp.CheckpointManager, int]:
    """Read-only manager on a workdir's checkpoints and the step to read (-1: latest).

    Raises FileNotFoundError saying what is missing and what to pass instead, naming the
    config field the path came from (`field`, and `field`_step for the step).
    """
    if not str(path):
        raise FileNotFoundError(f"{field} is empty; pass --{field}=<training workdir>.")
    directory = checkpoint_dir(path)
    if not directory.exists():
        raise FileNotFoundError(
            f"checkpoint directory {directory} does not exist; {field} must be a "
            f"training workdir (holding {CHECKPOINT_SUBDIR}/<step>/) or that {CHECKPOINT_SUBDIR}/ "
            "directory itself."
        )
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(
            f"checkpoint directory {directory} holds no complete checkpoint (unfinished saves "
            f"are ignored); point {field} at a workdir whose training saved one."
        )
    if step == -1:
        return manager, max(steps)
    if step not in steps:
        raise FileNotFoundError(
            f"{field}_step={step} is not in {directory}; available steps: "
            f"{sorted(steps)} (or -1 for the latest)."
        )
    return manager, step


def save(
    manager: ocp.CheckpointManager, step: int, state_tree: Mapping[str, Any], meta: dict
) -> bool:
    """Saves the state and JSON metadata at `step` (async); False if that step already exists."""
    if step in manager.all_steps():
        return False
    args = ocp.args.Composite(
        **{STATE_ITEM: ocp.args.PyTreeSave(dict(state_tree)), META_ITEM: ocp.args.JsonSave(meta)}
    )
    return bool(manager.save(step, args=args, force=True))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The JSON metadata (config, step, data position) saved with `step`."""
    restored = manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
    return dict(restored[META_ITEM])


def saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]]:
    """'params/encoder/stem/...' -> shape of every array in the saved state (no data read)."""
    metadata = manager.item_metadata(step)[STATE_ITEM]
    tree = getattr(metadata, "tree", metadata)
    flat = traverse_util.flatten_dict(_as_nested_dict(tree), sep="/")
    return {key: tuple(value.shape) for key, value in flat.items() if hasattr(value, "shape")}


def _as_nested_dict(tree: Any) -> Any:
    """Lists/tuples in checkpoint metadata -> dicts keyed '0', '1', ... (orbax's own naming)."""
    if isinstance(tree, Mapping):
        return {str(k): _as_nested_dict(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
        return {str(i): _as_nested_dict(v) for i, v in enumerate(tree)}
    return tree


def flat_shapes(tree: Any, prefix: str) -> dict[str, tuple[int, ...]]:
    """'prefix/a/b' -> shape for every leaf of a nested dict of arrays or ShapeDtypeStructs."""
    flat = traverse_util.flatten_dict(_as_nested_dict(tree), sep="/")
    return {
        f"{prefix}/{key}": tuple(value.shape if hasattr(value, "shape") else np.shape(value))
        for key, value in flat.items()
    }


TOP_ORDER = ("params", "batch_stats", "encoder", "projection_head", "classifier", "stem")


def model_order(key: str) -> list[tuple[int, int, str]]:
    """Sort key putting parameter paths in network order: params first, stem before stage1,
    block2 before block10; so an error's first lines name the first layer that differs."""
    order = []
    for part in key.split("/"):
        if part in TOP_ORDER:
            order.append((0, TOP_ORDER.index(part), part))
            continue
        match = re.fullmatch(r"(\D*?)(\d+)", part)
        order.append((1, int(match.group(2)), match.group(1)) if match else (1, -1, part))
    return order


def compare_shapes(
    expected: Mapping[str, tuple[int, ...]],
    saved: Mapping[str, tuple[int, ...]],
    *,
    select: Callable[[str], bool] = lambda key: True,
    where: str = "the checkpoint",
) -> None:
    """Raises ValueError naming every selected parameter whose shape or presence differs."""
    problems = []
    for key in sorted((k for k in expected if select(k)), key=model_order):
        if key not in saved:
            problems.append(f"  {key}: model {expected[key]}, missing in {where}")
        elif tuple(saved[key]) != tuple(expected[key]):
            problems.append(f"  {key}: model {expected[key]} vs checkpoint {saved[key]}")
    for key in sorted((k for k in saved if select(k) and k not in expected), key=model_order):
        problems.append(f"  {key}: checkpoint {saved[key]}, not in the model")
    if problems:
        listed = "\n".join(problems[:MAX_LISTED])
        more = (
            f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        )
        raise ValueError(
            f"{where} does not match the model architecture ({len(problems)} parameter(s)):\n"
            f"{listed}{more}\nSet model.resnet_depth / width_multiplier / sk_ratio / "
            "num_proj_layers / proj_out_dim to the values the checkpoint was trained with "
            "(they are in its config.json)."
        )


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each array's sharding, the restore target orbax wants."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def restore_state(
    manager: ocp.CheckpointManager, step: int, target_tree: Mapping[str, Any]
) -> dict[str, Any]:
    """Restores the full state of `step` into the structure, dtypes and shardings of target_tree."""
    expected = {}
    for name in ("params", "batch_stats"):
        expected.update(flat_shapes(target_tree[name], name))
    saved = saved_shapes(manager, step)
    compare_shapes(
        expected,
        saved,
        select=lambda k: k.startswith(("params/", "batch_stats/")),
        where=f"checkpoint {manager.directory}/{step}",
    )
    abstract = _abstract(dict(target_tree))
    args = ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
    )
    return dict(manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: args}))[STATE_ITEM])


def _prefix_selector(prefixes: tuple[str, ...]) -> Callable[[str], bool]:
    """True for 'params/<prefix>/...' and 'batch_stats/<prefix>/...' keys."""

    def selected(key: str) -> bool:
        _, _, rest = key.partition("/")
        return any(rest == p or rest.startswith(p + "/") for p in prefixes)

    return selected


def check_compatible(
    manager: ocp.CheckpointManager,
    step: int,
    target: Mapping[str, Any],
    prefixes: tuple[str, ...],
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Compares the target variables (arrays or ShapeDtypeStructs) under `prefixes` with the
    checkpoint's shapes, reading metadata only; ValueError naming each mismatched path.
    Returns (expected, saved) flat shape maps."""
    expected = {}
    for name in ("params", "batch_stats"):
        expected.update(flat_shapes(target.get(name, {}), name))
    saved = {
        k: v
        for k, v in saved_shapes(manager, step).items()
        if k.startswith(("params/", "batch_stats/"))
    }
    compare_shapes(
        expected,
        saved,
        select=_prefix_selector(prefixes),
        where=f"checkpoint {manager.directory}/{step}",
    )
    return expected, saved


def restore_variables(
    manager: ocp.CheckpointManager,
    step: int,
    target: Mapping[str, Any],
    prefixes: tuple[str, ...],
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Overwrites the parts of target {'params', 'batch_stats'} under `prefixes` (e.g.
    'encoder', 'projection_head/layer1') with the checkpoint's values.

    Shapes are checked first (ValueError naming each mismatched path with both shapes). Returns
    the merged variables and a report {'loaded', 'initialized', 'skipped'} of parameter paths.
    """

    selected = _prefix_selector(prefixes)
    expected, saved = check_compatible(manager, step, target, prefixes)
    partial = {}
    for name in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(dict(target.get(name, {})), sep="/")
        keep = {k: v for k, v in flat.items() if selected(f"{name}/{k}")}
        if keep:
            partial[name] = traverse_util.unflatten_dict(keep, sep="/")
    restored = {}
    if partial:
        abstract = _abstract(partial)
        args = ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: args}))[STATE_ITEM]
    merged = {}
    for name in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(dict(target.get(name, {})), sep="/")
        flat.update(traverse_util.flatten_dict(dict(restored.get(name, {})), sep="/"))
        merged[name] = traverse_util.unflatten_dict(flat, sep="/") if flat else {}
    report = {
        "loaded": sorted(k for k in expected if selected(k)),
        "initialized": sorted(k for k in expected if not selected(k)),
        "skipped": sorted(k for k in saved if not selected(k)),
    }
    log_restore_report(report, f"{manager.directory}/{step}")
    return merged, report


def log_restore_report(report: Mapping[str, list[str]], source: str) -> None:
    """Logs which parameters came from the checkpoint, which were initialized, which skipped."""

    def summary(keys: list[str]) -> str:
        # The modules (encoder, projection_head, ...) keep the line short on a console.
        groups = sorted({k.split("/")[1] if "/" in k else k for k in keys})
        return f"{len(keys)} ({', '.join(groups)})" if groups else "0"

    logging.info(
        "Restored from %s: loaded %s; initialized %s; skipped %s from the checkpoint.",
        source,
        summary(report["loaded"]),
        summary(report["initialized"]),
        summary(report["skipped"]),
    )
