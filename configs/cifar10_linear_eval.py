"""CIFAR-10 linear evaluation of a cifar10_pretrain checkpoint (frozen encoder, linear head).

Nesterov momentum, lr 0.1 x B/256, no weight decay, 100 epochs, crop + flip, batch 512.
Pass --config.init_checkpoint=<pretraining workdir>.

Args: '' or 'runlocal'.
"""

from __future__ import annotations

try:
    from configs import common, presets
except ImportError:  # loaded by path from outside the repository root
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import common, presets

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The CIFAR-10 linear-eval config; arg 'runlocal' for the tiny CPU variant."""
    args = presets.parse_args(arg)
    config = common.get_base_config()
    presets.cifar10_data(config)
    presets.linear_eval_protocol(config)
    config.model.resnet_depth = 18
    config.model.width_multiplier = 1
    config.model.cifar_stem = True
    config.model.num_proj_layers = 2
    config.train_batch_size = 512
    config.eval_batch_size = 1000
    config.train_epochs = 100
    if args["runlocal"]:
        presets.apply_runlocal(config)
    return config
