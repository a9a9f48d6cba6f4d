"""Tests for simclr_jax.models: encoder, heads, SimCLR wrapper and create_model validation.

Big models are only traced (jax.eval_shape: no memory, no compile); everything that runs uses
ResNet-18 at width 1 on 32 px images with batch 4, or single modules on tiny tensors checked
against NumPy re-derivations written here.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import INIT_KEY, abstract_variables, model_config, np_softmax

from simclr_jax.config import get_base_config
from simclr_jax.models import (
    ProjectionHead,
    ResNet,
    SimCLR,
    conv,
    create_model,
    supervised_head,
    validate_model_config,
)
from simclr_jax.models.resnet import (
    BottleneckBlock,
    SelectiveKernelConv,
    Shortcut,
    SqueezeExcite,
    Stage,
    Stem,
)

NUM_CLASSES = 10
BATCH = 4


def count_params(tree):
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def flat(tree):
    """{'a/b/c': leaf} view of a nested dict."""
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (BATCH, 32, 32, 3), jnp.float32)


@pytest.fixture(scope="module")
def labels():
    return jnp.arange(BATCH, dtype=jnp.int32) % NUM_CLASSES


@pytest.fixture(scope="module")
def r18_variables(images):
    """Real init of the CIFAR ResNet-18 SimCLR model (same tree for every mode and dtype)."""
    model = create_model(model_config(), num_classes=NUM_CLASSES)
    return jax.jit(model.init)(INIT_KEY, images)


@pytest.fixture(scope="module")
def r18_variables_all_gammas_one(r18_variables):
    """r18 variables with every BN scale set to 1, so every encoder weight gets a gradient."""
    params = flax.traverse_util.flatten_dict(r18_variables["params"])
    params = {k: (jnp.ones_like(v) if k[-1] == "scale" else v) for k, v in params.items()}
    return {
        "params": flax.traverse_util.unflatten_dict(params),
        "batch_stats": r18_variables["batch_stats"],
    }


# ----------------------------------------------------------------------------- param counts


def expected_encoder_params(depth, width, sk_ratio=0.0, se_ratio=0.0):
    """Independent count of encoder parameters (conv kernels + BN scale/bias; no bias convs)."""
    conv = lambda k, cin, cout: k * k * cin * cout
    bn = lambda c: 2 * c
    w64 = 64 * width
    if sk_ratio > 0:  # ResNet-D stem
        total = conv(3, 3, w64 // 2) + bn(w64 // 2) + conv(3, w64 // 2, w64 // 2) + bn(w64 // 2)
        total += conv(3, w64 // 2, w64) + bn(w64)
    else:
        total = conv(7, 3, w64) + bn(w64)
    bottleneck = depth >= 50
    blocks = {
        18: (2, 2, 2, 2),
        34: (3, 4, 6, 3),
        50: (3, 4, 6, 3),
        101: (3, 4, 23, 3),
        152: (3, 8, 36, 3),
        200: (3, 24, 36, 3),
    }[depth]
    cin = w64
    for stage, n in enumerate(blocks):
        f = w64 * 2**stage
        cout = 4 * f if bottleneck else f
        for j in range(n):
            if j == 0:  # every stage's first block projects (also ResNet-18 stage 1)
                total += conv(1, cin, cout) + bn(cout)
            if bottleneck:
                total += conv(1, cin, f) + bn(f)
                if sk_ratio > 0:
                    mid = max(int(f * sk_ratio), 32)
                    total += conv(3, f, 2 * f) + bn(2 * f) + conv(1, f, mid) + bn(mid)
                    total += conv(1, mid, 2 * f)
                else:
                    total += conv(3, f, f) + bn(f)
                total += conv(1, f, cout) + bn(cout)
            else:
                total += conv(3, cin, f) + bn(f) + conv(3, f, f) + bn(f)
            if se_ratio > 0:
                r = max(1, int(f * se_ratio))
                total += (cout * r + r) + (r * cout + cout)
            cin = cout
    return total


def encoder_shapes(depth, width=1, sk_ratio=0.0, se_ratio=0.0, image_size=224, **kw):
    model = create_model(
        model_config(
            resnet_depth=depth,
            width_multiplier=width,
            sk_ratio=sk_ratio,
            se_ratio=se_ratio,
            cifar_stem=False,
            num_proj_layers=3,
            proj_out_dim=128,
            **kw,
        ),
        num_classes=1000,
    )
    return abstract_variables(model, image_size)


def test_resnet50_encoder_param_count_matches_torchvision():
    variables = encoder_shapes(50)
    # torchvision resnet50 (25,557,032) minus its fc (2048*1000 + 1000); running stats excluded.
    assert count_params(variables["params"]["encoder"]) == 23_508_032
    assert count_params(variables["batch_stats"]["encoder"]) == 2 * 26_560  # mean+var per channel


@pytest.mark.parametrize(
    "depth,width,sk_ratio,se_ratio",
    [(18, 1, 0.0, 0.0), (34, 2, 0.0, 0.0), (50, 2, 0.0625, 0.0), (50, 1, 0.0, 0.25)],
)
def test_encoder_param_count_matches_independent_formula(depth, width, sk_ratio, se_ratio):
    variables = encoder_shapes(depth, width, sk_ratio, se_ratio)
    expected = expected_encoder_params(depth, width, sk_ratio, se_ratio)
    assert count_params(variables["params"]["encoder"]) == expected


# Published SimCLR(v2) counts (millions). They are reproduced by the ENCODER ALONE (convs + BN
# scale/bias, no running stats): the 3-layer projection head (+8.7M for R50-1x, +76M for
# R152-3x) and the 1000-class supervised head (+2M..6M) are not part of them. R50-1x "24" is
# 23.5M, i.e. rounded (and checked exactly above), so it is not in this 2% table.
PUBLISHED = [
    (50, 1, 0.0625, 35e6),
    (50, 2, 0.0, 94e6),
    (152, 3, 0.0625, 795e6),
    (101, 1, 0.0, 43e6),
    (152, 1, 0.0, 58e6),
]


@pytest.mark.parametrize("depth,width,sk_ratio,published", PUBLISHED)
def test_published_param_counts_are_encoder_only(depth, width, sk_ratio, published):
    variables = encoder_shapes(depth, width, sk_ratio)
    encoder = count_params(variables["params"]["encoder"])
    assert abs(encoder - published) / published < 0.02
    with_heads = count_params(variables["params"])
    assert abs(with_heads - published) / published > 0.02  # pins the convention


# ------------------------------------------------------------------------- names and shapes


def test_parameter_names_are_readable_and_stable(r18_variables):
    params = flat(r18_variables["params"])
    assert set(r18_variables["params"]) == {"encoder", "projection_head", "classifier"}
    for path in [
        "encoder/stem/conv1/conv/kernel",
        "encoder/stem/conv1/bn/scale",
        "encoder/stage1/block0/shortcut/conv/kernel",
        "encoder/stage1/block0/conv1/conv/kernel",
        "encoder/stage4/block1/conv2/bn/bias",
        "projection_head/layer1/dense/kernel",
        "projection_head/layer1/bn/bias",
        "projection_head/layer2/bn/scale",
        "classifier/kernel",
        "classifier/bias",
    ]:
        assert path in params, path
    stages = sorted(k for k in r18_variables["params"]["encoder"] if k.startswith("stage"))
    assert stages == ["stage1", "stage2", "stage3", "stage4"]
    assert sorted(r18_variables["params"]["encoder"]["stage2"]) == ["block0", "block1"]
    assert not any("bias" in p and "/conv/" in p for p in params)  # convs have no bias


def stage_sizes(model, image_size):
    keep = lambda module, method: isinstance(module, (Stem, Stage))
    variables = abstract_variables(model, image_size, capture_intermediates=keep)
    inter = variables["intermediates"]["encoder"]
    names = ["stem", "stage1", "stage2", "stage3", "stage4"]
    return [inter[n]["__call__"][0].shape[1] for n in names], inter


@pytest.mark.parametrize(
    "overrides,image_size,expected",
    [
        (dict(cifar_stem=True), 32, [32, 32, 16, 8, 4]),
        (dict(cifar_stem=False), 224, [56, 56, 28, 14, 7]),
        (dict(cifar_stem=False, resnet_depth=50, sk_ratio=0.0625), 224, [56, 56, 28, 14, 7]),
        (dict(cifar_stem=False, sk_ratio=0.0625), 32, [8, 8, 4, 2, 1]),
    ],
)
def test_spatial_size_per_stage(overrides, image_size, expected):
    model = create_model(model_config(**overrides), num_classes=NUM_CLASSES)
    sizes, inter = stage_sizes(model, image_size)
    assert sizes == expected
    channels = inter["stage4"]["__call__"][0].shape[-1]
    assert channels == (2048 if overrides.get("resnet_depth", 18) == 50 else 512)


@pytest.mark.parametrize("width", [1, 2])
def test_resnet_d_stem_and_sk_shapes(width):
    variables = encoder_shapes(50, width, sk_ratio=0.0625)
    p = flat(variables["params"]["encoder"])
    w = 64 * width
    assert p["stem/conv1/conv/kernel"].shape == (3, 3, 3, w // 2)
    assert p["stem/conv2/conv/kernel"].shape == (3, 3, w // 2, w // 2)
    assert p["stem/conv3/conv/kernel"].shape == (3, 3, w // 2, w)
    sk = "stage1/block0/sk_conv/"
    assert p[sk + "split_conv/conv/kernel"].shape == (3, 3, w, 2 * w)
    assert p[sk + "reduce/conv/kernel"].shape == (1, 1, w, max(int(w * 0.0625), 32))
    assert p[sk + "expand/kernel"].shape == (1, 1, max(int(w * 0.0625), 32), 2 * w)
    assert "stage1/block0/conv2/conv/kernel" not in p
    assert p["stage2/block0/shortcut/conv/kernel"].shape == (1, 1, 4 * w, 8 * w)


# ------------------------------------------------------------------------ forward and dtype


STAGES_ONLY = lambda module, method: isinstance(module, Stage)


@functools.cache
def train_forward(model):
    """Jitted train-mode apply returning outputs, updated batch_stats and stage outputs."""
    return jax.jit(
        lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats"], capture_intermediates=STAGES_ONLY
        )
    )


@functools.cache
def eval_forward(model):
    """Jitted inference-mode apply."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def test_float32_and_bfloat16_forward(r18_variables, images):
    params_dtypes = {x.dtype for x in jax.tree_util.tree_leaves(r18_variables["params"])}
    assert params_dtypes == {jnp.dtype(jnp.float32)}
    outs = {}
    for dtype in ("float32", "bfloat16"):
        model = create_model(model_config(dtype=dtype), num_classes=NUM_CLASSES)
        out, state = train_forward(model)(r18_variables, images)
        assert out["h"].shape == (BATCH, 512) and out["z"].shape == (BATCH, 16)
        assert out["logits"].shape == (BATCH, NUM_CLASSES)
        for value in out.values():
            assert value.dtype == jnp.float32
            assert np.all(np.isfinite(np.asarray(value)))
        # The encoder really computes in the requested dtype ...
        assert state["intermediates"]["encoder"]["stage3"]["__call__"][0].dtype == dtype
        # ... while batch statistics stay float32 (flax BatchNorm keeps them in float32).
        stats = jax.tree_util.tree_leaves(state["batch_stats"])
        assert {x.dtype for x in stats} == {jnp.dtype(jnp.float32)}
        assert all(np.all(np.isfinite(np.asarray(x))) for x in stats)
        # Init under bfloat16 also gives float32 params and statistics.
        leaves = jax.tree_util.tree_leaves(abstract_variables(model, 32))
        assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
        outs[dtype] = out
    h32, h16 = np.asarray(outs["float32"]["h"]), np.asarray(outs["bfloat16"]["h"])
    assert np.linalg.norm(h16 - h32) / np.linalg.norm(h32) < 0.05


# ------------------------------------------------------------------------------ init rules


def test_last_bn_gamma_of_every_block_is_zero(r18_variables):
    encoder = flat(r18_variables["params"]["encoder"])
    scales = {k: v for k, v in encoder.items() if k.endswith("/bn/scale")}
    zero = {k for k in scales if "/block" in k and k.endswith("/conv2/bn/scale")}
    assert len(zero) == 8  # one per basic block of ResNet-18
    for path, value in scales.items():
        np.testing.assert_array_equal(np.asarray(value), 0.0 if path in zero else 1.0, path)
    for path, value in encoder.items():
        if path.endswith("/bn/bias"):
            np.testing.assert_array_equal(np.asarray(value), 0.0, path)


def test_bottleneck_block_is_identity_at_init():
    block = BottleneckBlock(filters=4, strides=1, use_projection=False)
    x = jax.nn.relu(jax.random.normal(jax.random.key(2), (2, 5, 5, 16)))
    variables = jax.jit(functools.partial(block.init, train=False))(INIT_KEY, x)
    scales = flat(variables["params"])
    assert np.all(np.asarray(scales["conv3/bn/scale"]) == 0)
    assert np.all(np.asarray(scales["conv1/bn/scale"]) == 1)
    y, _ = train_apply(block, variables, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


# tf.keras VarianceScaling() (the reference's conv init): scale 1, fan_in, normal truncated at
# 2 sigma with the std divided by 0.8796 so that the truncated draw keeps variance 1/fan_in.
TRUNCATED_STD_FACTOR = 0.87962566103423978


def _check_fan_in_truncated(kernel, *, rel):
    kernel = np.asarray(kernel, np.float64)
    fan_in = int(np.prod(kernel.shape[:-1]))
    assert kernel.var() == pytest.approx(1.0 / fan_in, rel=rel)
    bound = 2.0 * np.sqrt(1.0 / fan_in) / TRUNCATED_STD_FACTOR
    assert np.abs(kernel).max() <= bound * (1 + 1e-6)
    assert np.abs(kernel).max() > 0.95 * bound  # truncated at 2 sigma, not narrower


def test_conv_init_is_reference_variance_scaling(r18_variables):
    params = r18_variables["params"]
    kernel = params["encoder"]["stage3"]["block1"]["conv1"]["conv"]["kernel"]  # 3x3x256x256
    _check_fan_in_truncated(kernel, rel=0.05)
    for path, leaf in flax.traverse_util.flatten_dict(params["encoder"]).items():
        if path[-1] == "kernel" and leaf.size >= 4096:
            _check_fan_in_truncated(leaf, rel=0.15)
    head = np.asarray(params["projection_head"]["layer1"]["dense"]["kernel"])
    assert head.std() == pytest.approx(0.01, rel=0.05)


def test_sk_and_se_convs_use_the_reference_init():
    x = jnp.ones((2, 4, 4, 256))
    sk = SelectiveKernelConv(features=128, strides=1, sk_ratio=0.0625)
    sk_params = flax.traverse_util.flatten_dict(sk.init(INIT_KEY, x, train=False)["params"])
    se = SqueezeExcite(reduced_features=64)
    se_params = flax.traverse_util.flatten_dict(se.init(INIT_KEY, x)["params"])
    kernels = [v for tree in (sk_params, se_params) for k, v in tree.items() if k[-1] == "kernel"]
    assert len(kernels) == 5  # split_conv, reduce, expand; SE reduce, expand
    for kernel in kernels:
        _check_fan_in_truncated(kernel, rel=0.15)
    np.testing.assert_array_equal(se_params[("reduce", "bias")], 0.0)


def np_conv(x, kernel, stride=1):
    """Conv with the reference's fixed padding: (k-1)//2 before, the rest after."""
    k = kernel.shape[0]
    before = (k - 1) // 2
    x = np.pad(x, ((0, 0), (before, k - 1 - before), (before, k - 1 - before), (0, 0)))
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            patch = x[:, i : i + stride * out_h : stride, j : j + stride * out_w : stride]
            out += patch @ kernel[i, j]
    return out


def np_bn_train(x, scale, bias, eps=1e-5):
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axes), x.var(axes)
    out = (x - mean) / np.sqrt(var + eps) * scale
    return out + bias if bias is not None else out


def random_variables(module, *args, seed, **kwargs):
    """Variables of module with random params (no zero/one init can hide a mistake), traced
    with eval_shape so nothing is compiled for the init; running stats start at mean 0, var 1."""
    shapes = jax.eval_shape(functools.partial(module.init, **kwargs), INIT_KEY, *args)
    rng = np.random.default_rng(seed)
    variables = {
        "params": jax.tree_util.tree_map(
            lambda x: jnp.asarray(rng.normal(0.0, 0.5, x.shape), jnp.float32), shapes["params"]
        )
    }
    if "batch_stats" in shapes:
        stats = flax.traverse_util.flatten_dict(shapes["batch_stats"])
        variables["batch_stats"] = flax.traverse_util.unflatten_dict(
            {k: jnp.full(v.shape, 1.0 if k[-1] == "var" else 0.0) for k, v in stats.items()}
        )
    return variables


def train_apply(module, variables, *args):
    """Jitted module.apply in train mode; returns (output, updated batch_stats)."""
    fn = functools.partial(module.apply, train=True, mutable=["batch_stats"])
    return jax.jit(fn)(variables, *args)


@pytest.mark.parametrize("strides", [1, 2])
def test_selective_kernel_conv_matches_numpy(strides):
    x = np.random.default_rng(0).normal(size=(3, 5, 5, 6)).astype(np.float32)
    module = SelectiveKernelConv(features=4, strides=strides, sk_ratio=0.0625)
    variables = random_variables(module, x, seed=1, train=False)
    y, _ = train_apply(module, variables, x)
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    a = np_conv(x, p["split_conv"]["conv"]["kernel"], strides)
    a = np.maximum(np_bn_train(a, p["split_conv"]["bn"]["scale"], p["split_conv"]["bn"]["bias"]), 0)
    s1, s2 = a[..., :4], a[..., 4:]
    g = (s1 + s2).mean(axis=(1, 2), keepdims=True)
    assert p["reduce"]["conv"]["kernel"].shape[-1] == 32  # max(int(4 * 0.0625), 32)
    g = np.maximum(
        np_bn_train(
            g @ p["reduce"]["conv"]["kernel"][0, 0],
            p["reduce"]["bn"]["scale"],
            p["reduce"]["bn"]["bias"],
        ),
        0,
    )
    m = g @ p["expand"]["kernel"][0, 0]
    w = np_softmax(np.stack([m[..., :4], m[..., 4:]]), axis=0)
    expected = w[0] * s1 + w[1] * s2
    assert y.shape == (3, 3 if strides == 2 else 5, 3 if strides == 2 else 5, 4)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)


def test_squeeze_excite_matches_numpy():
    x = np.random.default_rng(3).normal(size=(2, 3, 3, 8)).astype(np.float32)
    module = SqueezeExcite(reduced_features=2)
    variables = random_variables(module, x, seed=4)
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    g = x.mean(axis=(1, 2), keepdims=True)
    g = np.maximum(g @ p["reduce"]["kernel"][0, 0] + p["reduce"]["bias"], 0)
    g = g @ p["expand"]["kernel"][0, 0] + p["expand"]["bias"]
    expected = x / (1 + np.exp(-g))
    np.testing.assert_allclose(
        np.asarray(module.apply(variables, x)), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("strides", [1, 2])
def test_resnet_d_shortcut_pools_like_the_reference(strides):
    x = np.random.default_rng(5).normal(size=(2, 5, 5, 3)).astype(np.float32)
    module = Shortcut(features=4, strides=strides, resnet_d=True)
    variables = random_variables(module, x, seed=6, train=False)
    y, _ = train_apply(module, variables, x)
    if strides == 2:  # zero pad at the end, 2x2/2 mean counting the padding
        padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        pooled = (
            padded[:, 0::2, 0::2]
            + padded[:, 1::2, 0::2]
            + padded[:, 0::2, 1::2]
            + padded[:, 1::2, 1::2]
        ) / 4
    else:  # 'SAME' 2x2/1 mean over the valid pixels only
        padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        ones = np.pad(np.ones_like(x), ((0, 0), (0, 1), (0, 1), (0, 0)))
        window = lambda a: a[:, :-1, :-1] + a[:, 1:, :-1] + a[:, :-1, 1:] + a[:, 1:, 1:]
        pooled = window(padded) / window(ones)
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    expected = np_bn_train(pooled @ p["conv"]["kernel"][0, 0], p["bn"]["scale"], p["bn"]["bias"])
    assert y.shape == expected.shape == (2, 3 if strides == 2 else 5, 3 if strides == 2 else 5, 4)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)


def test_sk_and_se_resnet_runs_on_tiny_input(images):
    config = model_config(cifar_stem=False, sk_ratio=0.0625, se_ratio=0.25)
    model = create_model(config, num_classes=NUM_CLASSES)
    variables = random_variables(model, images, seed=9)
    p = flat(variables["params"]["encoder"])
    assert p["stem/conv3/conv/kernel"].shape == (3, 3, 32, 64)  # ResNet-D stem
    assert p["stage2/block0/se/reduce/kernel"].shape == (1, 1, 128, 32)
    assert "stage2/block0/sk_conv/split_conv/conv/kernel" not in p  # SK: bottlenecks only
    out, state = train_forward(model)(variables, images)
    assert out["h"].shape == (BATCH, 512)
    assert state["intermediates"]["encoder"]["stage1"]["__call__"][0].shape == (BATCH, 8, 8, 64)
    for value in out.values():
        assert np.all(np.isfinite(np.asarray(value)))


# ------------------------------------------------------------------------------------ heads


def test_projection_head_matches_numpy_and_updates_stats():
    h = np.random.default_rng(7).normal(size=(6, 12)).astype(np.float32)
    head = ProjectionHead(mode="nonlinear", num_layers=3, out_dim=5)
    variables = random_variables(head, h, seed=8)
    (z, hiddens), updates = train_apply(head, variables, h)
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    assert set(p) == {"layer1", "layer2", "layer3"}
    assert set(p["layer1"]["bn"]) == {"scale", "bias"} and set(p["layer3"]["bn"]) == {"scale"}
    assert "bias" not in p["layer1"]["dense"]
    assert p["layer2"]["dense"]["kernel"].shape == (12, 12)
    assert p["layer3"]["dense"]["kernel"].shape == (12, 5)
    expected = [h]
    for j in (1, 2, 3):
        layer = p[f"layer{j}"]
        x = expected[-1] @ layer["dense"]["kernel"]
        x = np_bn_train(x, layer["bn"]["scale"], layer["bn"].get("bias"))
        expected.append(x if j == 3 else np.maximum(x, 0))
    assert len(hiddens) == 4 and z.shape == (6, 5)
    for got, want in zip(hiddens, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(hiddens[-1]))
    # Running mean after one step with momentum 0.9 from 0: 0.1 * batch mean of the dense output.
    dense1 = h @ p["layer1"]["dense"]["kernel"]
    np.testing.assert_allclose(
        np.asarray(updates["batch_stats"]["layer1"]["bn"]["mean"]),
        0.1 * dense1.mean(0),
        rtol=1e-4,
        atol=1e-5,
    )


def test_projection_head_linear_and_none_modes():
    h = jnp.ones((3, 12)) * jnp.arange(12.0)
    linear = ProjectionHead(mode="linear", out_dim=5)
    variables = linear.init(INIT_KEY, h)
    assert set(flat(variables["params"])) == {"layer1/dense/kernel", "layer1/bn/scale"}
    z, hiddens = linear.apply(variables, h)
    assert z.shape == (3, 5) and len(hiddens) == 2
    none = ProjectionHead(mode="none", out_dim=5)
    variables = none.init(INIT_KEY, h)
    z, hiddens = none.apply(variables, h)
    assert "params" not in variables or not variables["params"]
    np.testing.assert_array_equal(np.asarray(z), np.asarray(h))
    assert len(hiddens) == 1


@pytest.mark.parametrize("selector", [0, 1, -1])
def test_ft_proj_selector_feeds_the_classifier(selector, r18_variables_all_gammas_one, images):
    config = model_config(ft_proj_selector=selector)
    model = create_model(config, num_classes=NUM_CLASSES, mode="finetune")
    variables = r18_variables_all_gammas_one
    width = 16 if selector == -1 else 512  # the classifier reads hiddens[selector]
    rng = np.random.default_rng(10)
    classifier = {
        "kernel": jnp.asarray(rng.normal(size=(width, NUM_CLASSES)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(NUM_CLASSES,)), jnp.float32),
    }
    variables = {**variables, "params": {**variables["params"], "classifier": classifier}}
    out = eval_forward(model)(variables, images)
    head = ProjectionHead(mode="nonlinear", num_layers=2, out_dim=16)
    head_vars = {
        "params": variables["params"]["projection_head"],
        "batch_stats": variables["batch_stats"]["projection_head"],
    }
    z, hiddens = head.apply(head_vars, out["h"])
    np.testing.assert_allclose(np.asarray(out["z"]), np.asarray(z), rtol=1e-5, atol=1e-6)
    clf = jax.tree_util.tree_map(np.asarray, variables["params"]["classifier"])
    expected = np.asarray(hiddens[selector]) @ clf["kernel"] + clf["bias"]
    np.testing.assert_allclose(np.asarray(out["logits"]), expected, rtol=1e-4, atol=1e-5)


def test_zero_init_logits_layer():
    model = create_model(model_config(zero_init_logits_layer=True), num_classes=NUM_CLASSES)
    assert model.zero_init_logits_layer
    h = jnp.ones((2, 512))
    for zero_init in (True, False):
        variables = supervised_head(NUM_CLASSES, zero_init=zero_init).init(INIT_KEY, h)
        kernel = np.asarray(variables["params"]["kernel"])
        assert np.all(kernel == 0) == zero_init
        assert np.all(np.asarray(variables["params"]["bias"]) == 0)


# ----------------------------------------------------- gradients: probe and frozen encoders


def probe_grads(model, variables, images, labels):
    """Gradients of the classifier cross-entropy and the train-mode batch_stats."""

    def loss(params):
        out, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        logp = jax.nn.log_softmax(out["logits"])
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1)), (out, updates)

    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


def nonzero_leaves(tree):
    return {k: bool(np.any(np.asarray(v) != 0)) for k, v in flat(tree).items()}


def test_probe_reads_stop_gradient_h_in_pretrain(r18_variables_all_gammas_one, images, labels):
    model = create_model(model_config(), num_classes=NUM_CLASSES, mode="pretrain")
    grads, (out, _) = probe_grads(model, r18_variables_all_gammas_one, images, labels)
    clf = jax.tree_util.tree_map(np.asarray, r18_variables_all_gammas_one["params"]["classifier"])
    expected = np.asarray(out["h"]) @ clf["kernel"] + clf["bias"]  # the probe reads h
    np.testing.assert_allclose(np.asarray(out["logits"]), expected, rtol=1e-4, atol=1e-5)
    assert not any(nonzero_leaves(grads["encoder"]).values())
    assert not any(nonzero_leaves(grads["projection_head"]).values())
    assert all(nonzero_leaves(grads["classifier"]).values())


def frozen_parts(k):
    return {"stem"} | {f"stage{i}" for i in range(1, k + 1)} if k >= 0 else set()


@pytest.mark.parametrize("fine_tune_after_block", [-1, 2, 4])
def test_finetune_gradients_and_frozen_batch_norm(
    fine_tune_after_block, r18_variables_all_gammas_one, images, labels
):
    variables = r18_variables_all_gammas_one
    config = model_config(fine_tune_after_block=fine_tune_after_block)
    model = create_model(config, num_classes=NUM_CLASSES, mode="finetune")
    grads, (out, updates) = probe_grads(model, variables, images, labels)
    frozen = frozen_parts(fine_tune_after_block)
    old_stats = variables["batch_stats"]["encoder"]
    new_stats = updates["batch_stats"]["encoder"]
    for part in ["stem", "stage1", "stage2", "stage3", "stage4"]:
        nonzero = nonzero_leaves(grads["encoder"][part])
        stats_moved = [
            not np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(
                jax.tree_util.tree_leaves(old_stats[part]),
                jax.tree_util.tree_leaves(new_stats[part]),
                strict=True,
            )
        ]
        if part in frozen:
            assert not any(nonzero.values()), part
            assert not any(stats_moved), part
        else:
            assert all(nonzero.values()), [k for k, v in nonzero.items() if not v]
            assert all(stats_moved), part
    assert all(nonzero_leaves(grads["classifier"]).values())
    if fine_tune_after_block == 4:  # linear eval: h is the inference-mode h
        h_eval = eval_forward(model)(variables, images)["h"]
        np.testing.assert_allclose(np.asarray(out["h"]), np.asarray(h_eval), rtol=1e-5, atol=1e-6)


def test_fine_tune_after_block_is_ignored_in_pretrain():
    model = create_model(model_config(fine_tune_after_block=4), num_classes=NUM_CLASSES)
    assert model.encoder.fine_tune_after_block == -1
    finetune = create_model(
        model_config(fine_tune_after_block=4), num_classes=NUM_CLASSES, mode="finetune"
    )
    assert finetune.encoder.fine_tune_after_block == 4
    assert isinstance(model, SimCLR) and isinstance(model.encoder, ResNet)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("resnet_depth", 42, r"model\.resnet_depth=42 is not supported; choose one of 18, 34"),
        ("resnet_depth", 50.0, r"model\.resnet_depth=50\.0"),
        ("width_multiplier", 2.0, r"model\.width_multiplier=2\.0 must be an integer"),
        ("width_multiplier", 0, r"model\.width_multiplier=0"),
        ("width_multiplier", -1, r"model\.width_multiplier=-1"),
        ("width_multiplier", 5, r"model\.width_multiplier=5"),
        ("width_multiplier", True, r"model\.width_multiplier=True"),
        ("proj_out_dim", 0, r"model\.proj_out_dim=0"),
        ("proj_out_dim", -3, r"model\.proj_out_dim=-3"),
        ("proj_head_mode", "mlp", r"model\.proj_head_mode='mlp'.*none, linear, nonlinear"),
        ("num_proj_layers", 0, r"model\.num_proj_layers=0"),
        ("sk_ratio", -0.1, r"model\.sk_ratio=-0\.1"),
        ("se_ratio", -1.0, r"model\.se_ratio=-1\.0"),
        ("dtype", "float16", r"model\.dtype='float16'.*'float32' or 'bfloat16'"),
        ("fine_tune_after_block", 5, r"model\.fine_tune_after_block=5"),
        ("fine_tune_after_block", -2, r"model\.fine_tune_after_block=-2"),
        ("ft_proj_selector", 3, r"model\.ft_proj_selector=3 is out of range"),
        ("ft_proj_selector", -4, r"model\.ft_proj_selector=-4"),
        ("bn_momentum", 1.5, r"model\.bn_momentum=1\.5"),
        ("bn_epsilon", 0.0, r"model\.bn_epsilon=0\.0"),
        ("cifar_stem", "yes", r"model\.cifar_stem='yes'"),
    ],
)
def test_bad_model_config_raises_value_error_naming_the_field(field, value, match):
    config = dict(model_config())  # a plain mapping: ConfigDict would refuse some types itself
    config[field] = value
    with pytest.raises(ValueError, match=match):
        validate_model_config(config, num_classes=NUM_CLASSES)


def test_other_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match=r"mode='linear_eval'"):
        validate_model_config(model_config(), num_classes=NUM_CLASSES, mode="linear_eval")
    with pytest.raises(ValueError, match=r"num_classes=0"):
        validate_model_config(model_config(), num_classes=0)
    with pytest.raises(ValueError, match=r"model\.ft_proj_selector=1 is out of range"):
        validate_model_config(
            model_config(proj_head_mode="none", ft_proj_selector=1), num_classes=2
        )
    partial = dict(model_config())
    del partial["sk_ratio"]
    with pytest.raises(ValueError, match=r"missing field\(s\) model\.sk_ratio"):
        create_model(partial, num_classes=NUM_CLASSES)
    # Direct module use is validated too.
    with pytest.raises(ValueError, match=r"model\.resnet_depth=42"):
        jax.eval_shape(ResNet(depth=42).init, INIT_KEY, jnp.zeros((1, 32, 32, 3)))


def test_numpy_integers_are_accepted():
    config = dict(model_config())  # ConfigDict itself refuses NumPy ints for int fields
    config.update(resnet_depth=np.int64(18), width_multiplier=np.int32(1), proj_out_dim=np.int64(8))
    model = create_model(config, num_classes=np.int64(3))
    shapes = abstract_variables(model, 32)
    assert shapes["params"]["classifier"]["kernel"].shape == (512, 3)
    assert shapes["params"]["projection_head"]["layer2"]["dense"]["kernel"].shape == (512, 8)


@pytest.mark.parametrize(
    "batch, size, in_ch, out_ch, kernel, stride",
    [
        (2, 16, 8, 4, 3, 1),  # one chunk (2 x 16 x 16 patch rows < conv.CHUNK_ROWS)
        (8, 16, 3, 8, 3, 1),  # two chunks of four images (8 x 16 x 16 rows / 1024)
        (8, 64, 3, 8, 3, 1),  # eight chunks of one image
        (8, 64, 4, 8, 3, 2),  # strided
        (4, 33, 3, 8, 7, 2),  # the standard stem on an odd size
        (2, 32, 8, 4, 1, 2),  # strided 1x1 projection shortcut
    ],
)
def test_im2col_kernel_gradient_equals_xla(batch, size, in_ch, out_ch, kernel, stride):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, in_ch)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, in_ch, out_ch)), jnp.float32)
    before = (kernel - 1) // 2
    pads = ((before, kernel - 1 - before),) * 2

    def loss(conv_fn, x, w):
        y = conv_fn(x, w, (stride, stride), pads, dimension_numbers=conv.NHWC)
        return jnp.sum(jnp.sin(y))  # a non-uniform output gradient

    value_and_grads = lambda fn: jax.jit(jax.value_and_grad(functools.partial(loss, fn), (0, 1)))
    expected_value, (expected_dx, expected_dw) = value_and_grads(jax.lax.conv_general_dilated)(x, w)
    value, (dx, dw) = value_and_grads(conv.conv_im2col_kernel_grad)(x, w)
    assert "custom_vjp" in str(
        jax.make_jaxpr(functools.partial(loss, conv.conv_im2col_kernel_grad))(x, w)
    )
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-6, atol=1e-6)
    scale = float(jnp.abs(expected_dw).max())
    np.testing.assert_allclose(dw, expected_dw, rtol=1e-4, atol=1e-5 * scale)


def test_conv_kernel_grad_modes_pick_the_path():
    assert conv.make_conv_general_dilated("xla") is jax.lax.conv_general_dilated
    assert conv.make_conv_general_dilated("im2col") is conv.conv_im2col_kernel_grad
    on_cpu = jax.default_backend() == "cpu"
    assert (conv.make_conv_general_dilated("auto") is conv.conv_im2col_kernel_grad) == on_cpu
    config = get_base_config().model
    config.conv_kernel_grad = "fast"
    with pytest.raises(ValueError, match="model.conv_kernel_grad='fast'"):
        validate_model_config(config, num_classes=10)


@pytest.mark.parametrize("size,want", [(32, (3, 3)), (16, (3, 3)), (40, (7, 7))])
def test_cifar_stem_auto_follows_the_image_size(size, want):
    config = model_config(cifar_stem="auto", resnet_depth=18)
    model = create_model(config, num_classes=NUM_CLASSES)
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False), INIT_KEY, jnp.zeros((1, size, size, 3))
    )
    assert shapes["params"]["encoder"]["stem"]["conv1"]["conv"]["kernel"].shape[:2] == want
