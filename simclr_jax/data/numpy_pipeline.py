"""TF-free host pieces of data.backend='jax': Pillow decoding (Reader), a bicubic resize
matching tf.image.resize, and the eval pass (same sharding and mask-0 padding as pipeline.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

from simclr_jax.data import common, sources
from simclr_jax.data.spec import EVAL_CROP_PROPORTION

# ---------------------------------------------------------------- host image ops


def _keys_cubic(t: np.ndarray) -> np.ndarray:
    """Keys cubic kernel, a = -0.5 (tf.image.resize 'bicubic')."""
    a, t = -0.5, np.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


@functools.lru_cache(maxsize=1024)
def _resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (out, 4): tf.image.resize bicubic as 4 taps per output pixel
    (half-pixel centres, no antialiasing, taps outside the image dropped and the rest
    renormalized; Pillow antialiases, so it differs). The Keys kernel is 0 beyond 2 pixels,
    so these 4 taps are exactly the nonzero entries of the dense resize matrix."""
    centers = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    taps = np.floor(centers)[:, None] - 1 + np.arange(4)[None, :]
    weights = _keys_cubic(centers[:, None] - taps)
    weights = np.where((taps >= 0) & (taps < in_size), weights, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    return np.clip(taps, 0, in_size - 1).astype(np.intp), weights.astype(np.float32)


def _resize_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    indices, weights = _resize_taps(image.shape[axis], out_size)
    shape = [1] * image.ndim
    shape[axis] = out_size
    out = np.zeros(image.shape[:axis] + (out_size,) + image.shape[axis + 1 :], np.float32)
    for t in range(4):  # 4 gathers + multiply-adds instead of a dense (out, in) matmul
        out += np.take(image, indices[:, t], axis=axis) * weights[:, t].reshape(shape)
    return out


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (height, width, 3) bicubic resize of a [0, 1] image, not clipped."""
    image = image.astype(np.float32)
    if image.shape[:2] == (height, width):
        return image
    return _resize_axis(_resize_axis(image, height, 0), width, 1)


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return image.astype(np.float32) * np.float32(1.0 / 255.0)


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
    """Example index -> (uint8 (H, W, 3) image or None when skipped, label), thread-safe.
    TFDS sources are read by index through tfds's ArrayRecord data source (opened lazily in
    each process, so the reader can be pickled into Grain worker processes)."""

    def __init__(self, source: sources.Source, skip_corrupt: bool) -> None:
        if isinstance(source, sources.TfdsSource):
            check_random_access(source)
        self.source = source
        self.skip_corrupt = skip_corrupt
        self.skipped = common.SkippedFiles()
        self._records: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_records": None}  # each worker opens its own data source

    def example(self, index: int) -> tuple[np.ndarray | None, int]:
        """(decoded image or None for a skipped corrupt file, label) of one example."""
        if isinstance(self.source, sources.TfdsSource):
            if self._records is None:
                self._records = tfds_records(self.source)
            record = self._records[index]
            name = str(record.get("file_name", f"{self.source.builder.name}#{index}"))
            return self._decode(record["image"], name), int(record["label"])
        return self.image(index), int(self.source.labels[index])

    def image(self, index: int) -> np.ndarray | None:
        """The decoded image, or None for a corrupt file that is skipped."""
        source = self.source
        if isinstance(source, sources.ArraySource):
            return np.asarray(source.images[source.rows[index]])  # reads one row of a memmap
        record = source.records[index]
        name = str(record) if source.records_are_paths else f"{source.description}#{index}"
        if source.records_are_paths:
            try:
                record = epath.Path(record).read_bytes()
            except OSError as error:
                return self._skip(name, error)
        return self._decode(record, name)

    def _decode(self, contents: bytes, name: str) -> np.ndarray | None:
        try:
            return common.pil_to_rgb_uint8(contents)
        except Exception as error:  # Pillow raises many types for bad files
            return self._skip(name, error)

    def _skip(self, name: str, error: Exception) -> None:
        if not self.skip_corrupt:
            raise ValueError(
                f"{common.CORRUPT_MARK} {name}: {error}. {common.CORRUPT_FIX}"
            ) from None
        self.skipped.add(name, error)
        return None


def check_random_access(source: sources.TfdsSource) -> None:
    """data.backend='jax' reads TFDS by index: the dataset must be stored as ArrayRecord."""
    formats = {str(getattr(f, "value", f)) for f in source.builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise ValueError(
            f"data.backend='jax' reads TFDS through tfds.data_source, which needs ArrayRecord "
            f"files; {source.builder.name!r} in {source.builder.data_dir} is stored as "
            f"{sorted(formats)}. Prepare it with `{sources.build_command(source.builder, '')}"
            " --file_format=array_record` (into another data_dir), or use data.backend='tfdata'."
        )
    if source.name_filter is not None:
        raise ValueError(
            "data.label_subset as a file of names is read by data.backend='tfdata' only with "
            "TFDS; use '1pct' / '10pct' (imagenet2012_subset) or data.backend='tfdata'."
        )


def tfds_records(source: sources.TfdsSource) -> Any:
    """Random-access records {'image': encoded bytes, 'label', 'file_name'} of the split."""
    import tensorflow_datasets as tfds

    return source.builder.as_data_source(
        split=source.split,
        decoders={"image": tfds.decode.SkipDecoding()},
        file_format="array_record",
    )


def default_threads() -> int:
    """Decoding threads per process: one per CPU, at most 16."""
    # Pillow and NumPy release the GIL while decoding / resizing, so threads scale.
    return max(1, min(16, os.cpu_count() or 1))


# ---------------------------------------------------------------- evaluation


@dataclasses.dataclass
class HostEvalData(common.EvalPass):
    """The eval pass of data.backend='jax', decoded in a thread pool."""

    reader: Reader
    shard: np.ndarray
    num_batches: int
    num_examples: int
    local_batch: int
    image_size: int
    skipped: common.SkippedFiles

    def _row(self, index: int | None) -> tuple[np.ndarray, int, float]:
        image, label = self.reader.example(index) if index is not None else (None, 0)
        if image is None:  # padding, or a skipped corrupt file: a masked-out row
            return np.zeros((self.image_size,) * 2 + (3,), np.float32), common.PAD_LABEL, 0.0
        return eval_transform(image, self.image_size), label, 1.0

    def _batch(self, pool: concurrent.futures.Executor, batch: int) -> dict[str, np.ndarray]:
        indices = self.shard[batch * self.local_batch : (batch + 1) * self.local_batch].tolist()
        rows = list(pool.map(self._row, indices + [None] * (self.local_batch - len(indices))))
        return {
            "image": np.stack([image for image, _, _ in rows]),
            "label": np.array([label for _, label, _ in rows], np.int32),
            "mask": np.array([mask for _, _, mask in rows], np.float32),
        }

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        with concurrent.futures.ThreadPoolExecutor(default_threads()) as pool:
            for batch in range(self.num_batches):
                yield self._batch(pool, batch)


def make_eval_iterator(
    data_config: Any,
    *,
    split: str,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> HostEvalData:
    """Eval pass over `split` with the eval transform (batch_size is GLOBAL)."""
    index, count = common.resolve_process(process_index, process_count)
    local_batch = common.per_process_batch(batch_size, count)
    source = sources.get_source(data_config, split, supervised=True, field="split")
    reader = Reader(source, data_config.get("skip_corrupt", True))
    shards, num_batches = common.eval_shards(source.num_examples, count, local_batch)
    return HostEvalData(
        reader,
        shards[index],
        num_batches=num_batches,
        num_examples=source.num_examples,
        local_batch=local_batch,
        image_size=data_config.image_size,
        skipped=reader.skipped,
    )
