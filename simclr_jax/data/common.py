"""What both input pipelines share, without TensorFlow: the backend switch, sharding, batch
sizes, dataset info, corrupt-file bookkeeping and the Pillow decoder.
"""

from __future__ import annotations

import io
import logging
from typing import Any, NamedTuple

import numpy as np

from simclr_jax.data import sources, spec

BACKENDS = ("tfdata", "jax")
PAD_LABEL = 0  # label of padding rows in eval batches (mask 0.0)
CORRUPT_MARK = "corrupt or truncated image"
CORRUPT_FIX = "Delete or replace the file, or set data.skip_corrupt=True to skip it."


class DatasetInfo(NamedTuple):
    """Number of classes and examples per split of the configured source."""

    num_classes: int
    num_examples: dict[str, int]
    class_names: tuple[str, ...] = ()


def backend(data_config: Any) -> str:
    """data_config.backend ('tfdata' when absent), validated with its source."""
    name = data_config.get("backend", "tfdata")
    if name not in BACKENDS:
        raise ValueError(
            f"data.backend={name!r}; allowed: {BACKENDS} ('tfdata': tf.data input with "
            "augmentation on the host; 'jax': TF-free loader with augmentation on the device)."
        )
    if name == "tfdata" and data_config.source == "numpy":
        raise ValueError(
            "data.source='numpy' is read by data.backend='jax' only; set data.backend='jax'."
        )
    return name


class SkippedFiles:
    """Collects corrupt files that were skipped, naming each in the logs."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, name: str, error: Exception) -> None:
        """Records and logs one skipped file."""
        self.names.append(name)
        logging.warning(
            "Skipping %s %s (%d skipped so far): %s", CORRUPT_MARK, name, len(self.names), error
        )


def pil_to_rgb_uint8(contents: bytes) -> np.ndarray:
    """Decodes any image Pillow reads to (H, W, 3) uint8; 16-bit data scaled, not clipped."""
    from PIL import Image

    with Image.open(io.BytesIO(contents)) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(img, dtype=np.float64)
            array = np.round(array * (255.0 / (65535.0 if array.max() > 255 else 255.0)))
            return np.repeat(np.clip(array, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count) of this process: the given values, else JAX's."""
    import jax

    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count}).")
    return index, count


def per_process_batch(batch_size: int, process_count: int, field: str = "batch_size") -> int:
    """The rows each process produces; the global batch must split evenly over processes."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"{field}={batch_size!r} must be a positive integer.")
    if batch_size % process_count:
        raise ValueError(
            f"{field}={batch_size} is not divisible by the {process_count} processes; "
            f"use a multiple of {process_count}."
        )
    return batch_size // process_count


def train_shard(source: Any, process_index: int, process_count: int) -> np.ndarray:
    """The examples of a source a process trains on: disjoint across processes, together all
    of them; raises where the process would get no example."""
    shard = np.arange(source.num_examples)[process_index::process_count]
    if len(shard) == 0:
        raise ValueError(
            f"{source.description} has {source.num_examples} examples, fewer than the "
            f"{process_count} processes."
        )
    return shard


def eval_shards(num_examples: int, process_count: int, local_batch: int):
    """(contiguous block of examples per process, batches every process yields): each example
    is evaluated once, and every process runs the same number of padded batches."""
    shards = np.array_split(np.arange(num_examples), process_count)
    return shards, -(-max(len(s) for s in shards) // local_batch)


class EvalPass:
    """One pass over an eval split: re-iterable, `num_batches` equal on every process, each
    example exactly once over all processes, padding rows with mask 0.0."""

    num_batches: int
    skipped: SkippedFiles

    @property
    def skipped_files(self) -> list[str]:
        """Corrupt files skipped so far (named in the logs as well)."""
        return self.skipped.names

    def __len__(self) -> int:
        return self.num_batches


def get_dataset_info(data_config: Any) -> DatasetInfo:
    """Classes and example counts of data_config.train_split and eval_split (and, for the
    bundled sample, 'train' and 'test'); validates the backend, the augmentation fields
    (spec.augment_params) and the source before anything runs."""
    backend(data_config)
    spec.augment_params(data_config)
    splits = [
        ("data.train_split", data_config.train_split),
        ("data.eval_split", data_config.eval_split),
    ]
    if data_config.source == "bundled":
        splits += [("split", name) for name in sources.BUNDLED_SPLITS]
    counts, num_classes, class_names = {}, 0, ()
    for field, split in splits:
        if not split or split in counts:
            continue
        source = sources.get_source(
            data_config,
            split,
            supervised=False,
            field=field,
            use_label_subset=field == "data.train_split",
        )
        counts[split] = int(source.num_examples)
        num_classes = max(num_classes, source.num_classes)
        class_names = class_names or getattr(source, "class_names", ())
    return DatasetInfo(num_classes=num_classes, num_examples=counts, class_names=class_names)


# Classes and training-split sizes of well-known datasets: a run planned on a machine that does
# not hold them (the preflight) takes its sizes from here.
KNOWN_DATASETS = {
    "imagenet2012": (1000, {"train": 1_281_167, "validation": 50_000}),
    "cifar10": (10, {"train": 50_000, "test": 10_000}),
    "cifar100": (100, {"train": 50_000, "test": 10_000}),
}
LABEL_SUBSET_FRACTION = {"1pct": 0.01, "10pct": 0.1}


def planned_dataset_info(data_config: Any) -> DatasetInfo:
    """num_classes and split sizes for planning a run: the bundled sample's own, else the
    published sizes of a well-known dataset (KNOWN_DATASETS), else get_dataset_info (the data
    on this machine: a folder or prepared TFDS dataset)."""
    name = str(data_config.get("name", ""))
    if data_config.source == "bundled" or name not in KNOWN_DATASETS:
        return get_dataset_info(data_config)
    classes, counts = KNOWN_DATASETS[name]
    counts = dict(counts)
    fraction = LABEL_SUBSET_FRACTION.get(str(data_config.get("label_subset", "")), 1.0)
    split = str(data_config.train_split)
    counts[split] = int(counts.get(split.split("[")[0], counts["train"]) * fraction)
    return DatasetInfo(num_classes=classes, num_examples=counts, class_names=())
