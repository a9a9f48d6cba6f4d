"""Reference parity (docs/reference_parity.md): the supervised head outside LARS under the real
recipes, and the zero-initialised classifier reaching what plain momentum reaches."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import loop

WD = 1e-3  # large enough that a missing or doubled decay term shows


def load(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def _params():
    """A tree with the model's own paths: encoder conv + BN, head layer, classifier."""
    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "encoder": {
            "stem": {"conv1": {"conv": {"kernel": arr(3, 3, 3, 8)}}},
            "stage1": {"block0": {"conv1": {"bn": {"scale": arr(8), "bias": arr(8)}}}},
        },
        "projection_head": {"layer1": {"dense": {"kernel": arr(8, 8)}}},
        "classifier": {"kernel": arr(8, 10), "bias": arr(10)},
    }


def _two_steps(config):
    params = _params()
    grads = [
        jax.tree.map(lambda p, s=s: jnp.full_like(p, 0.3) * s + 0.05 * p, params)
        for s in (1.0, -2.0)
    ]
    tx, schedule = loop.create_optimizer(config, loop.Durations(100, 0, 1.0))
    state = tx.init(params)
    history = [params]
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, grads, [float(schedule(0)), float(schedule(1))]


def _leaf(tree, *path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree, np.float64)


@pytest.mark.parametrize(
    "name,arg,mode",
    [
        ("imagenet_pretrain", "r50_1x,v2", "pretrain"),
        ("imagenet_pretrain", "r50_1x,v1", "pretrain"),
        ("cifar10_pretrain", None, "pretrain"),
        ("imagenet_finetune", "1pct", "finetune"),
    ],
)
def test_classifier_gets_plain_momentum_under_lars_recipes(name, arg, mode):
    config = load(name, arg)
    assert config.optim.optimizer == "lars" and config.mode == mode
    config.optim.weight_decay = WD
    history, grads, lrs = _two_steps(config)
    m = config.optim.momentum
    # Classifier kernel: TF-classic momentum on g + wd*w at the full LR, no trust ratio.
    w0 = _leaf(history[0], "classifier", "kernel")
    g0 = _leaf(grads[0], "classifier", "kernel") + WD * w0
    v = lrs[0] * g0
    np.testing.assert_allclose(
        _leaf(history[1], "classifier", "kernel"), w0 - v, rtol=1e-5, atol=1e-6
    )
    w1 = w0 - v
    v = m * v + lrs[1] * (_leaf(grads[1], "classifier", "kernel") + WD * w1)
    np.testing.assert_allclose(
        _leaf(history[2], "classifier", "kernel"), w1 - v, rtol=1e-5, atol=1e-6
    )
    # Classifier bias and BN: plain momentum on g alone (no decay, no trust ratio).
    for path in (("classifier", "bias"), ("encoder", "stage1", "block0", "conv1", "bn", "scale")):
        want = _leaf(history[0], *path) - lrs[0] * _leaf(grads[0], *path)
        np.testing.assert_allclose(_leaf(history[1], *path), want, rtol=1e-5)
    # Encoder / head kernels keep LARS: the step is lr * eta * ||w|| / ||g + wd*w|| * (g + wd*w).
    for path in (
        ("encoder", "stem", "conv1", "conv", "kernel"),
        ("projection_head", "layer1", "dense", "kernel"),
    ):
        w, g = _leaf(history[0], *path), _leaf(grads[0], *path)
        g = g + WD * w
        trust = config.optim.trust_coefficient * np.linalg.norm(w) / np.linalg.norm(g)
        np.testing.assert_allclose(_leaf(history[1], *path), w - lrs[0] * trust * g, rtol=1e-5)
        assert trust < 0.01  # so the classifier check above could not pass by accident


def test_linear_eval_classifier_gets_nesterov_momentum_with_l2():
    config = load("imagenet_linear_eval")
    assert config.optim.optimizer == "momentum" and config.optim.weight_decay == 1e-6
    config.optim.weight_decay = WD
    history, grads, lrs = _two_steps(config)
    m = config.optim.momentum
    for path in (("classifier", "kernel"), ("classifier", "bias")):
        g = _leaf(grads[0], *path) + WD * _leaf(history[0], *path)
        want = _leaf(history[0], *path) - lrs[0] * (1 + m) * g  # Nesterov from zero momentum
        np.testing.assert_allclose(_leaf(history[1], *path), want, rtol=1e-5)
    # The frozen encoder does not move, not even by weight decay.
    for path in (("encoder", "stem", "conv1", "conv", "kernel"),):
        np.testing.assert_array_equal(_leaf(history[2], *path), _leaf(history[0], *path))


def _convex_problem():
    """Fixed features of 4 linearly separable-ish classes and their labels."""
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 32)) * 2.0
    labels = rng.integers(0, 4, size=256)
    features = centers[labels] + rng.normal(size=(256, 32))
    return jnp.asarray(features, jnp.float32), jnp.asarray(labels)


def _train_classifier(tx, steps=300):
    features, labels = _convex_problem()
    params = {"classifier": {"kernel": jnp.zeros((32, 4)), "bias": jnp.zeros((4,))}}

    def loss_fn(p):
        logits = features @ p["classifier"]["kernel"] + p["classifier"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return float(loss_fn(params))


def test_zero_initialised_classifier_under_finetune_recipe_matches_plain_momentum():
    config = load("imagenet_finetune", "1pct")
    assert config.model.zero_init_logits_layer and config.optim.optimizer == "lars"
    config.train_batch_size = 256  # lr 0.005 * sqrt(256) = 0.08
    durations = loop.Durations(300, 0, 1.0)
    tx, schedule = loop.create_optimizer(config, durations)
    recipe_loss = _train_classifier(tx)
    plain = optax.chain(optax.scale_by_learning_rate(schedule), optax.trace(decay=0.9))
    plain_loss = _train_classifier(plain)
    np.testing.assert_allclose(recipe_loss, plain_loss, rtol=1e-4)
    # The old rule (trust ratio on the classifier) stays near log(4) = 1.39 from a zero init.
    trusted = optax.lars(schedule, trust_coefficient=0.001, eps=0.0, momentum=0.9)
    assert plain_loss < 0.5 * _train_classifier(trusted)
    assert plain_loss < 0.3


@pytest.fixture(scope="module")
def train_only_folder(tmp_path_factory):
    """train/<class>/*.png, 3 classes x 4 images, and no test/ folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("train_only")
    for name in ("cat", "dog", "emu"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(root / "train" / name / f"{i}.png")
    return str(root)


def test_folder_without_test_split_names_the_val_protocol(train_only_folder):
    from simclr_jax import data

    config = load("cifar10_pretrain")
    config.data.data_dir = train_only_folder
    with pytest.raises(ValueError, match="eval_split='test'.*':val' protocol"):
        data.get_dataset_info(config.data)


def test_val_protocol_on_too_few_images_per_class_is_an_error(train_only_folder):
    from simclr_jax import data

    config = load("cifar10_pretrain", "val")
    config.data.data_dir = train_only_folder
    with pytest.raises(ValueError, match="class 'cat' has 4 images.*':val' protocol"):
        data.get_dataset_info(config.data)
