"""Metric bookkeeping at the edges: per-step metric buffers, finiteness checks, writers, JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import numpy as np
from clu import metric_writers
from etils import epath


def is_writer_process() -> bool:
    """Only process 0 writes files and summaries (every process still computes)."""
    return jax.process_index() == 0


def create_writer(workdir: str | epath.Path) -> metric_writers.MetricWriter:
    """TensorBoard event files + logging on process 0, logging only elsewhere."""
    return metric_writers.create_default_writer(
        str(workdir), just_logging=not is_writer_process(), asynchronous=True
    )


def write_json(path: str | epath.Path, payload: dict[str, Any]) -> None:
    """Writes a JSON file (process 0 only); local or gs:// paths."""
    if not is_writer_process():
        return
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(payload), indent=2, sort_keys=True) + "\n")


def to_jsonable(value: Any) -> Any:
    """NumPy/JAX scalars and arrays -> plain Python for json.dumps."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


class MetricBuffer:
    """Per-step metric dicts (device arrays) kept until the next log/checkpoint boundary.

    Holding device arrays avoids a host sync every step; `flush` fetches them once, checks
    that the loss is finite at every step and returns the means.
    """

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._metrics: list[dict[str, Any]] = []

    def add(self, step: int, metrics: dict[str, Any]) -> None:
        """Records the metrics of one step."""
        self._steps.append(step)
        self._metrics.append(metrics)

    def __len__(self) -> int:
        return len(self._steps)

    def flush(self) -> dict[str, float]:
        """Means over the buffered steps; FloatingPointError naming the first non-finite step."""
        if not self._steps:
            return {}
        host = jax.device_get(self._metrics)
        steps, self._steps, self._metrics = self._steps, [], []
        for step, metrics in zip(steps, host, strict=True):
            check_finite(metrics, step)
        return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def check_finite(metrics: dict[str, Any], step: int) -> None:
    """Raises FloatingPointError if the step's loss is NaN or infinite."""
    loss = float(np.asarray(metrics["loss"]))
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss} at step {step}: training stopped before saving a checkpoint, so the "
            "last saved checkpoint is the last good one. Lower optim.learning_rate, raise "
            "warmup, or check the data."
        )
