"""Grain train input for data.backend='jax' (no TensorFlow): decode and random resized crop
on the host (a NumPy port of tf.image.sample_distorted_bounding_box), the rest of each view on
the device (jax_augment.py). Sharding and order follow pipeline.py; each example carries a
global id (position * P + p) from which its crops and device draws derive. Crops are float32,
neither clipped nor rounded, since the reference clips only after the colour jitter.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import numpy as np

from simclr_jax.data import common, numpy_pipeline, sources
from simclr_jax.data.spec import (
    ASPECT_RATIO_RANGE,
    MAX_CROP_ATTEMPTS,
    MIN_OBJECT_COVERED,
    AugmentParams,
    augment_params,
)

_CROP_SALT = 0xC20F


# ---------------------------------------------------------------- crop sampler (NumPy)


def _uniform_int(uniform: np.ndarray, count: np.ndarray) -> np.ndarray:
    return np.minimum(np.floor(uniform * count), count - 1.0)


def crop_window_from_uniforms(
    uniforms: np.ndarray,
    height: int,
    width: int,
    *,
    min_area: float = 0.08,
    aspect_ratio_range: tuple[float, float] = ASPECT_RATIO_RANGE,
    min_object_covered: float = MIN_OBJECT_COVERED,
) -> tuple[int, int, int, int]:
    """(y, x, h, w) of TF's sample_distorted_bounding_box from (4, attempts) U[0, 1) draws
    (ratio, height, y, x per attempt): the first valid attempt, else the whole image."""
    u = np.asarray(uniforms, np.float64)
    image_area = float(height * width)
    min_px, max_px = min_area * image_area, image_area
    low, high = aspect_ratio_range
    ratio = low + u[0] * (high - low)
    shortest = np.round(np.sqrt(min_px / ratio))
    tallest = np.round(np.sqrt(max_px / ratio))
    fitting = np.floor((width + 0.5 - 1e-7) / ratio)  # TF's kEps fix-up, then one more step
    fitting = np.where(np.round(fitting * ratio) > width, fitting - 1.0, fitting)
    tallest = np.minimum(np.where(np.round(tallest * ratio) > width, fitting, tallest), height)
    shortest = np.minimum(shortest, tallest)
    h = shortest + _uniform_int(u[1], np.maximum(tallest - shortest + 1.0, 1.0))
    w = np.round(h * ratio)
    too_small = w * h < min_px  # TF's rounding repairs: one step up, then one step down
    h = np.where(too_small, h + 1.0, h)
    w = np.where(too_small, np.round(h * ratio), w)
    too_big = w * h > max_px
    h = np.where(too_big, h - 1.0, h)
    w = np.where(too_big, np.round(h * ratio), w)
    area = w * h
    valid = (area >= min_px) & (area <= max_px) & (h >= 1) & (w >= 1)
    valid &= (h <= height) & (w <= width) & (area / image_area >= min_object_covered)
    if not valid.any():
        return 0, 0, height, width
    i = int(np.argmax(valid))
    y = _uniform_int(u[2, i], max(height - h[i], 1.0)) if h[i] < height else 0.0
    x = _uniform_int(u[3, i], max(width - w[i], 1.0)) if w[i] < width else 0.0
    return int(y), int(x), int(h[i]), int(w[i])


def crop_resize(image: np.ndarray, window: tuple[int, int, int, int], size: int) -> np.ndarray:
    """float32 (size, size, 3) bicubic resize of the window, not clipped (tf.image.resize of
    the crop, as augment.crop_resize)."""
    y, x, h, w = window
    crop = numpy_pipeline.to_unit_float(image[y : y + h, x : x + w])
    return numpy_pipeline.resize_bicubic(crop, size, size)


def view_uniforms(seed: int, example_id: int, view: int) -> np.ndarray:
    """(4, MAX_CROP_ATTEMPTS) crop draws of one view, from (seed, example id, view)."""
    key = np.random.SeedSequence([seed & 0xFFFFFFFF, _CROP_SALT, int(example_id), view])
    return np.random.default_rng(key).random((4, MAX_CROP_ATTEMPTS))


# ---------------------------------------------------------------- examples


class HostViews:
    """Shard position -> {'image': float32 (V, S, S, 3) crops, 'label', 'id'}; picklable, so
    Grain can run it in worker processes."""

    def __init__(
        self,
        source: sources.Source,
        shard: np.ndarray,
        *,
        seed: int,
        process_index: int,
        process_count: int,
        num_views: int,
        params: AugmentParams,
        skip_corrupt: bool,
    ) -> None:
        self.reader = numpy_pipeline.Reader(source, skip_corrupt)
        self.shard, self.seed = shard, seed
        self.process_index, self.process_count = process_index, process_count
        self.num_views, self.params = num_views, params
        self._orders: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Permutation of shard positions for one epoch, seeded by (seed, process, epoch)."""
        order = self._orders.get(epoch)
        if order is None:
            seed = np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.process_index, epoch])
            order = np.random.default_rng(seed).permutation(len(self.shard))
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = order
        return order

    def _decoded(self, position: int) -> tuple[np.ndarray, int]:
        n = len(self.shard)
        epoch, offset = divmod(position, n)
        order = self.epoch_order(epoch)
        for step in range(n):
            image, label = self.reader.example(int(self.shard[order[(offset + step) % n]]))
            if image is not None:
                return image, label
        raise ValueError(f"every image of {self.reader.source.description} is corrupt.")

    def __call__(self, position: int) -> dict[str, Any]:
        image, label = self._decoded(int(position))
        example_id = (int(position) * self.process_count + self.process_index) % 2**32
        views = []
        for v in range(self.num_views):
            window = crop_window_from_uniforms(
                view_uniforms(self.seed, example_id, v),
                image.shape[0],
                image.shape[1],
                min_area=self.params.crop_min_area,
            )
            views.append(crop_resize(image, window, self.params.image_size))
        return {
            "image": np.stack(views),
            "label": np.int32(label),
            "id": np.uint32(example_id),
        }


# ---------------------------------------------------------------- iterator


_EPOCHS_AHEAD = 1 << 20  # Grain map datasets are finite: this many epochs is "forever"


class GrainTrainIterator:
    """This process's train batches from a Grain pipeline, with a JSON state that restores the
    exact position (batches already prefetched are recomputed, not lost)."""

    def __init__(
        self, views: HostViews, *, local_batch: int, workers: int, threads: int, start_step: int
    ) -> None:
        self.views, self.local_batch = views, local_batch
        self.workers, self.threads = workers, threads
        self._iterator = self._make(start_step)  # sets self._origin

    @property
    def skipped_files(self) -> list[str]:
        """Corrupt files skipped so far in this process (workers log their own)."""
        return self.views.reader.skipped.names

    def _make(self, origin: int):
        import grain
        from absl import flags

        # Grain reads its absl flags; outside an absl app (tests, notebooks) take the defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()

        total = len(self.views.shard) * _EPOCHS_AHEAD
        ds = grain.MapDataset.range(origin * self.local_batch, total).map(self.views)
        ds = ds.batch(self.local_batch, drop_remainder=True)
        read = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=2)
        it_ds = ds.to_iter_dataset(read)
        if self.workers > 0:
            it_ds = it_ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.workers),
                worker_init_fn=_die_with_parent,
            )
        self._origin = origin
        return iter(it_ds)

    def __iter__(self) -> GrainTrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._iterator)
        except ValueError:
            raise
        except Exception as error:  # e.g. a worker process that died
            raise RuntimeError(
                f"the Grain input pipeline failed ({type(error).__name__}: {error}); the last "
                "checkpoint is intact: rerun the same command to resume from it (or set "
                "data.grain_workers=0 to decode in this process)."
            ) from error
        return {k: np.asarray(v) for k, v in batch.items()}

    def _layout(self) -> dict[str, int]:
        return {
            "workers": self.workers,
            "process_count": self.views.process_count,
            "local_batch": self.local_batch,
        }

    def get_state(self) -> dict[str, Any]:
        """JSON state: the batch the pipeline started at, Grain's own iterator state, and the
        layout (worker and process counts, batch) that state is valid for."""
        return {"origin": self._origin, "grain": self._iterator.get_state(), **self._layout()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a get_state() result: the stream continues with the same next batch. A
        state saved with another layout is ignored (logged): the iterator stays where
        start_step put it, which is the same batch, since batch k depends only on (seed, k)."""
        saved = {key: state.get(key) for key in self._layout()}
        if saved != self._layout():
            logging.warning(
                "Grain state saved with %s, running with %s: starting from the step instead.",
                saved,
                self._layout(),
            )
            return
        self.close()
        self._iterator = self._make(int(state["origin"]))
        self._iterator.set_state(state["grain"])

    def close(self) -> None:
        """Stops Grain's worker threads/processes."""
        getattr(self._iterator, "close", lambda: None)()


def _die_with_parent(worker_index: int, worker_count: int) -> None:
    """Grain worker start-up: on Linux, ask the kernel to SIGKILL this worker when the training
    process dies (a SIGKILLed trainer otherwise leaves its workers running as orphans)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the call: follow it now
            os._exit(1)


def make_train_iterator(
    data_config: Any,
    *,
    split: str,
    batch_size: int,
    seed: int,
    num_views: int = 1,
    start_step: int = 0,
    supervised: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> GrainTrainIterator:
    """This process's host batches of float32 crops (V views) with global ids (batch_size is
    GLOBAL); flip, colour and blur are applied on the device (data.backends)."""
    index, count = common.resolve_process(process_index, process_count)
    local_batch = common.per_process_batch(batch_size, count)
    workers = data_config.get("grain_workers", 0)
    if workers < 0:
        raise ValueError(f"data.grain_workers={workers!r} must be >= 0 (0: threads only).")
    source = sources.get_source(
        data_config, split, supervised=supervised, field="split", use_label_subset=True
    )
    views = HostViews(
        source,
        common.train_shard(source, index, count),
        seed=seed,
        process_index=index,
        process_count=count,
        num_views=num_views,
        params=augment_params(data_config),
        skip_corrupt=data_config.get("skip_corrupt", True),
    )
    threads = data_config.get("grain_threads", 0) or numpy_pipeline.default_threads()
    return GrainTrainIterator(
        views, local_batch=local_batch, workers=workers, threads=threads, start_step=start_step
    )
