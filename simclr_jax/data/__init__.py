"""Input pipeline: sources (bundled sample, image folders, NumPy arrays, TFDS), augmentations,
batches. config.data.backend selects tf.data ('tfdata') or the TF-free Grain loader with
on-device augmentation ('jax'); see backends.py. spec.py holds the augmentation settings both
share. Nothing here imports TensorFlow until the tf.data path is used."""

from simclr_jax.data.backends import (
    TrainBatches,
    make_device_augment,
    make_eval_iterator,
    make_train_batches,
    make_train_iterator,
)
from simclr_jax.data.common import DatasetInfo, get_dataset_info, planned_dataset_info
from simclr_jax.data.spec import AugmentParams, augment_params

__all__ = [
    "AugmentParams",
    "DatasetInfo",
    "TrainBatches",
    "augment_params",
    "get_dataset_info",
    "make_device_augment",
    "make_eval_iterator",
    "make_train_batches",
    "make_train_iterator",
    "planned_dataset_info",
]
