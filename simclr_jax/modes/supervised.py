"""modes 'linear_eval' and 'finetune': cross entropy of the classifier on labelled images, the
encoder restored from a pretraining checkpoint (init_checkpoint). linear_eval freezes the whole
encoder; finetune trains it above model.fine_tune_after_block. The frozen part gets no gradient
and keeps its BN in inference mode (model mode 'finetune')."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from simclr_jax import data, losses
from simclr_jax.modes.base import BatchSpec, Config, Mode, require, train_split_batches


def validate(config: Config) -> None:
    """Both need the pretraining checkpoint; linear_eval freezes every encoder block."""
    require(
        bool(config.init_checkpoint),
        f"mode={config.mode!r} needs init_checkpoint: pass "
        "--config.init_checkpoint=<pretraining workdir>.",
    )
    if config.mode == "linear_eval":
        require(
            config.model.fine_tune_after_block == 4,
            f"model.fine_tune_after_block={config.model.fine_tune_after_block} but linear_eval "
            "freezes the whole encoder; set it to 4 (or use mode=finetune).",
        )


def loss(config: Config, model: Any, mesh: jax.sharding.Mesh) -> Any:
    """Cross entropy on {'image': (B, H, W, 3), 'label': (B,)}, with the training accuracy."""
    del mesh  # a per-example loss: nothing crosses devices but BN's statistics
    num_classes = config.model.num_classes

    def loss_fn(params: Any, batch_stats: Any, batch: Any):
        out, updated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        loss = losses.softmax_cross_entropy(out["logits"], batch["label"], num_classes)
        accuracy = jnp.mean(losses.topk_correct(out["logits"], batch["label"], 1))
        return loss, (updated["batch_stats"], {"train_acc": accuracy})

    return loss_fn


def batch_spec(config: Config) -> BatchSpec:
    """One crop-and-flip view per labelled image."""
    b, size = config.train_batch_size, config.data.image_size
    return {"image": ((b, size, size, 3), jnp.float32), "label": ((b,), jnp.int32)}


def batches(
    config: Config, mesh: jax.sharding.Mesh, start_step: int, data_state: dict[str, Any] | None
) -> data.TrainBatches:
    """The (labelled) train split with the fine-tuning augmentation, one view per image."""
    return train_split_batches(
        config, mesh, start_step, data_state, num_views=1, augmentation="crop_flip"
    )


LINEAR_EVAL = Mode(
    name="linear_eval",
    validate=validate,
    batch_spec=batch_spec,
    batches=batches,
    loss=loss,
    metrics=("train_acc",),
)
# Fine-tuning differs from linear eval only in which parameters train (config.model).
FINETUNE = dataclasses.replace(LINEAR_EVAL, name="finetune")
