"""The CIFAR-10 proof on 2 CPU cores (docs/results.md): the CIFAR ResNet-18 recipe for a fixed
short budget, and the paper's ablations at the same budget.

    bash launch/cifar10_proof.sh            # all arms, then docs/results.md's table

Args: simclr (default) | no_head (proj_head_mode=none) | no_jitter (colour jitter off; random
grayscale stays). Everything else is configs/cifar10_pretrain.py (32 px, CIFAR stem, LARS,
temperature 0.5, jitter 0.5, no blur) with its ':val' protocol (4500/500 images per class
train/validation by file name: the proof runs where only the training images are unpacked) at
batch 128 for PROOF_STEPS steps: about 20 minutes per arm on an idle 2-core machine.
"""

from __future__ import annotations

import ml_collections

from simclr_jax import presets
from simclr_jax.config import get_base_config, parse_arg

ARMS = ("simclr", "no_head", "no_jitter")
PROOF_STEPS = 150


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The proof's pretraining config for one arm (arg)."""
    arm = parse_arg(arg, "cifar10_proof.py", variants=ARMS).variant or "simclr"
    # configs/cifar10_pretrain.py:val, built from the same preset.
    config = get_base_config()
    presets.cifar10_pretrain_recipe(config, "val")
    config.train_batch_size = 128
    config.eval_batch_size = 500
    config.train_steps = PROOF_STEPS
    config.warmup_steps = 10
    config.log_every_steps = 10
    config.checkpoint_every_steps = 50
    # Linear and kNN eval of the frozen encoder run afterwards (simclr_jax.frozen_eval) on the
    # same splits for every arm and for a random encoder; the end-of-run eval keeps the online
    # probe's validation accuracy only.
    config.knn_eval = False
    if arm == "no_head":
        config.model.proj_head_mode = "none"
    if arm == "no_jitter":
        config.data.color_jitter_prob = 0.0
    return config
