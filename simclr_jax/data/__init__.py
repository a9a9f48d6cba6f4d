"""Input pipeline: sources (bundled sample, image folders, NumPy arrays, TFDS), augmentations,
batches. config.data.backend selects tf.data ('tfdata') or the TF-free loader with on-device
augmentation ('jax'); see backends.py. Nothing here imports TensorFlow until the tf.data path
is used."""

from simclr_jax.data.backends import (
    TrainBatches,
    make_batch_augmenter,
    make_device_augment,
    make_eval_iterator,
    make_train_batches,
    make_train_iterator,
)
from simclr_jax.data.common import BACKENDS, DatasetInfo, get_dataset_info

_TF_DATA_NAMES = ("AugmentParams", "EvalData", "NumpyIterator")


def __getattr__(name: str):
    """The tf.data path's classes, imported (with TensorFlow) on first use."""
    if name == "AugmentParams":
        from simclr_jax.data.augment import AugmentParams

        return AugmentParams
    if name in _TF_DATA_NAMES:
        from simclr_jax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "AugmentParams",
    "DatasetInfo",
    "EvalData",
    "NumpyIterator",
    "TrainBatches",
    "get_dataset_info",
    "make_batch_augmenter",
    "make_device_augment",
    "make_eval_iterator",
    "make_train_batches",
    "make_train_iterator",
]
