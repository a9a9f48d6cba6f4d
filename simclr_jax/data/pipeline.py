"""tf.data input pipelines (data.backend='tfdata') yielding numpy batches.

Batch k of a process depends only on (seed, k): each process walks its shard in seeded
per-epoch permutations, and example i gets augmentation seed fold_in(seed, i * P + p).
TFDS sources are streams, so start_step skips records and order is exact only with
data.deterministic. Eval pads every process to the same number of batches with mask-0 rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from simclr_jax.data import augment, common, sources
from simclr_jax.data.common import CORRUPT_MARK, PAD_LABEL, SkippedFiles, per_process_batch
from simclr_jax.data.spec import augment_params

AUTOTUNE = tf.data.AUTOTUNE


# ---------------------------------------------------------------- decoding


def _looks_complete(contents: tf.Tensor) -> tf.Tensor:
    """Cheap in-graph test: a JPEG/PNG/GIF with its end marker (truncated files fail it)."""
    n = tf.strings.length(contents)
    head = tf.strings.substr(contents, 0, 8)
    tail2 = tf.strings.substr(contents, tf.maximum(n - 2, 0), 2)
    tail12 = tf.strings.substr(contents, tf.maximum(n - 12, 0), 12)
    jpeg = tf.logical_and(
        tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff"), tf.equal(tail2, b"\xff\xd9")
    )
    png = tf.logical_and(
        tf.equal(head, b"\x89PNG\r\n\x1a\n"), tf.equal(tail12, b"\x00\x00\x00\x00IEND\xaeB`\x82")
    )
    gif = tf.logical_and(
        tf.equal(tf.strings.substr(head, 0, 4), b"GIF8"),
        tf.equal(tf.strings.substr(tail2, 1, 1), b";"),
    )
    return tf.logical_or(jpeg, tf.logical_or(png, gif))


def make_decoder(skip_corrupt: bool, skipped: SkippedFiles) -> Callable:
    """decode(contents, name) -> (uint8 (H, W, 3) image, ok): complete-looking JPEG/PNG/GIF
    files take the fast in-graph decoder; anything else (truncated, BMP/WebP, garbage) goes
    through Pillow in a py_function, which decodes it or skips the file (raises without
    skip_corrupt)."""

    def slow_decode(contents: tf.Tensor, name: tf.Tensor):
        path = name.numpy().decode("utf-8", "replace")
        try:
            return common.pil_to_rgb_uint8(contents.numpy()), True
        except Exception as error:  # Pillow raises many types for bad files
            if not skip_corrupt:
                raise ValueError(f"{CORRUPT_MARK} {path}: {error}. {common.CORRUPT_FIX}") from None
            skipped.add(path, error)
            return np.zeros((1, 1, 3), np.uint8), False

    def decode(contents: tf.Tensor, name: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        def fast():
            image = tf.io.decode_image(contents, channels=3, expand_animations=False)
            return tf.ensure_shape(image, [None, None, 3]), tf.constant(True)

        def slow():
            image, ok = tf.py_function(slow_decode, [contents, name], [tf.uint8, tf.bool])
            return tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(ok, [])

        return tf.cond(_looks_complete(contents), fast, slow)

    return decode


# ---------------------------------------------------------------- helpers


def _example_seed(seed: int, position: tf.Tensor) -> tf.Tensor:
    """The augmentation seed of one example from (seed, global example position)."""
    base = tf.constant([seed, 0x5EED], dtype=tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(position, tf.int64))


def _views(per_view: Callable, image: tf.Tensor, seed: tf.Tensor, num_views: int):
    """The per-example part of an example's views (augment.make_view_fn), stacked on a
    leading view axis; view v uses the v-th split of the example's seed."""
    seeds = augment.split_seed(seed, num_views)
    views = [per_view(image, seeds[v]) for v in range(num_views)]
    return tf.nest.map_structure(lambda *parts: tf.stack(parts), *views)


def _batch_views(
    ds: tf.data.Dataset, local_batch: int, per_batch: Callable, num_views: int
) -> tf.data.Dataset:
    """Batches, then finishes the views per batch (vectorized, one call per batch):
    'image' (b, V, H, W, 3), or (b, H, W, 3) for one view."""

    @tf.autograph.experimental.do_not_convert
    def finish(example):
        image = per_batch(example["image"])
        return {"image": image if num_views > 1 else image[:, 0], "label": example["label"]}

    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.map(finish, num_parallel_calls=AUTOTUNE)


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_optimization.map_parallelization = True
    # One thread per op: tf.data's own parallelism is what scales the input pipeline.
    options.threading.max_intra_op_parallelism = 1
    return options


def _drop_failed(ds: tf.data.Dataset, skip_corrupt: bool) -> tf.data.Dataset:
    """Drops (example, ok=False) elements (skipped corrupt files) and the flag. A file that
    looks complete but fails the in-graph decoder (a damaged header) raises inside the map;
    with skip_corrupt tf.data drops it, logging a message that cannot name the file."""
    if skip_corrupt:
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.filter(lambda example, ok: ok)
    return ds.map(lambda example, ok: example)


def _pad_and_batch(ds: tf.data.Dataset, image_size: int, local_batch: int, num_batches: int):
    """Appends mask-0 rows so every process yields exactly num_batches full batches."""
    pad = {
        "image": tf.zeros([image_size, image_size, 3], tf.float32),
        "label": tf.constant(PAD_LABEL, tf.int32),
        "mask": tf.constant(0.0),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
    return ds.take(num_batches * local_batch).batch(local_batch, drop_remainder=True)


_DECODER_ERRORS = ("DecodeImage", "jpeg::Uncompress", "Unknown image file format", "PNG", "GIF")
MAX_FILES_TO_SCAN = 200_000


def find_undecodable(source: sources.IndexedSource, limit: int = 5) -> list[str]:
    """Names (up to `limit`) of records the in-graph decoder rejects; for error messages only
    (slow: decodes every record eagerly)."""
    bad: list[str] = []
    for record, name in zip(source.records[:MAX_FILES_TO_SCAN], source.names(), strict=False):
        contents = tf.io.read_file(record) if source.records_are_paths else tf.constant(record)
        try:
            tf.io.decode_image(contents, channels=3, expand_animations=False)
        except tf.errors.OpError:
            bad.append(str(name))
            if len(bad) >= limit:
                break
    return bad


class NumpyIterator:
    """Iterator of numpy batches; `skipped_files` names the corrupt files skipped so far."""

    def __init__(
        self,
        dataset: tf.data.Dataset,
        skipped: SkippedFiles,
        source: sources.Source | None = None,
        infinite: bool = False,
    ) -> None:
        self._iterator = dataset.as_numpy_iterator()
        self._source, self._infinite = source, infinite
        self.skipped_files = skipped.names

    def __iter__(self) -> NumpyIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            return next(self._iterator)
        except tf.errors.OpError as error:
            raise self._explain(error) from None
        except StopIteration:
            if not self._infinite:
                raise
            # A repeated training stream only ends when nothing passed its filters.
            raise ValueError(self._empty_message()) from None

    def _empty_message(self) -> str:
        source = self._source
        if isinstance(source, sources.TfdsSource) and source.name_filter is not None:
            return (
                f"data.label_subset names no image of {source.builder.name!r} split "
                f"{source.split!r} (it lists e.g. {sorted(source.name_filter)[:2]}); list "
                "file names as the dataset's 'file_name' feature has them."
            )
        return "the training input yields no examples (every file skipped or filtered out)."

    def _explain(self, error: tf.errors.OpError) -> Exception:
        """A ValueError naming the bad file for decode failures; other errors unchanged."""
        if CORRUPT_MARK in error.message:
            start = error.message.index(CORRUPT_MARK)
            return ValueError(error.message[start:].splitlines()[0])
        if not any(key in error.message for key in _DECODER_ERRORS):
            return error
        names = []
        if isinstance(self._source, sources.IndexedSource):
            names = find_undecodable(self._source)  # only on this fatal path
        where = f" in {', '.join(names)}" if names else ""
        return ValueError(
            f"{CORRUPT_MARK}{where}: {error.message.splitlines()[0][-200:]}. {common.CORRUPT_FIX}"
        )


# ---------------------------------------------------------------- streams of records
#
# A stream is a dataset plus `read`, which turns one of its elements into (contents, label,
# name[, position in this process's stream]); make_train_iterator / make_eval_iterator map it.


def _record_loader(source: sources.IndexedSource) -> Callable:
    """index -> (contents, label, name) for an indexed source, inside tf.data."""
    records = tf.constant(list(source.records), dtype=tf.string)
    names = (
        tf.constant(list(source.names()), dtype=tf.string)
        if not source.records_are_paths
        else records
    )
    labels = tf.constant(source.labels, dtype=tf.int32)

    def load(index: tf.Tensor):
        record = tf.gather(records, index)
        contents = tf.io.read_file(record) if source.records_are_paths else record
        return contents, tf.gather(labels, index), tf.gather(names, index)

    return load


def _epoch_stream(shard: np.ndarray, seed: int, salt: int, start: int) -> tf.data.Dataset:
    """(example index, shard position) forever, each epoch in a seeded permutation order,
    starting at shard position `start` (whole epochs before it are never materialized)."""
    n = len(shard)
    shard_t = tf.constant(shard, dtype=tf.int64)

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64),
            seed=tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + salt, e]),
        )
        return tf.data.Dataset.from_tensor_slices(
            (tf.gather(shard_t, order), e * n + tf.range(n, dtype=tf.int64))
        )

    return tf.data.Dataset.counter(start // n).flat_map(epoch).skip(start % n)


def _tfds_dataset(
    source: sources.TfdsSource, split: str, *, shuffle_files: bool, seed: int, deterministic: bool
) -> tf.data.Dataset:
    import tensorflow_datasets as tfds

    read_config = tfds.ReadConfig(shuffle_seed=seed, options=_options(deterministic))
    ds = source.builder.as_dataset(
        split=split,
        shuffle_files=shuffle_files,
        read_config=read_config,
        decoders={"image": tfds.decode.SkipDecoding()},  # decoded by our robust decoder
    )
    if source.name_filter is not None:
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(sorted(source.name_filter)), tf.ones(len(source.name_filter), tf.int32)
            ),
            default_value=0,
        )
        ds = ds.filter(lambda ex: table.lookup(tf.strings.split(ex["file_name"], "/")[-1]) > 0)
    return ds


def _tfds_read(example: dict) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    name = example["file_name"] if "file_name" in example else tf.constant("tfds-example")
    return example["image"], tf.cast(example["label"], tf.int32), name


def _host_tfds_splits(source: sources.TfdsSource, process_count: int) -> list[str]:
    import tensorflow_datasets as tfds

    return tfds.even_splits(source.split, n=process_count, drop_remainder=False)


def _train_stream(
    source: sources.Source, data_config: Any, seed: int, index: int, count: int, start: int
) -> tuple[tf.data.Dataset, Callable]:
    """This process's training records from position `start` on, forever."""
    if isinstance(source, sources.TfdsSource):
        split = _host_tfds_splits(source, count)[index]
        deterministic = data_config.get("deterministic", False)
        ds = _tfds_dataset(
            source, split, shuffle_files=True, seed=seed + index, deterministic=deterministic
        )
        ds = ds.repeat().shuffle(data_config.shuffle_buffer, seed=seed + index).enumerate()
        ds = ds.skip(start)  # a stream: resuming means reading past it
        return ds, lambda position, example: (*_tfds_read(example), position)
    load = _record_loader(source)
    ds = _epoch_stream(common.train_shard(source, index, count), seed, index, start)
    return ds, lambda row, position: (*load(row), position)


def _eval_stream(
    source: sources.Source, index: int, count: int, local_batch: int
) -> tuple[tf.data.Dataset, Callable, int]:
    """This process's block of eval records, and the batches every process yields."""
    if isinstance(source, sources.TfdsSource):
        splits = _host_tfds_splits(source, count)
        counts = [source.builder.info.splits[s].num_examples for s in splits]
        num_batches = math.ceil(max(counts) / local_batch)
        ds = _tfds_dataset(source, splits[index], shuffle_files=False, seed=0, deterministic=True)
        return ds, _tfds_read, num_batches
    shards, num_batches = common.eval_shards(source.num_examples, count, local_batch)
    ds = tf.data.Dataset.from_tensor_slices(shards[index].astype(np.int64))
    return ds, _record_loader(source), num_batches


# ---------------------------------------------------------------- public API


def make_train_iterator(
    data_config: Any,
    *,
    split: str,
    batch_size: int,
    num_views: int,
    augmentation: str,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> NumpyIterator:
    """Infinite iterator of this process's training batches (batch_size is GLOBAL):
    {'image': (b, V, H, W, 3) or (b, H, W, 3) float32 in [0, 1], 'label': (b,) int32}."""
    index, count = common.resolve_process(process_index, process_count)
    local_batch = per_process_batch(batch_size, count)
    supervised = augmentation == "crop_flip"
    source = sources.get_source(
        data_config, split, supervised=supervised, field="split", use_label_subset=True
    )
    ds, read = _train_stream(source, data_config, seed, index, count, start_step * local_batch)
    skip_corrupt = data_config.get("skip_corrupt", True)
    skipped = SkippedFiles()
    decode = make_decoder(skip_corrupt, skipped)
    per_view, per_batch = augment.make_view_fn(augmentation, augment_params(data_config))

    @tf.autograph.experimental.do_not_convert
    def element(*item):
        contents, label, name, position = read(*item)
        image, ok = decode(contents, name)
        seed_t = _example_seed(seed, position * count + index)
        return {"image": _views(per_view, image, seed_t, num_views), "label": label}, ok

    ds = _drop_failed(ds.map(element, num_parallel_calls=AUTOTUNE), skip_corrupt)
    ds = _batch_views(ds, local_batch, per_batch, num_views).prefetch(AUTOTUNE)
    ds = ds.with_options(_options(data_config.get("deterministic", False)))
    return NumpyIterator(ds, skipped, source, infinite=True)


@dataclasses.dataclass
class EvalData(common.EvalPass):
    """The tf.data eval pass."""

    dataset: tf.data.Dataset
    num_batches: int
    num_examples: int
    skipped: SkippedFiles
    source: sources.Source | None = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return NumpyIterator(self.dataset, self.skipped, self.source)


def make_eval_iterator(
    data_config: Any,
    *,
    split: str,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalData:
    """Eval pass over `split` with the eval transform (batch_size is GLOBAL)."""
    index, count = common.resolve_process(process_index, process_count)
    local_batch = per_process_batch(batch_size, count)
    image_size = augment_params(data_config).image_size
    source = sources.get_source(data_config, split, supervised=True, field="split")
    ds, read, num_batches = _eval_stream(source, index, count, local_batch)
    skip_corrupt = data_config.get("skip_corrupt", True)
    skipped = SkippedFiles()
    decode = make_decoder(skip_corrupt, skipped)

    @tf.autograph.experimental.do_not_convert
    def element(item):
        contents, label, name = read(item)
        image, ok = decode(contents, name)
        image = augment.eval_transform(image, image_size)
        return {"image": image, "label": label, "mask": tf.constant(1.0)}, ok

    ds = ds.map(element, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = _pad_and_batch(_drop_failed(ds, skip_corrupt), image_size, local_batch, num_batches)
    ds = ds.prefetch(AUTOTUNE).with_options(_options(True))
    return EvalData(ds, num_batches, source.num_examples, skipped, source)
