"""CIFAR-10 SimCLR pretraining, the reference recipe (about 91% linear eval after 1000 epochs).

ResNet-18 with the CIFAR stem, 32 px, batch 512, 1000 epochs, LARS lr 1.0 x B/256, weight decay
1e-4, temperature 0.5, colour jitter 0.5, no blur, 10 warmup epochs. Data: the CIFAR-10 JPEG
image folder (extract ../shared/data/cifar10-train-jpeg.tar.gz and pass
--config.data.data_dir=<dir holding train/>); validation = the last 500 images of every class.

Args: '' or 'runlocal' (tiny CPU variant on the bundled sample).
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
    """The CIFAR-10 pretraining config; arg 'runlocal' for the tiny CPU variant."""
    args = presets.parse_args(arg)
    config = common.get_base_config()
    config.mode = "pretrain"
    presets.cifar10_data(config)
    config.model.resnet_depth = 18
    config.model.width_multiplier = 1
    config.model.cifar_stem = True
    config.model.num_proj_layers = 2
    config.train_batch_size = 512
    config.eval_batch_size = 1000
    config.train_epochs = 1000
    config.warmup_epochs = 10.0
    config.loss.temperature = 0.5
    config.optim.optimizer = "lars"
    config.optim.learning_rate = 1.0
    config.optim.lr_scaling = "linear"
    config.optim.weight_decay = 1e-4
    config.checkpoint_every_steps = 5000
    if args["runlocal"]:
        presets.apply_runlocal(config)
    return config
