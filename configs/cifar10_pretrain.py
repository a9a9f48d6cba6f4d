"""CIFAR-10 SimCLR pretraining, the reference recipe (about 91% linear eval after 1000 epochs).

The command of the reference README (google-research/simclr, 'Pretraining' on CIFAR-10):
ResNet-18 with the CIFAR stem (model.cifar_stem 'auto' at 32 px), the default 3-layer projection
head, 32 px, batch 512, 1000 epochs, LARS lr 1.0 x B/256, weight decay 1e-4, temperature 0.5,
colour jitter 0.5, no blur, 10 warmup epochs; trained on all 50,000 training images, evaluated
on the 10,000 test images. Data: the CIFAR-10 JPEG image folder (pass
--config.data.data_dir=<dir holding train/ and test/>).

Args (comma separated): 'val' trains on train[:4500] and evaluates on train[4500:] (the last 500
images of each class by file name held out: for tuning, and for machines with the training
images only); 'runlocal' (tiny CPU variant on the bundled sample).
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

ARGS = ("val", "runlocal")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The CIFAR-10 pretraining config from '[val][,runlocal]'."""
    args = presets.parse_flags(arg, ARGS, "cifar10_pretrain.py")
    config = common.get_base_config()
    config.mode = "pretrain"
    presets.cifar10_data(config, "val" if "val" in args else "test")
    presets.cifar10_augmentation(config)
    config.model.resnet_depth = 18
    config.model.width_multiplier = 1
    config.model.cifar_stem = "auto"
    config.model.num_proj_layers = 3
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
    if "runlocal" in args:
        presets.apply_runlocal(config)
    return config
