"""mode 'pretrain': SimCLR, NT-Xent over the global batch of two augmented views per image,
plus the online linear probe's cross entropy on stop_gradient(h)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from simclr_jax import data, losses
from simclr_jax.modes.base import BatchSpec, Config, Mode, no_check, train_split_batches


def loss(config: Config, model: Any, mesh: jax.sharding.Mesh) -> Any:
    """SimCLR loss on a batch {'image': (B, 2, H, W, 3), 'label': (B,)}: NT-Xent over the global
    batch plus the online linear probe's cross entropy (on stop_gradient(h), both views)."""
    num_classes = config.model.num_classes
    temperature, hidden_norm = config.loss.temperature, config.loss.hidden_norm

    def loss_fn(params: Any, batch_stats: Any, batch: Any):
        images = batch["image"]
        num_images = images.shape[0]
        # Interleaved views (image i -> rows 2i, 2i+1) keep every image's views on its device.
        views = images.reshape((2 * num_images, *images.shape[2:]))
        labels = jnp.repeat(batch["label"], 2)
        out, updated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            views,
            train=True,
            mutable=["batch_stats"],
        )
        z = out["z"].reshape(num_images, 2, -1)
        contrast_loss, contrast = losses.nt_xent(
            z[:, 0], z[:, 1], mesh, temperature=temperature, hidden_norm=hidden_norm
        )
        probe_loss = losses.softmax_cross_entropy(out["logits"], labels, num_classes)
        aux = {
            "contrast_loss": contrast_loss,
            **contrast,
            "probe_loss": probe_loss,
            "probe_acc": jnp.mean(losses.topk_correct(out["logits"], labels, 1)),
        }
        return contrast_loss + probe_loss, (updated["batch_stats"], aux)

    return loss_fn


def batch_spec(config: Config) -> BatchSpec:
    """Two augmented views of every image, and its label (for the online probe)."""
    b, size = config.train_batch_size, config.data.image_size
    return {"image": ((b, 2, size, size, 3), jnp.float32), "label": ((b,), jnp.int32)}


def batches(
    config: Config, mesh: jax.sharding.Mesh, start_step: int, data_state: dict[str, Any] | None
) -> data.TrainBatches:
    """The train split with SimCLR's augmentation, two views per image."""
    return train_split_batches(
        config, mesh, start_step, data_state, num_views=2, augmentation="simclr"
    )


MODE = Mode(
    name="pretrain",
    validate=no_check,
    batch_spec=batch_spec,
    batches=batches,
    loss=loss,
    metrics=("contrast_loss", "contrast_acc", "contrast_entropy", "probe_loss", "probe_acc"),
)
