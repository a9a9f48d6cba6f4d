"""CIFAR-10 linear evaluation of a cifar10_pretrain checkpoint (frozen encoder, linear head).

The reference README's command ('Finetuning the linear head' on CIFAR-10): Nesterov momentum,
lr 0.1 x B/256, no weight decay, zero-initialised classifier, 100 epochs, crop + flip, batch
512, trained on the 50,000 training images and evaluated on the 10,000 test images. Pass
--config.init_checkpoint=<pretraining workdir>.

Args (comma separated): 'val' (train[:4500] -> train[4500:], as cifar10_pretrain.py:val),
'runlocal'.
"""

from __future__ import annotations

import ml_collections

from simclr_jax import presets
from simclr_jax.config import get_base_config, parse_arg

ARGS = ("val", "runlocal")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The CIFAR-10 linear-eval config from '[val][,runlocal]'."""
    args = parse_arg(arg, "cifar10_linear_eval.py", flags=ARGS).flags
    config = get_base_config()
    presets.cifar10_data(config, "val" if "val" in args else "test")
    presets.cifar10_augmentation(config)
    presets.linear_eval_protocol(config, weight_decay=0.0)
    config.model.resnet_depth = 18
    config.model.width_multiplier = 1
    config.model.cifar_stem = "auto"
    config.model.num_proj_layers = 3
    config.train_batch_size = 512
    config.eval_batch_size = 1000
    config.train_epochs = 100
    if "runlocal" in args:
        presets.apply_runlocal(config)
    return config
