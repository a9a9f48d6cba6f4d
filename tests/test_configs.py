"""Every experiment config loads for each of its args and passes validation; durations."""

import importlib
import math

import pytest

from simclr_jax import dispatch, loop, modes, optim

CONFIG_ARGS = {
    "smoke": ["pretrain", "linear_eval", "finetune", "distill", "eval", None],
    "cifar10_pretrain": [None, "runlocal", "val", "val,runlocal"],
    "cifar10_linear_eval": [None, "runlocal", "val"],
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
    modes.validate_config(config)
    if arg and "runlocal" in arg:
        assert config.data.source == "bundled"
        assert config.train_steps > 0 and config.train_batch_size <= 64


def test_every_config_file_is_covered():
    import pathlib

    files = {p.stem for p in pathlib.Path("configs").glob("*.py")}
    assert files - {"__init__", "common", "presets"} == set(CONFIG_ARGS)


def test_proof_arms_differ_from_the_recipe_only_where_named():
    recipe = load("cifar10_pretrain", "val").to_dict()
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
    assert cifar.model.cifar_stem == "auto" and cifar.data.image_size == 32
    assert cifar.data.blur_prob == 0.0 and cifar.data.color_jitter_strength == 0.5
    assert (cifar.optim.learning_rate, cifar.optim.lr_scaling) == (1.0, "linear")
    assert cifar.optim.weight_decay == 1e-4 and cifar.warmup_epochs == 10
    assert cifar.model.num_proj_layers == 3 and cifar.model.resnet_depth == 18
    # The reference's protocol: all 50,000 training images, evaluated on the test images.
    assert (cifar.data.train_split, cifar.data.eval_split) == ("train", "test")
    val = load("cifar10_pretrain", "val")
    assert (val.data.train_split, val.data.eval_split) == ("train[:4500]", "train[4500:]")
    assert {k: v for k, v in val.to_dict().items() if k != "data"} == {
        k: v for k, v in cifar.to_dict().items() if k != "data"
    }
    v1, v2 = load("imagenet_pretrain", "r50_1x,v1"), load("imagenet_pretrain", "r50_1x,v2")
    assert (v1.model.num_proj_layers, v2.model.num_proj_layers) == (2, 3)
    # v1: 0.3 x B/256 = 4.8, wd 1e-6, 1000 epochs, 10 warmup epochs.
    assert (v1.optim.learning_rate, v1.optim.lr_scaling, v1.optim.weight_decay) == (
        0.3,
        "linear",
        1e-6,
    )
    assert (v1.train_epochs, v1.warmup_epochs, v1.train_batch_size) == (1000, 10, 4096)
    # v2: 0.1 x sqrt(B) = 6.4 at 4096, wd 1e-4, 800 epochs, 5% warmup.
    assert (v2.optim.learning_rate, v2.optim.lr_scaling, v2.optim.weight_decay) == (
        0.1,
        "sqrt",
        1e-4,
    )
    assert (v2.train_epochs, v2.warmup_epochs, v2.train_batch_size) == (800, 40, 4096)
    assert optim.scaled_learning_rate(0.1, 4096, "sqrt") == pytest.approx(6.4)
    assert optim.scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert load("imagenet_pretrain", "r50_1x,e100").warmup_epochs == 5
    for token in ("r50_1x,v1", "r50_1x,v2"):
        config = load("imagenet_pretrain", token)
        assert (config.loss.temperature, config.data.blur_prob) == (0.1, 0.5)
        assert config.optim.optimizer == "lars" and config.model.cifar_stem == "auto"
    sk = load("imagenet_pretrain", "r152_3x_sk")
    assert (sk.model.resnet_depth, sk.model.width_multiplier, sk.model.sk_ratio) == (152, 3, 0.0625)
    for lin, wd in (
        (load("cifar10_linear_eval", None), 0.0),
        (load("imagenet_linear_eval", None), 1e-6),
    ):
        assert lin.model.fine_tune_after_block == 4 and lin.optim.optimizer == "momentum"
        assert lin.optim.nesterov and lin.model.zero_init_logits_layer
        assert (lin.optim.learning_rate, lin.optim.lr_scaling) == (0.1, "linear")
        assert lin.optim.weight_decay == wd and lin.warmup_epochs == 0
    c10_lin = load("cifar10_linear_eval", None)
    assert (c10_lin.train_epochs, c10_lin.train_batch_size) == (100, 512)
    assert (c10_lin.data.train_split, c10_lin.data.eval_split) == ("train", "test")
    assert c10_lin.model.num_proj_layers == cifar.model.num_proj_layers
    assert load("imagenet_linear_eval", None).train_epochs == 90
    ft = load("imagenet_finetune", "1pct")
    assert ft.data.label_subset == "1pct" and ft.model.ft_proj_selector == 1
    assert (ft.optim.learning_rate, ft.optim.lr_scaling, ft.optim.weight_decay) == (
        0.005,
        "sqrt",
        0.0,
    )
    assert (ft.train_epochs, ft.train_batch_size, ft.warmup_epochs) == (60, 1024, 0)
    assert ft.model.zero_init_logits_layer
    assert load("imagenet_finetune", "10pct").train_epochs == 30
    assert load("imagenet_finetune", "100pct").data.label_subset == ""
    self_distill, small = (
        load("imagenet_distill", "1pct,r152_3x_sk,self"),
        load("imagenet_distill", "10pct"),
    )
    assert (self_distill.distill.temperature, small.distill.temperature) == (0.1, 1.0)
    assert self_distill.model.resnet_depth == 152 and small.model.resnet_depth == 50
    assert small.train_epochs == 400 and small.distill.alpha == 1.0
    assert small.data.label_subset == "" and small.distill.label_subset == "10pct"


PAPER_FT_LAYER_RULE = (
    "SimCLRv2 paper section 3: fine-tune from the first layer of the projection head for "
    "1%/10% of labeled examples, but from the input of the projection head when 100% labels "
    "are present"
)


@pytest.mark.parametrize("model", ["r50_1x", "r152_3x_sk"])
def test_finetune_layer_by_label_fraction_follows_the_paper(model):
    """v2 classifier input by label fraction, the paper's rule (PAPER_FT_LAYER_RULE):
    hiddens[1] (first head layer) for 1% and 10%, hiddens[0] (h, the head's input) for 100%."""
    for fraction, selector in (("1pct", 1), ("10pct", 1), ("100pct", 0)):
        config = load("imagenet_finetune", f"{fraction},{model},v2")
        assert config.model.num_proj_layers == 3
        assert config.model.ft_proj_selector == selector, PAPER_FT_LAYER_RULE
    # v1 has no head to fine-tune from: h at every fraction.
    assert load("imagenet_finetune", "100pct,r50_1x,v1").model.ft_proj_selector == 0


def test_runlocal_follows_the_cifar_stem_rule():
    for name, arg in (("cifar10_pretrain", "runlocal"), ("imagenet_pretrain", "runlocal")):
        config = load(name, arg)
        assert config.model.cifar_stem == "auto" and config.data.image_size == 32
        assert modes.resolve_config(config, _info()).model.cifar_stem is True
    big = load("imagenet_pretrain", None)
    assert modes.resolve_config(big, _info()).model.cifar_stem is False


def _info():
    from simclr_jax import data

    return data.DatasetInfo(num_classes=10, num_examples={"train": 100})


@pytest.mark.parametrize(
    "name,arg,match",
    [
        ("cifar10_pretrain", "tst", "cifar10_pretrain.py arg token 'tst'.*accepted: val, runlocal"),
        ("cifar10_linear_eval", "v2", "cifar10_linear_eval.py arg token 'v2'.*accepted: val"),
        ("imagenet_pretrain", "r50_1x,v3", "'v3'.*v1\\|v2"),
        ("imagenet_finetune", "2pct", "'2pct'.*1pct \\| 10pct \\| 100pct"),
    ],
)
def test_unknown_recipe_argument_names_the_accepted_values(name, arg, match):
    with pytest.raises(ValueError, match=match):
        load(name, arg)


def test_cifar_stem_auto_needs_an_integer_image_size():
    import ml_collections

    values = load("cifar10_pretrain", None).to_dict()
    values["data"]["image_size"] = 32.5  # e.g. a config built from JSON or a dict
    with pytest.raises(ValueError, match="needs a positive integer data.image_size, got 32.5"):
        modes.validate_config(ml_collections.ConfigDict(values))
    config = load("cifar10_pretrain", None)
    config.model.cifar_stem = "yes"
    with pytest.raises(ValueError, match="model.cifar_stem='yes'.*True, False, 'auto'"):
        modes.validate_config(config)
    config.model.cifar_stem = True  # overrides the 'auto' default
    modes.validate_config(config)


def test_unknown_arg_names_the_token():
    with pytest.raises(ValueError, match="bogus"):
        load("imagenet_pretrain", "r50_1x,bogus")
    with pytest.raises(ValueError, match="smoke.py arg"):
        load("smoke", "train")


def test_epochs_convert_to_steps():
    config = load("cifar10_pretrain", None)
    durations = loop.resolve_durations(config, 45_000)
    assert durations.total_steps == math.ceil(1000 * 45_000 / 512)
    assert durations.warmup_steps == round(10 * 45_000 / 512)
    config.train_steps, config.warmup_steps = 123, 7
    durations = loop.resolve_durations(config, 45_000)
    assert (durations.total_steps, durations.warmup_steps) == (123, 7)


def test_warmup_longer_than_training_is_rejected():
    config = load("smoke", "pretrain")
    config.train_steps, config.warmup_steps = 10, 20
    with pytest.raises(ValueError, match="warmup"):
        loop.resolve_durations(config, 3000)


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
        modes.validate_config(config)


def test_linear_eval_needs_init_checkpoint_and_frozen_encoder():
    config = load("smoke", "linear_eval")
    with pytest.raises(ValueError, match="init_checkpoint"):
        modes.validate_config(config)
    config.init_checkpoint = "/x"
    config.model.fine_tune_after_block = 2
    with pytest.raises(ValueError, match="fine_tune_after_block"):
        modes.validate_config(config)


def test_batch_not_divisible_by_devices_fails_before_compile(tmp_path):
    config = load("smoke", "pretrain")
    config.train_batch_size = 12  # 8 simulated devices
    with pytest.raises(ValueError, match="train_batch_size=12"):
        dispatch.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
