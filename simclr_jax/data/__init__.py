"""Input pipeline: sources (bundled sample, image folders, TFDS), augmentations, batches."""

from simclr_jax.data.augment import AugmentParams
from simclr_jax.data.pipeline import (
    DatasetInfo,
    EvalData,
    NumpyIterator,
    get_dataset_info,
    make_eval_iterator,
    make_train_iterator,
)

__all__ = [
    "AugmentParams",
    "DatasetInfo",
    "EvalData",
    "NumpyIterator",
    "get_dataset_info",
    "make_eval_iterator",
    "make_train_iterator",
]
