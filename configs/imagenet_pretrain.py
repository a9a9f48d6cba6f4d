"""ImageNet SimCLR pretraining, v1 and v2 recipes.

Args (comma separated): a model r50_1x | r50_2x | r50_4x | r101_1x | r152_1x | r152_3x_sk | ...
(rDEPTH_WIDTHx[_sk]; default r50_1x), the recipe v1 | v2 (default v2, v1 when not given and
the model is r50_2x/r50_4x, which only v1 published), optional eNNN epochs, and runlocal.

v1 (SimCLR, arXiv 2002.05709: lr, weight decay and warmup from its 'Default setting'
paragraph; 1000 epochs as the models of its Table 6, the published 69.1 / 74.2 / 76.6
linear-eval numbers of R50 1x/2x/4x): 2-layer projection head,
LARS lr 0.3 x B/256 (4.8 at B=4096), weight decay 1e-6, 1000 epochs, 10 warmup epochs,
additive ('simclrv1') brightness.
v2 (SimCLRv2, arXiv 2006.10029, section 4 'Settings and Implementation Details', the numbers of
its Table 1 / the reference README's model table): 3-layer projection head, LARS lr
0.1 x sqrt(B) (6.4 at B=4096), weight decay 1e-4 (also the reference README's command), 800
epochs, warmup 5% of the epochs (40), multiplicative brightness; `_sk` models use selective
kernels (sk_ratio 0.0625) and ResNet-D.
Both: batch 4096, temperature 0.1, blur p=0.5, jitter strength 1.0. eNNN sets the epochs (v2
keeps 5% warmup).
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

V1_ONLY_MODELS = ("r50_2x", "r50_4x")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ImageNet pretraining config from 'model[,v1|v2][,eNNN][,runlocal]'."""
    args = presets.parse_args(arg)
    model = str(args.get("model", "r50_1x"))
    version = str(args.get("version", "v1" if model in V1_ONLY_MODELS else "v2"))
    config = common.get_base_config()
    config.mode = "pretrain"
    presets.set_model(config, model)
    apply_recipe(config, version)
    if "epochs" in args:
        config.train_epochs = int(args["epochs"])
        if version == "v2":
            config.warmup_epochs = 0.05 * config.train_epochs
    if args["runlocal"]:
        presets.apply_runlocal(config)
    return config


def apply_recipe(config: ml_collections.ConfigDict, version: str) -> None:
    """Sets the v1 or v2 pretraining hyperparameters; ValueError for another version."""
    if version not in ("v1", "v2"):
        raise ValueError(f"imagenet_pretrain recipe {version!r} is not known; accepted: v1, v2.")
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.image_size = 224
    config.train_batch_size = 4096
    config.eval_batch_size = 1024
    config.loss.temperature = 0.1
    config.optim.optimizer = "lars"
    config.checkpoint_every_steps = 5000
    if version == "v1":
        config.model.num_proj_layers = 2
        config.optim.learning_rate = 0.3
        config.optim.lr_scaling = "linear"
        config.optim.weight_decay = 1e-6
        config.train_epochs = 1000
        config.warmup_epochs = 10.0
        config.data.brightness_mode = "simclrv1"
    else:
        config.model.num_proj_layers = 3
        config.optim.learning_rate = 0.1
        config.optim.lr_scaling = "sqrt"
        config.optim.weight_decay = 1e-4
        config.train_epochs = 800
        config.warmup_epochs = 0.05 * config.train_epochs
        config.data.brightness_mode = "simclrv2"
