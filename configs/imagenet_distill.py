"""ImageNet distillation (SimCLRv2 stage 3): a fine-tuned teacher labels all of ImageNet's
training images; a student learns its temperature-scaled predictions.

Args (comma separated): the label fraction the teacher was fine-tuned on, 1pct | 10pct
(default 10pct); the student model token as in imagenet_pretrain (default r50_1x); `self` for
self-distillation (student = teacher architecture: pass the teacher's token, e.g.
'1pct,r152_3x_sk,self'), else big-to-small; runlocal. Pass
--config.distill.teacher_checkpoint=<imagenet_finetune workdir> and, as in the paper,
--config.init_checkpoint=<SimCLRv2 pretraining workdir of the student architecture> (empty:
the student starts from scratch, which the paper does not do).

Numbers and where they come from (SimCLRv2 paper, Chen et al. 2020, "Big Self-Supervised
Models are Strong Semi-Supervised Learners"):
- only unlabeled examples (distill.alpha 1): section 3, "for distillation, we only use unlabeled
  examples, unless otherwise specified"; eq. 3's labelled term is optional (distill.alpha < 1
  with distill.label_subset = the fraction).
- temperature 0.1 for self-distillation, 1.0 for big-to-small: section 3.
- 400 epochs; learning rate schedule, weight decay and batch size as pretraining (taken from
  imagenet_pretrain's v2 recipe, so they follow it): section 3.
- warmup: 5% of the epochs like v2 pretraining (20 epochs); the paper says only "the same
  learning rate schedule". NOT STATED exactly.
- student without projection head (classifier on h, model.proj_head_mode 'none'): section 3,
  "the same model architecture as the teacher (excluding projection head)"; only the linear head
  is randomly initialized (section 3), hence init_checkpoint. A zero-initialized classifier is
  NOT STATED (we keep fine-tuning's choice).
- augmentation: random crop and flip as in fine-tuning (the mode always uses it): section 3.
- what to expect (Table 3, ImageNet top-1, 1% / 10% labels): R152 3x SK self-distilled 76.6 /
  80.9; distilled into R50 1x 73.9 / 77.5.
"""

from __future__ import annotations

import ml_collections

from simclr_jax import presets
from simclr_jax.config import get_base_config, parse_arg

FRACTIONS = ("1pct", "10pct")
EPOCHS = 400
WARMUP_FRACTION = 0.05
TEMPERATURE = {"self": 0.1, "big_to_small": 1.0}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ImageNet distillation config from 'fraction[,student model][,self][,runlocal]'."""
    args = parse_arg(
        arg, "imagenet_distill.py", variants=FRACTIONS, flags=("self", "runlocal"), model=True
    )
    self_distill = "self" in args.flags
    fraction = args.variant or "10pct"
    config = get_base_config()
    presets.set_model(config, args.model or "r50_1x")
    presets.imagenet_pretrain_recipe(config, "v2")  # batch, optimizer, LR scaling, weight decay
    config.mode = "distill"
    config.model.proj_head_mode = "none"
    config.model.ft_proj_selector = 0
    config.model.fine_tune_after_block = -1
    config.model.zero_init_logits_layer = True
    config.data.label_subset = ""  # the whole training split, unlabeled
    config.train_epochs = EPOCHS
    config.warmup_epochs = WARMUP_FRACTION * EPOCHS
    config.distill.temperature = TEMPERATURE["self" if self_distill else "big_to_small"]
    config.distill.alpha = 1.0
    config.distill.labeled_split = "train"  # used when alpha < 1
    config.distill.label_subset = fraction
    if args.runlocal:
        presets.apply_runlocal(config)
        config.distill.label_subset = ""
        config.distill.labeled_split = "train[:10]"
    return config
