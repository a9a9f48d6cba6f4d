"""ImageNet semi-supervised fine-tuning (SimCLRv2): restore the encoder and the head layers the
classifier reads, train all.

Args: the label fraction 1pct | 10pct | 100pct (default 10pct), a model token as in
imagenet_pretrain (default r50_1x), optional v1|v2, runlocal. Comma separated, e.g.
'1pct,r152_3x_sk'. v2: classifier on the first projection-head layer (ft_proj_selector 1) for
1% and 10% of the labels, on the head's input h (selector 0) for 100%, as SimCLRv2 section 3
says: "we fine-tune from the first layer of the projection head for 1%/10% of labeled examples,
but from the input of the projection head when 100% labels are present"; v1: on h. LARS, lr
0.005 x sqrt(B) (0.16 at B=1024), no weight decay, no warmup, zero-initialized classifier; 60
epochs for 1%, 30 for 10% and 100%. Pass --config.init_checkpoint=<pretrain workdir>.
"""

from __future__ import annotations

import ml_collections

from simclr_jax import presets
from simclr_jax.config import get_base_config, parse_arg

FRACTIONS = ("1pct", "10pct", "100pct")
EPOCHS = {"1pct": 60, "10pct": 30, "100pct": 30}
# hiddens[j] the classifier reads (0: h, the head's input; 1: the first head layer's output).
# v2 follows the paper's rule: first head layer for 1%/10% of the labels, h for 100%.
FT_PROJ_SELECTOR = {
    "v1": {"1pct": 0, "10pct": 0, "100pct": 0},
    "v2": {"1pct": 1, "10pct": 1, "100pct": 0},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ImageNet fine-tuning config from 'fraction[,model][,v1|v2][,runlocal]'."""
    args = parse_arg(
        arg,
        "imagenet_finetune.py",
        variants=FRACTIONS,
        flags=("runlocal",),
        model=True,
        version=True,
    )
    fraction = args.variant or "10pct"
    model = args.model or "r50_1x"
    version = args.version or ("v1" if model in ("r50_2x", "r50_4x") else "v2")
    config = get_base_config()
    config.mode = "finetune"
    presets.set_model(config, model)
    config.model.num_proj_layers = 2 if version == "v1" else 3
    config.model.fine_tune_after_block = -1
    config.model.ft_proj_selector = FT_PROJ_SELECTOR[version][fraction]
    config.model.zero_init_logits_layer = True
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.label_subset = "" if fraction == "100pct" else fraction
    config.train_batch_size = 1024
    config.eval_batch_size = 1024
    config.train_epochs = EPOCHS[fraction]
    config.warmup_epochs = 0.0
    config.optim.optimizer = "lars"
    config.optim.learning_rate = 0.005
    config.optim.lr_scaling = "sqrt"
    config.optim.weight_decay = 0.0
    config.checkpoint_every_steps = 5000
    if args.runlocal:
        presets.apply_runlocal(config)
    return config
