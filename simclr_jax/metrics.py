"""Metric bookkeeping at the edges: per-step metric buffers, finiteness checks, writers, JSON.

The writers share clu's MetricWriter methods (write_scalars, write_hparams, flush, close), so
clu's TensorBoard writer joins them when wanted; clu.metric_writers itself is imported only
then, because importing it imports TensorFlow, which the TF-free path (data.backend='jax')
must not need.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath


def is_writer_process() -> bool:
    """Only process 0 writes files and summaries (every process still computes)."""
    return jax.process_index() == 0


METRICS_FILE = "metrics.jsonl"


def progress_line(step: int, total: int, images_per_sec: float, steps_per_sec: float) -> str:
    """'step 120/1000 (12.0%), 512.3 images/s, ETA 0:14:05' (ETA at the recent step rate)."""
    remaining = max(total - step, 0)
    eta = remaining / steps_per_sec if steps_per_sec > 0 else float("inf")
    eta_text = "unknown" if not math.isfinite(eta) else _hms(eta)
    percent = 100.0 * step / total if total else 100.0
    return f"step {step}/{total} ({percent:.1f}%), {images_per_sec:.1f} images/s, ETA {eta_text}"


def _hms(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def log_progress(step: int, total: int, images_per_sec: float, steps_per_sec: float) -> None:
    """Logs the progress line on process 0 (the others stay quiet, as for metrics)."""
    if is_writer_process():
        logging.info("%s", progress_line(step, total, images_per_sec, steps_per_sec))


class MetricWriter:
    """What the loop writes to: scalars per step, hyperparameters, flush and close (the part
    of clu's MetricWriter interface this project uses). The base class writes nothing."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Scalars of one step."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Hyperparameters, once."""

    def flush(self) -> None:
        """Writes out anything buffered."""

    def close(self) -> None:
        """Flushes and releases what the writer holds."""
        self.flush()


class MultiWriter(MetricWriter):
    """Writes to each of several writers (clu's writers included) in turn."""

    def __init__(self, writers: Sequence[Any]) -> None:
        self._writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """To every writer."""
        for writer in self._writers:
            writer.write_scalars(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """To every writer."""
        for writer in self._writers:
            writer.write_hparams(hparams)

    def flush(self) -> None:
        """Flushes every writer."""
        for writer in self._writers:
            writer.flush()

    def close(self) -> None:
        """Closes every writer."""
        for writer in self._writers:
            writer.close()


# Rates that the progress line already shows; clu-style step timers add "uptime".
_NOT_ON_CONSOLE = frozenset({"images_per_sec", "steps_per_sec", "uptime"})
CONSOLE_WIDTH = 200  # characters of scalars per console line, before the log prefix


def console_lines(step: int, scalars: Mapping[str, Any], width: int = CONSOLE_WIDTH) -> list[str]:
    """'step 20: loss 1.234, top1 0.5' wrapped into lines of at most `width` characters; the
    'final/' prefix every result carries becomes a 'results at step N:' heading."""
    items = {k: v for k, v in sorted(scalars.items()) if k not in _NOT_ON_CONSOLE}
    if not items:
        return []
    final = all(k.startswith("final/") for k in items)
    head = f"results at step {step}:" if final else f"step {step}:"
    lines, line = [], head
    for key, value in items.items():
        name = key.removeprefix("final/") if final else key
        number = float(np.asarray(value))
        text = f"{number:.6g}" if not number.is_integer() or abs(number) > 1e15 else f"{number:.0f}"
        item = f" {name} {text}"
        if len(line) + len(item) + 1 > width and line != head:
            lines.append(line + ",")
            line = " "
        elif line != head:
            item = "," + item
        line += item
    lines.append(line)
    return lines


class ConsoleWriter(MetricWriter):
    """Scalars as short log lines (console_lines): each interval's metrics and the results."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs the scalars, wrapped."""
        for line in console_lines(step, scalars):
            logging.info("%s", line)


def create_writer(workdir: str | epath.Path, *, tensorboard: bool = True) -> MetricWriter:
    """The console everywhere; on process 0 also workdir/metrics.jsonl and, when `tensorboard`,
    TensorBoard event files (clu's writer; TensorFlow, imported here only, so the TF-free path
    turns them off)."""
    writers: list[Any] = [ConsoleWriter()]
    if is_writer_process():
        writers.append(JsonLinesWriter(epath.Path(workdir) / METRICS_FILE))
        if tensorboard:
            from clu.metric_writers.tf.summary_writer import SummaryWriter

            writers.append(SummaryWriter(str(workdir)))
    return MultiWriter(writers)


class JsonLinesWriter(MetricWriter):
    """Scalars (and hparams) as one JSON object per line: {"step": s, "name": value, ...}.

    Needs no TensorFlow. A local file is appended to line by line. Object stores (gs://) cannot
    append: there the whole file is rewritten, at most every REWRITE_SECONDS and at flush, so
    I/O stays linear in the run's length. A resumed run keeps the lines already there. Images,
    audio, text and histograms are not written.
    """

    REWRITE_SECONDS = 30.0

    def __init__(self, path: str | epath.Path, *, rewrite: bool | None = None) -> None:
        """rewrite: whole-file rewrites instead of appends; default: for URLs (gs://...)."""
        self._path = epath.Path(path)
        self._remote = "://" in str(path) if rewrite is None else rewrite
        self._lines = (
            self._path.read_text().splitlines() if self._remote and self._path.exists() else []
        )
        self._unwritten = False
        self._last_rewrite = time.monotonic()

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(to_jsonable(record))
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if not self._remote:
            with open(self._path, "a") as f:
                f.write(line + "\n")
            return
        self._lines.append(line)
        self._unwritten = True
        if time.monotonic() - self._last_rewrite > self.REWRITE_SECONDS:
            self.flush()

    def write_scalars(self, step: int, scalars: Any) -> None:
        """One line with the step and every scalar as a float."""
        values = {str(k): float(np.asarray(v)) for k, v in sorted(scalars.items())}
        self._append({"step": int(step), **values})

    def write_hparams(self, hparams: Any) -> None:
        """One line {"hparams": {...}}."""
        self._append({"hparams": dict(hparams)})

    def write_summaries(self, step: int, values: Any, metadata: Any = None) -> None:
        """Scalar-valued summaries only."""
        scalars = {k: v for k, v in values.items() if np.ndim(v) == 0}
        if scalars:
            self.write_scalars(step, scalars)

    def write_images(self, step: int, images: Any) -> None:
        """Not written (JSON lines hold scalars)."""

    def write_videos(self, step: int, videos: Any) -> None:
        """Not written."""

    def write_audios(self, step: int, audios: Any, *, sample_rate: int) -> None:
        """Not written."""

    def write_texts(self, step: int, texts: Any) -> None:
        """Not written."""

    def write_histograms(self, step: int, arrays: Any, num_buckets: Any = None) -> None:
        """Not written."""

    def flush(self) -> None:
        """Rewrites a remote file with every line so far (local lines are already on disk)."""
        if self._unwritten:
            self._path.write_text("\n".join(self._lines) + "\n")
            self._unwritten = False
            self._last_rewrite = time.monotonic()

    def close(self) -> None:
        """Flushes; nothing is held open."""
        self.flush()


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
