"""Every experiment config loads for each of its args and passes validation; durations."""

import importlib
import math

import pytest

from simclr_jax import train

CONFIG_ARGS = {
    "smoke": ["pretrain", "linear_eval", "finetune", "distill", "eval", None],
    "cifar10_pretrain": [None, "runlocal"],
    "cifar10_linear_eval": [None, "runlocal"],
    "cifar10_proof": [None, "simclr", "no_head", "no_jitter"],
    "imagenet_pretrain": [
        None,
        "r50_1x",
        "r50_2x",
        "r50_4x",
        "r152_3x_sk",
        "r50_1x,v1",
        "r101_1x,v2,e100",
        "r50_1x,runlocal",
        "r152_3x_sk,runlocal",
    ],
    "imagenet_linear_eval": [None, "r50_1x", "r152_3x_sk", "r50_4x", "r50_1x,runlocal"],
    "imagenet_finetune": [None, "1pct", "10pct", "100pct", "1pct,r152_3x_sk", "10pct,runlocal"],
    "imagenet_distill": [None, "1pct", "10pct,r152_3x_sk,self", "1pct,r50_1x", "10pct,runlocal"],
}


def load(name, arg):
    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize(
    "name,arg", [(name, arg) for name, args in CONFIG_ARGS.items() for arg in args]
)
def test_config_loads_and_validates(name, arg):
    config = load(name, arg)
    if config.mode != "pretrain":
        config.init_checkpoint = "/some/pretraining/workdir"
    if config.mode == "distill":
        config.distill.teacher_checkpoint = "/some/finetuning/workdir"
    train.validate_config(config)
    if arg and "runlocal" in arg:
        assert config.data.source == "bundled"
        assert config.train_steps > 0 and config.train_batch_size <= 64


def test_every_config_file_is_covered():
    import pathlib

    files = {p.stem for p in pathlib.Path("configs").glob("*.py")}
    assert files - {"__init__", "common", "presets"} == set(CONFIG_ARGS)


def test_proof_arms_differ_from_the_recipe_only_where_named():
    recipe = load("cifar10_pretrain", None).to_dict()
    arms = {arm: load("cifar10_proof", arm) for arm in ("simclr", "no_head", "no_jitter")}
    for config in arms.values():
        # Validation is the last 500 images per class by file name (disjointness of the two
        # folder splits: tests/test_data.py); frozen_eval's train split sits inside train[:4500].
        assert (config.data.train_split, config.data.eval_split) == ("train[:4500]", "train[4500:]")
        assert config.train_steps == arms["simclr"].train_steps > 0
    assert arms["simclr"].model.to_dict() == recipe["model"]
    assert arms["simclr"].data.to_dict() == recipe["data"]
    assert arms["no_head"].model.proj_head_mode == "none"
    assert arms["no_jitter"].data.color_jitter_prob == 0.0
    assert arms["no_jitter"].data.grayscale_prob == recipe["data"]["grayscale_prob"]


def test_recipe_values():
    cifar = load("cifar10_pretrain", None)
    assert (cifar.train_batch_size, cifar.train_epochs, cifar.loss.temperature) == (512, 1000, 0.5)
    assert cifar.model.cifar_stem and cifar.data.blur_prob == 0.0
    assert cifar.data.color_jitter_strength == 0.5 and cifar.optim.weight_decay == 1e-4
    assert cifar.data.train_split == "train[:4500]" and cifar.data.eval_split == "train[4500:]"
    v1, v2 = load("imagenet_pretrain", "r50_1x,v1"), load("imagenet_pretrain", "r50_1x,v2")
    assert (v1.model.num_proj_layers, v2.model.num_proj_layers) == (2, 3)
    sk = load("imagenet_pretrain", "r152_3x_sk")
    assert (sk.model.resnet_depth, sk.model.width_multiplier, sk.model.sk_ratio) == (152, 3, 0.0625)
    lin = load("cifar10_linear_eval", None)
    assert lin.model.fine_tune_after_block == 4 and lin.optim.optimizer == "momentum"
    assert lin.optim.learning_rate == 0.1 and lin.optim.weight_decay == 0.0
    ft = load("imagenet_finetune", "1pct")
    assert ft.data.label_subset == "1pct" and ft.model.ft_proj_selector == 1
    assert load("imagenet_finetune", "100pct").data.label_subset == ""
    self_distill, small = (
        load("imagenet_distill", "1pct,r152_3x_sk,self"),
        load("imagenet_distill", "10pct"),
    )
    assert (self_distill.distill.temperature, small.distill.temperature) == (0.1, 1.0)
    assert self_distill.model.resnet_depth == 152 and small.model.resnet_depth == 50
    assert small.train_epochs == 400 and small.distill.alpha == 1.0
    assert small.data.label_subset == "" and small.distill.label_subset == "10pct"


def test_unknown_arg_names_the_token():
    with pytest.raises(ValueError, match="bogus"):
        load("imagenet_pretrain", "r50_1x,bogus")
    with pytest.raises(ValueError, match="smoke.py arg"):
        load("smoke", "train")


def test_epochs_convert_to_steps():
    config = load("cifar10_pretrain", None)
    durations = train.resolve_durations(config, 45_000)
    assert durations.total_steps == math.ceil(1000 * 45_000 / 512)
    assert durations.warmup_steps == round(10 * 45_000 / 512)
    config.train_steps, config.warmup_steps = 123, 7
    durations = train.resolve_durations(config, 45_000)
    assert (durations.total_steps, durations.warmup_steps) == (123, 7)


def test_warmup_longer_than_training_is_rejected():
    config = load("smoke", "pretrain")
    config.train_steps, config.warmup_steps = 10, 20
    with pytest.raises(ValueError, match="warmup"):
        train.resolve_durations(config, 3000)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("mode", "train", "mode='train'"),
        ("train_batch_size", 0, "train_batch_size"),
        ("knn_temperature", 0.0, "knn_temperature"),
        ("keep_checkpoints", 0, "keep_checkpoints"),
    ],
)
def test_bad_values_name_the_field(field, value, match):
    config = load("smoke", "pretrain")
    config[field] = value
    with pytest.raises(ValueError, match=match):
        train.validate_config(config)


def test_linear_eval_needs_init_checkpoint_and_frozen_encoder():
    config = load("smoke", "linear_eval")
    with pytest.raises(ValueError, match="init_checkpoint"):
        train.validate_config(config)
    config.init_checkpoint = "/x"
    config.model.fine_tune_after_block = 2
    with pytest.raises(ValueError, match="fine_tune_after_block"):
        train.validate_config(config)


def test_batch_not_divisible_by_devices_fails_before_compile(tmp_path):
    config = load("smoke", "pretrain")
    config.train_batch_size = 12  # 8 simulated devices
    with pytest.raises(ValueError, match="train_batch_size=12"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
