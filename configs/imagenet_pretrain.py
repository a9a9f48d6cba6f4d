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

import ml_collections

from simclr_jax import presets
from simclr_jax.config import get_base_config, parse_arg

V1_ONLY_MODELS = ("r50_2x", "r50_4x")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ImageNet pretraining config from 'model[,v1|v2][,eNNN][,runlocal]'."""
    args = parse_arg(
        arg, "imagenet_pretrain.py", flags=("runlocal",), model=True, version=True, epochs=True
    )
    model = args.model or "r50_1x"
    version = args.version or ("v1" if model in V1_ONLY_MODELS else "v2")
    config = get_base_config()
    config.mode = "pretrain"
    presets.set_model(config, model)
    presets.imagenet_pretrain_recipe(config, version)
    if args.epochs is not None:
        config.train_epochs = args.epochs
        if version == "v2":
            config.warmup_epochs = 0.05 * config.train_epochs
    if args.runlocal:
        presets.apply_runlocal(config)
    return config
