"""TF-free input pipeline (data.backend='jax'): Pillow decoding and NumPy batching on the host,
augmentation on the device (data.backends / jax_augment.py).

Sources: the bundled sample and image folders (the same IndexedSource listings, split syntax
and label rules as tf.data, from sources.py), and NumPy arrays (data.source='numpy'). Images are
read lazily, one batch at a time: a folder is never held in memory.

Same contract as the tf.data path (pipeline.py):
- Sharding: process p of P trains on shard_indices(n, p, P) (disjoint, together everything).
- Order: within its shard a process walks epoch after epoch, each in a permutation seeded by
  (seed, process index, epoch); batch k is shard positions [k*b, (k+1)*b). So batch k depends
  only on (seed, k) for a fixed number of processes, whatever data.deterministic says (decoding
  is parallel, but batches are assembled in order), and start_step=k decodes nothing before it.
- Each example carries a global id, position * P + p (uint32, wrapping after 4e9 examples),
  from which the device derives its augmentation keys: views do not depend on device count.
- Eval: each process takes a contiguous block (np.array_split), applies the eval transform on
  the host and pads with mask-0 rows so every process yields the same number of full batches.
- Corrupt files: skipped and named in `skipped_files` (skip_corrupt=False: ValueError naming
  the file). In training the next example of the epoch order takes a skipped one's place, which
  keeps batch k a function of (seed, k); in eval its row is masked out.

Train batches are {'image': uint8 (b, H, W, 3), 'label': int32 (b,), 'id': uint32 (b,)}.
(H, W) is the source's own size when it has one (arrays, the bundled sample's 32 x 32), else
(image_size, image_size): folder images of another size are resized on the host (bicubic,
whole image) because a batch needs one shape; the random crop then runs on the device.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from simclr_jax.data import common, sources

EVAL_CROP_PROPORTION = 0.875
_PREFETCH_BATCHES = 2


# ---------------------------------------------------------------- host image ops


def _keys_cubic(t: np.ndarray) -> np.ndarray:
    """Keys cubic kernel, a = -0.5 (tf.image.resize 'bicubic')."""
    a, t = -0.5, np.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of tf.image.resize bicubic: half-pixel centres, no antialiasing,
    taps outside the image dropped and renormalized (Pillow antialiases, so it differs)."""
    centers = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    weights = _keys_cubic(centers[:, None] - np.arange(in_size)[None, :])
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (height, width, 3) bicubic resize of a [0, 1] image, not clipped."""
    image = image.astype(np.float32)
    if image.shape[:2] == (height, width):
        return image
    rows, cols = _resize_matrix(image.shape[0], height), _resize_matrix(image.shape[1], width)
    return np.einsum("ij,jkc,lk->ilc", rows, image, cols, optimize=True)


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return image.astype(np.float32) * np.float32(1.0 / 255.0)


def fit_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A uint8 image resized (whole, bicubic, clipped) to (height, width); unchanged if it
    already has that size. Rounds like tf.image.convert_image_dtype(saturate=True)."""
    if image.shape[:2] == (height, width):
        return image
    resized = resize_bicubic(to_unit_float(image), height, width)
    return np.clip(resized * 255.5, 0, 255).astype(np.uint8)


def eval_transform(image: np.ndarray, image_size: int) -> np.ndarray:
    """augment.eval_transform in NumPy: centre crop keeping 0.875 of the shorter side (none
    for images of 32 px or less), bicubic resize, clip; float32 [0, 1]."""
    h, w = image.shape[:2]
    if h > 32 or w > 32:
        side = int(np.round(EVAL_CROP_PROPORTION * min(h, w)))
        top, left = (h - side + 1) // 2, (w - side + 1) // 2
        image = image[top : top + side, left : left + side]
    resized = resize_bicubic(to_unit_float(image), image_size, image_size)
    return np.clip(resized, 0.0, 1.0)


# ---------------------------------------------------------------- reading examples


class Reader:
    """Example index -> (uint8 (H, W, 3) image or None when skipped, label), thread-safe."""

    def __init__(self, source: sources.Source, skip_corrupt: bool) -> None:
        if isinstance(source, sources.TfdsSource):
            raise ValueError(
                "data.backend='jax' cannot read TFDS sources; use data.backend='tfdata'."
            )
        self.source = source
        self.skip_corrupt = skip_corrupt
        self.skipped = common.SkippedFiles()

    @property
    def labels(self) -> np.ndarray:
        """int32 label per example."""
        return self.source.labels

    def image(self, index: int) -> np.ndarray | None:
        """The decoded image, or None for a corrupt file that is skipped."""
        source = self.source
        if isinstance(source, sources.ArraySource):
            return np.asarray(source.images[source.rows[index]])  # reads one row of a memmap
        record = source.records[index]
        name = str(record) if source.records_are_paths else f"{source.description}#{index}"
        try:
            contents = epath.Path(record).read_bytes() if source.records_are_paths else record
            return common.pil_to_rgb_uint8(contents)
        except Exception as error:  # Pillow raises many types for bad files
            if not self.skip_corrupt:
                raise ValueError(
                    f"{common.CORRUPT_MARK} {name}: {error}. Delete or replace the file, or set "
                    "data.skip_corrupt=True to skip it."
                ) from None
            self.skipped.add(name, error)
            return None

    def host_shape(self, image_size: int) -> tuple[int, int]:
        """The (H, W) train batches have: the source's own when all examples share one."""
        source = self.source
        if isinstance(source, sources.ArraySource):
            return tuple(source.images.shape[1:3])
        if not source.records_are_paths:  # the bundled sample: every image is 32 x 32
            first = self.image(0)
            if first is not None:
                return first.shape[:2]
        return image_size, image_size


def _workers() -> int:
    # Pillow and NumPy release the GIL while decoding / resizing, so threads scale.
    return max(1, min(16, os.cpu_count() or 1))


# ---------------------------------------------------------------- training


class HostTrainIterator:
    """Infinite iterator of this process's train batches (see the module docstring); the next
    batches are decoded in background threads while the current one trains."""

    def __init__(
        self,
        reader: Reader,
        shard: np.ndarray,
        *,
        local_batch: int,
        seed: int,
        start_step: int,
        process_index: int,
        process_count: int,
        host_shape: tuple[int, int],
    ) -> None:
        self.reader, self.shard, self.local_batch = reader, shard, local_batch
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.host_shape = host_shape
        self._next_step = start_step
        self._images = concurrent.futures.ThreadPoolExecutor(_workers())
        self._batches = concurrent.futures.ThreadPoolExecutor(1)  # keeps batches in order
        self._pending: collections.deque = collections.deque()
        self._orders: dict[int, np.ndarray] = {}

    @property
    def skipped_files(self) -> list[str]:
        """Corrupt files skipped so far (named in the logs as well)."""
        return self.reader.skipped.names

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Permutation of shard positions for one epoch, seeded by (seed, process, epoch)."""
        order = self._orders.get(epoch)
        if order is None:
            seed = np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.process_index, epoch])
            order = np.random.default_rng(seed).permutation(len(self.shard))
            # A batch spans at most two epochs: keep this one and the one before.
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = order
        return order

    def _example(self, position: int) -> tuple[np.ndarray, int]:
        """(image at host_shape, label) of a shard position; a skipped file's place is taken
        by the next example of the same epoch order."""
        n = len(self.shard)
        epoch, offset = divmod(position, n)
        order = self.epoch_order(epoch)
        for step in range(n):
            index = int(self.shard[order[(offset + step) % n]])
            image = self.reader.image(index)
            if image is not None:
                return fit_uint8(image, *self.host_shape), int(self.reader.labels[index])
        raise ValueError(f"every image of {self.reader.source.description} is corrupt.")

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch `step`: a function of (seed, step) only."""
        positions = step * self.local_batch + np.arange(self.local_batch, dtype=np.int64)
        examples = list(self._images.map(self._example, positions.tolist()))
        ids = (positions * self.process_count + self.process_index) % 2**32
        return {
            "image": np.stack([image for image, _ in examples]),
            "label": np.array([label for _, label in examples], np.int32),
            "id": ids.astype(np.uint32),
        }

    def __iter__(self) -> HostTrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while len(self._pending) < _PREFETCH_BATCHES:
            self._pending.append(self._batches.submit(self.batch, self._next_step))
            self._next_step += 1
        return self._pending.popleft().result()

    def close(self) -> None:
        """Stops the background threads (pending batches are dropped)."""
        for future in self._pending:
            future.cancel()
        self._batches.shutdown(wait=False, cancel_futures=True)
        self._images.shutdown(wait=False, cancel_futures=True)


def make_train_iterator(
    data_config: Any,
    *,
    split: str,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    supervised: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> HostTrainIterator:
    """This process's host batches of uint8 images with global ids (batch_size is GLOBAL);
    views are made on the device (data.backends.make_train_batches)."""
    common.backend(data_config)
    index, count = common.resolve_process(process_index, process_count)
    local_batch = common.per_process_batch(batch_size, count)
    if start_step < 0:
        raise ValueError(f"start_step={start_step!r} must be >= 0.")
    source = sources.get_source(
        data_config, split, supervised=supervised, field="split", use_label_subset=True
    )
    reader = Reader(source, bool(data_config.get("skip_corrupt", True)))
    shard = common.shard_indices(source.num_examples, index, count)
    if len(shard) == 0:
        raise ValueError(
            f"{source.description} has {source.num_examples} examples, fewer than the "
            f"{count} processes."
        )
    return HostTrainIterator(
        reader,
        shard,
        local_batch=local_batch,
        seed=int(seed),
        start_step=int(start_step),
        process_index=index,
        process_count=count,
        host_shape=reader.host_shape(int(data_config.image_size)),
    )


# ---------------------------------------------------------------- evaluation


@dataclasses.dataclass
class HostEvalData:
    """One pass over an eval split: re-iterable, `num_batches` equal on every process, each
    example exactly once over all processes, padding rows with mask 0.0 (as pipeline.EvalData)."""

    reader: Reader
    shard: np.ndarray
    num_batches: int
    num_examples: int
    local_batch: int
    image_size: int

    @property
    def skipped_files(self) -> list[str]:
        """Corrupt files skipped so far (named in the logs as well)."""
        return self.reader.skipped.names

    def _row(self, index: int) -> tuple[np.ndarray, int, float]:
        image = self.reader.image(index)
        if image is None:  # skipped corrupt file: a masked-out row keeps batches aligned
            return np.zeros((self.image_size,) * 2 + (3,), np.float32), common.PAD_LABEL, 0.0
        return eval_transform(image, self.image_size), int(self.reader.labels[index]), 1.0

    def _batch(self, pool: concurrent.futures.Executor, batch: int) -> dict[str, np.ndarray]:
        indices = self.shard[batch * self.local_batch : (batch + 1) * self.local_batch]
        rows = list(pool.map(self._row, indices.tolist()))
        pad = self.local_batch - len(rows)
        blank = np.zeros((self.image_size,) * 2 + (3,), np.float32)
        rows += [(blank, common.PAD_LABEL, 0.0)] * pad
        return {
            "image": np.stack([image for image, _, _ in rows]),
            "label": np.array([label for _, label, _ in rows], np.int32),
            "mask": np.array([mask for _, _, mask in rows], np.float32),
        }

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
            for batch in range(self.num_batches):
                yield self._batch(pool, batch)

    def __len__(self) -> int:
        return self.num_batches


def make_eval_iterator(
    data_config: Any,
    *,
    split: str,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> HostEvalData:
    """Eval pass over `split` with the eval transform (batch_size is GLOBAL)."""
    common.backend(data_config)
    index, count = common.resolve_process(process_index, process_count)
    local_batch = common.per_process_batch(batch_size, count)
    source = sources.get_source(data_config, split, supervised=True, field="split")
    reader = Reader(source, bool(data_config.get("skip_corrupt", True)))
    shards, num_batches = common.eval_shards(source.num_examples, count, local_batch)
    return HostEvalData(
        reader,
        shards[index],
        num_batches=num_batches,
        num_examples=int(source.num_examples),
        local_batch=local_batch,
        image_size=int(data_config.image_size),
    )
