"""Recipe pieces the experiment configs in configs/ share: model tokens, data protocols,
the ImageNet pretraining recipes, the reference linear evaluation and the runlocal overrides.
Each one edits a config built by simclr_jax.config.get_base_config() in place.
"""

from __future__ import annotations

import ml_collections

from simclr_jax.config import MODEL_TOKEN

SK_RATIO = 0.0625


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


def imagenet_pretrain_recipe(config: ml_collections.ConfigDict, version: str) -> None:
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


def cifar10_pretrain_recipe(config: ml_collections.ConfigDict, protocol: str = "test") -> None:
    """The reference CIFAR-10 pretraining command (configs/cifar10_pretrain.py) on `protocol`'s
    splits: ResNet-18, CIFAR stem at 32 px, batch 512, 1000 epochs, LARS lr 1.0, temperature 0.5."""
    config.mode = "pretrain"
    cifar10_data(config, protocol)
    cifar10_augmentation(config)
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
