"""ImageNet linear evaluation: frozen encoder (BN in inference mode), linear classifier on h.

Args: a model token as in imagenet_pretrain (default r50_1x), optional v1|v2 and runlocal.
The reference README's command ('Finetuning the linear head' on ImageNet): Nesterov momentum,
lr 0.1 x B/256, weight decay 1e-6, zero-initialised classifier, batch 4096, 90 epochs, no
warmup, crop + flip. Pass --config.init_checkpoint=<pretraining workdir> (same model token).
"""

from __future__ import annotations

import ml_collections

from simclr_jax import presets
from simclr_jax.config import get_base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ImageNet linear-eval config from 'model[,v1|v2][,runlocal]'."""
    args = parse_arg(arg, "imagenet_linear_eval.py", flags=("runlocal",), model=True, version=True)
    model = args.model or "r50_1x"
    version = args.version or ("v1" if model in ("r50_2x", "r50_4x") else "v2")
    config = get_base_config()
    presets.linear_eval_protocol(config, weight_decay=1e-6)
    presets.set_model(config, model)
    config.model.num_proj_layers = 2 if version == "v1" else 3
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.train_batch_size = 4096
    config.eval_batch_size = 1024
    config.train_epochs = 90
    config.checkpoint_every_steps = 5000
    if args.runlocal:
        presets.apply_runlocal(config)
    return config
