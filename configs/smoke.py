"""Smoke run on the bundled CIFAR-10 sample (3000 train / 1000 test images): minutes on a CPU.

    bash launch/run_local.sh     # pretrain, linear eval, fine-tune (10% labels), distill
    python -m simclr_jax.main --config=configs/smoke.py:pretrain --workdir=/tmp/smoke/pretrain
    python -m simclr_jax.main --config=configs/smoke.py:linear_eval \
        --workdir=/tmp/smoke/linear_eval --config.init_checkpoint=/tmp/smoke/pretrain
    python -m simclr_jax.main --config=configs/smoke.py:finetune \
        --workdir=/tmp/smoke/finetune --config.init_checkpoint=/tmp/smoke/pretrain
    python -m simclr_jax.main --config=configs/smoke.py:distill --workdir=/tmp/smoke/distill \
        --config.init_checkpoint=/tmp/smoke/pretrain \
        --config.distill.teacher_checkpoint=/tmp/smoke/finetune

Args: pretrain (default) | linear_eval | finetune | distill | eval (eval needs
--config.init_checkpoint). finetune sees the labels of LABELED_SPLIT only (SimCLRv2's
semi-supervised fine-tuning); distill trains a student of the same architecture (self-
distillation) on all 3000 training images labelled by the fine-tuned teacher's predictions.
ResNet-18 width 1 at 16 px with the standard (strided) stem, so that ~150 pretraining steps
take minutes on a CPU (a 32 px CIFAR-stem step costs over an order of magnitude more). Use
configs/cifar10_pretrain.py:runlocal or the full CIFAR-10 recipe for 32 px.
"""

from __future__ import annotations

import ml_collections

from simclr_jax.config import MODES, get_base_config, parse_arg

# 30 images per class, 10% of the bundled training split: the labelled subset of the v2 chain.
LABELED_SPLIT = "train[:30]"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Smoke config for one mode (arg); the default is pretrain."""
    mode = parse_arg(arg, "smoke.py", variants=MODES).variant or "pretrain"
    config = get_base_config()
    config.mode = mode
    config.seed = 0

    config.data.source = "bundled"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.image_size = 16
    config.data.deterministic = True
    config.data.shuffle_buffer = 3000
    config.data.color_jitter_strength = 0.5
    config.data.blur_prob = 0.0

    config.model.resnet_depth = 18
    config.model.width_multiplier = 1
    config.model.cifar_stem = False
    config.model.num_proj_layers = 2
    config.model.proj_out_dim = 64

    config.eval_batch_size = 200
    config.knn_k = 50
    config.keep_checkpoints = 2
    config.warmup_steps = 0
    config.warmup_epochs = 0.0
    if mode == "pretrain":
        config.train_batch_size = 64
        config.train_steps = 150
        config.warmup_steps = 10
        config.log_every_steps = 25
        config.checkpoint_every_steps = 50
        config.loss.temperature = 0.2
        config.optim.optimizer = "lars"
        config.optim.learning_rate = 1.0
        config.optim.weight_decay = 1e-4
        # The online probe runs outside LARS, as the reference, i.e. at the full LR (0.25 at
        # this batch), which is too high for the unnormalised h of this tiny model; the probe
        # does not touch the encoder. Not a reference knob: the recipes keep 1.0.
        config.optim.classifier_lr_scale = 0.1
    else:
        config.train_batch_size = 256
        config.train_steps = 100 if mode == "linear_eval" else 30
        config.log_every_steps = 20
        config.checkpoint_every_steps = 50
        config.optim.optimizer = "momentum"
        config.optim.nesterov = True
        # h is not normalized: a small LR (0.05 x B/256) keeps the first steps stable.
        config.optim.learning_rate = 0.05
        config.optim.weight_decay = 0.0
        config.model.fine_tune_after_block = 4 if mode == "linear_eval" else 2
        config.model.ft_proj_selector = 0 if mode == "linear_eval" else 1
        config.model.zero_init_logits_layer = mode in ("finetune", "distill")
    if mode == "finetune":
        config.data.train_split = LABELED_SPLIT
    if mode == "distill":
        # Self-distillation on the whole unlabeled split: student = the smoke architecture,
        # init_checkpoint = the pretraining workdir, teacher = the fine-tuned workdir. Half
        # distillation, half labelled loss (alpha 0.5: the SimCLRv2 paper's eq. 3) at tau 1.
        config.train_batch_size = 128
        config.train_steps = 60
        config.checkpoint_every_steps = 30
        config.optim.learning_rate = 0.2  # x 128/256: 0.1
        config.distill.temperature = 1.0
        config.distill.alpha = 0.5
        config.distill.labeled_split = LABELED_SPLIT
    return config
