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

import ml_collections

from simclr_jax import presets
from simclr_jax.config import get_base_config, parse_arg

ARGS = ("val", "runlocal")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The CIFAR-10 pretraining config from '[val][,runlocal]'."""
    args = parse_arg(arg, "cifar10_pretrain.py", flags=ARGS).flags
    config = get_base_config()
    presets.cifar10_pretrain_recipe(config, "val" if "val" in args else "test")
    if "runlocal" in args:
        presets.apply_runlocal(config)
    return config
