"""Shared pieces of the experiment configs: argument parsing, model presets, runlocal overrides."""

from __future__ import annotations

import re

import ml_collections

# 'r50_1x', 'r152_3x_sk', 'r18_1x' ... -> depth, width, selective kernels.
MODEL_TOKEN = re.compile(r"^r(\d+)_(\d)x(_sk)?$")
SK_RATIO = 0.0625


def parse_args(arg: str | None, allowed: tuple[str, ...] = ()) -> dict[str, str | bool]:
    """Splits 'r50_1x,runlocal,v1' into named parts; ValueError naming any unknown token."""
    parsed: dict[str, str | bool] = {"runlocal": False}
    for token in [t.strip() for t in (arg or "").split(",") if t.strip()]:
        if token == "runlocal":
            parsed["runlocal"] = True
        elif MODEL_TOKEN.match(token):
            parsed["model"] = token
        elif token in ("v1", "v2"):
            parsed["version"] = token
        elif re.fullmatch(r"e\d+", token):
            parsed["epochs"] = token[1:]
        elif token in allowed:
            parsed["variant"] = token
        else:
            raise ValueError(
                f"config arg token {token!r} is not understood; use a model like r50_1x or "
                f"r152_3x_sk, v1|v2, eNNN (epochs), runlocal{', ' if allowed else ''}"
                f"{' | '.join(allowed)}, joined by commas (e.g. 'r50_1x,runlocal')."
            )
    return parsed


def set_model(config: ml_collections.ConfigDict, token: str) -> None:
    """Sets resnet_depth, width_multiplier and sk_ratio from a token like 'r152_3x_sk'."""
    match = MODEL_TOKEN.match(token)
    if match is None:
        raise ValueError(f"model token {token!r} must look like r50_1x or r152_3x_sk.")
    config.model.resnet_depth = int(match.group(1))
    config.model.width_multiplier = int(match.group(2))
    config.model.sk_ratio = SK_RATIO if match.group(3) else 0.0


def cifar10_data(config: ml_collections.ConfigDict) -> None:
    """CIFAR-10 image folder with the last 500 images of each class held out for validation.
    Pass --config.data.data_dir=<dir holding train/> (extract ../shared/data's tarball)."""
    config.data.source = "folder"
    config.data.name = "cifar10"
    config.data.data_dir = ""
    config.data.train_split = "train[:4500]"
    config.data.eval_split = "train[4500:]"
    config.data.image_size = 32
    config.data.color_jitter_strength = 0.5
    config.data.blur_prob = 0.0
    config.data.shuffle_buffer = 50_000


def linear_eval_protocol(config: ml_collections.ConfigDict) -> None:
    """The reference linear evaluation: frozen encoder (BN in inference mode), classifier on h,
    Nesterov momentum, lr 0.1 x B/256, no weight decay, no warmup."""
    config.mode = "linear_eval"
    config.model.fine_tune_after_block = 4
    config.model.ft_proj_selector = 0
    config.warmup_epochs = 0.0
    config.optim.optimizer = "momentum"
    config.optim.nesterov = True
    config.optim.learning_rate = 0.1
    config.optim.lr_scaling = "linear"
    config.optim.weight_decay = 0.0


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
    """Tiny CPU variant: bundled sample, ResNet-18 at 32 px, a handful of steps, no sharding
    demands (the smallest batch that still splits over 8 simulated devices)."""
    config.data.source = "bundled"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.label_subset = ""
    config.data.image_size = 32
    config.data.blur_prob = 0.0
    config.data.shuffle_buffer = 1000
    config.model.resnet_depth = 18
    config.model.width_multiplier = 1
    config.model.sk_ratio = 0.0
    config.model.cifar_stem = False
    config.model.dtype = "float32"
    config.train_batch_size = 16
    config.eval_batch_size = 64
    config.train_steps = 4
    config.warmup_steps = 1
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 2
    config.knn_k = 20
    config.mesh.fsdp_min_size = 0
