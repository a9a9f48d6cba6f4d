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


# CIFAR-10 protocols: 'test' = the reference's (train on all 50,000 training images, evaluate
# on the 10,000 test images); 'val' = the last 500 training images of each class (by file name)
# held out, for tuning and for machines that only have the training images.
CIFAR10_SPLITS = {
    "test": ("train", "test"),
    "val": ("train[:4500]", "train[4500:]"),
}


def parse_flags(arg: str | None, accepted: tuple[str, ...], field: str) -> set[str]:
    """Splits 'val,runlocal' into a set; ValueError naming `field` and the accepted tokens."""
    tokens = {t.strip() for t in (arg or "").split(",") if t.strip()}
    unknown = sorted(tokens - set(accepted))
    if unknown:
        raise ValueError(
            f"{field} arg token {unknown[0]!r} is not known; accepted: {', '.join(accepted)} "
            "(comma separated, or none)."
        )
    return tokens


def cifar10_data(config: ml_collections.ConfigDict, protocol: str = "test") -> None:
    """CIFAR-10 image folder, protocol 'test' (train -> test, the reference) or 'val' (the last
    500 training images of each class held out). Pass --config.data.data_dir=<dir holding
    train/ (and test/)> (extract ../shared/data's tarball)."""
    if protocol not in CIFAR10_SPLITS:
        raise ValueError(
            f"CIFAR-10 protocol {protocol!r} is not known; accepted: {', '.join(CIFAR10_SPLITS)}."
        )
    config.data.source = "folder"
    config.data.name = "cifar10"
    config.data.data_dir = ""
    config.data.train_split, config.data.eval_split = CIFAR10_SPLITS[protocol]


def cifar10_augmentation(config: ml_collections.ConfigDict) -> None:
    """The reference CIFAR-10 command's input: 32 px, colour jitter strength 0.5, no blur."""
    config.data.image_size = 32
    config.data.color_jitter_strength = 0.5
    config.data.blur_prob = 0.0
    config.data.shuffle_buffer = 50_000


def linear_eval_protocol(config: ml_collections.ConfigDict, weight_decay: float = 0.0) -> None:
    """The reference linear evaluation (its README's commands): frozen encoder (BN in inference
    mode), zero-initialised classifier on h, Nesterov momentum, lr 0.1 x B/256, no warmup;
    weight_decay 0 for CIFAR-10, 1e-6 for ImageNet."""
    config.mode = "linear_eval"
    config.model.fine_tune_after_block = 4
    config.model.ft_proj_selector = 0
    config.model.zero_init_logits_layer = True
    config.warmup_epochs = 0.0
    config.optim.optimizer = "momentum"
    config.optim.nesterov = True
    config.optim.learning_rate = 0.1
    config.optim.lr_scaling = "linear"
    config.optim.weight_decay = weight_decay


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
    config.model.cifar_stem = "auto"  # on at 32 px, as the reference decides
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
