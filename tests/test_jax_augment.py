"""The Grain path's augmentations: host crop windows and resampling (grain_pipeline,
numpy_pipeline), and on the accelerator colour ops, blur, rates and sharding (jax_augment)."""

import colorsys
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import parallel
from simclr_jax.data import grain_pipeline, numpy_pipeline, spec
from simclr_jax.data import jax_augment as ja

BASE = spec.AugmentParams()  # the ImageNet defaults of simclr_jax/config.py
N_DRAWS = 4000
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")


# Jitted: op-by-op dispatch of these small programs costs more than one compile.
gaussian_blur = jax.jit(ja.gaussian_blur, static_argnums=(2,))
color_jitter = jax.jit(ja.color_jitter, static_argnames=("strength", "brightness_mode"))


def _params(**changes) -> spec.AugmentParams:
    return dataclasses.replace(BASE, **changes)


def _keys(n: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


def _within_binomial(hits: np.ndarray, p: float, sigmas: float = 4.0) -> bool:
    n = hits.size
    return abs(hits.mean() - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


@functools.cache
def _draws_fn(params: spec.AugmentParams):
    return jax.jit(jax.vmap(lambda k: ja.sample_view_draws(k, params)))


def _draws(params: spec.AugmentParams, n: int, seed: int = 0) -> ja.ViewDraws:
    return _draws_fn(params)(_keys(n, seed))


def _color_image(size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.05, 0.95, (size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------ crop windows


def _numpy_tf_crop(rng, height, width, min_area, ratio_range, covered, attempts=100):
    """Independent re-derivation of tf.image.sample_distorted_bounding_box (box = image)."""
    for _ in range(attempts):
        ratio = rng.uniform(*ratio_range)
        min_px, max_px = min_area * height * width, float(height * width)
        low = round(math.sqrt(min_px / ratio))
        high = min(math.floor(math.sqrt(max_px / ratio) + 0.5), height)
        while high > 0 and round(high * ratio) > width:
            high -= 1
        low = min(low, high)
        h = low + rng.integers(0, high - low + 1)
        w = round(h * ratio)
        if w * h < min_px:
            h, w = h + 1, round((h + 1) * ratio)
        if w * h > max_px:
            h, w = h - 1, round((h - 1) * ratio)
        ok = min_px <= w * h <= max_px and 0 < w <= width and 0 < h <= height
        if ok and w * h / (height * width) >= covered:
            y = rng.integers(0, height - h) if h < height else 0
            x = rng.integers(0, width - w) if w < width else 0
            return y, x, h, w
    return 0, 0, height, width


def _windows(height, width, n=N_DRAWS, **kwargs) -> np.ndarray:
    uniforms = np.random.default_rng(0).uniform(size=(n, 4, spec.MAX_CROP_ATTEMPTS))
    sample = grain_pipeline.crop_window_from_uniforms
    return np.array([sample(u, height, width, **kwargs) for u in uniforms], dtype=np.int64)


def test_crop_windows_respect_area_aspect_and_image_bounds():
    height, width = 32, 48
    y, x, h, w = _windows(height, width, min_area=0.08).T
    area = h * w / (height * width)
    # min_object_covered=0.1 against the whole image lifts the 0.08 floor to 0.1.
    assert area.min() >= 0.1 and area.max() <= 1.0
    # The whole range is reached (a 32x48 image fits at most a 32x43 crop at ratio 4/3).
    assert area.min() < 0.12 and area.max() > 0.85
    # width = round(h * ratio), ratio in [3/4, 4/3]: w/h is off by at most 0.5 / h.
    assert np.all(w / h >= 0.75 - 0.5 / h) and np.all(w / h <= 4 / 3 + 0.5 / h)
    assert np.all((y >= 0) & (x >= 0) & (y + h <= height) & (x + w <= width))
    rng = np.random.default_rng(1)
    reference = np.array(
        [_numpy_tf_crop(rng, height, width, 0.08, (0.75, 4 / 3), 0.1) for _ in range(2000)]
    )
    ref_area = reference[:, 2] * reference[:, 3] / (height * width)
    tolerance = 4 * math.sqrt(area.var() / area.size + ref_area.var() / ref_area.size)
    assert abs(area.mean() - ref_area.mean()) < tolerance
    offset = y / np.maximum(height - h, 1)
    ref_offset = reference[:, 0] / np.maximum(height - reference[:, 2], 1)
    assert abs(offset.mean() - ref_offset.mean()) < 0.03


def test_without_object_cover_the_area_floor_is_crop_min_area():
    _, _, h, w = _windows(32, 32, min_area=0.08, min_object_covered=0.0).T
    area = h * w / 32**2
    assert area.min() >= 0.08 and area.min() < 0.1


def test_impossible_crop_falls_back_to_whole_image():
    whole = np.tile([0, 0, 24, 20], (64, 1))
    np.testing.assert_array_equal(_windows(24, 20, n=64, min_object_covered=1.5), whole)
    uniforms = grain_pipeline.view_uniforms(0, 0, 0)
    window = grain_pipeline.crop_window_from_uniforms(
        uniforms, 24, 20, aspect_ratio_range=(50.0, 60.0)
    )
    np.testing.assert_array_equal(np.asarray(window), whole[0])


# ------------------------------------------------------------------ resampling


def _numpy_bicubic(image: np.ndarray, size: int) -> np.ndarray:
    """Independent tf.image.resize(bicubic) re-derivation: Keys a=-0.5, half-pixel centres,
    out-of-image taps dropped and renormalized."""

    def kernel(t):
        t, a = abs(t), -0.5
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    def matrix(n_in):
        out = np.zeros((size, n_in))
        for i in range(size):
            centre = (i + 0.5) * n_in / size - 0.5
            for j in range(math.floor(centre) - 1, math.floor(centre) + 3):
                if 0 <= j < n_in:
                    out[i, j] = kernel(centre - j)
        return out / out.sum(axis=1, keepdims=True)

    rows, cols = matrix(image.shape[0]), matrix(image.shape[1])
    return np.einsum("ij,jkc,lk->ilc", rows, image, cols)


def test_uncropped_same_size_resize_is_identity():
    image = (_color_image(24) * 255).astype(np.uint8)
    out = grain_pipeline.crop_resize(image, (0, 0, 24, 24), 24)
    np.testing.assert_allclose(out, image / 255.0, atol=1e-6)


def test_crop_resize_flip_matches_numpy_bicubic_of_the_crop():
    image = np.random.default_rng(3).integers(0, 256, (20, 26, 3), dtype=np.uint8)
    y, x, h, w = 3, 5, 11, 14
    expected = _numpy_bicubic(image[y : y + h, x : x + w] / 255.0, 16)
    out = grain_pipeline.crop_resize(image, (y, x, h, w), 16)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    flipped = jax.jit(ja.flip)(out, True)
    np.testing.assert_allclose(np.asarray(flipped), expected[:, ::-1], atol=1e-5)


# ------------------------------------------------------------------ colour ops


def _hsv_roundtrip(image, change):
    out = np.empty_like(image, dtype=np.float64)
    for index in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*image[index])
        out[index] = colorsys.hsv_to_rgb(*change(h, s, v))
    return out


@pytest.mark.parametrize("factor", [0.0, 0.4, 1.0, 1.8])
def test_saturation_scales_hsv_saturation_and_clips_it(factor):
    image = _color_image(8, seed=1)
    image[0, 0] = 0.4  # gray pixel: no saturation to scale
    expected = _hsv_roundtrip(image, lambda h, s, v: (h, min(1.0, s * factor), v))
    out = ja.adjust_saturation(jnp.asarray(image), factor)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6)


@pytest.mark.parametrize("delta", [-0.2, -0.07, 0.0, 0.13, 0.2])
def test_hue_rotates_hsv_hue(delta):
    image = _color_image(8, seed=2)
    image[0, 0] = 0.4
    expected = _hsv_roundtrip(image, lambda h, s, v: ((h + delta) % 1.0, s, v))
    out = ja.adjust_hue(jnp.asarray(image), delta)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6)


def test_uint8_images_become_unit_floats():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
    out = ja.to_float_image(jnp.asarray(pixels))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), pixels / 255.0, atol=1e-7)


def test_contrast_brightness_and_grayscale_match_numpy():
    image = _color_image(8, seed=3)
    mean = image.mean(axis=(0, 1), keepdims=True)
    out = ja.adjust_contrast(jnp.asarray(image), 0.3)
    np.testing.assert_allclose(np.asarray(out), (image - mean) * 0.3 + mean, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ja.adjust_brightness(image, 1.3)), image * 1.3)
    out = ja.adjust_brightness(image, -0.2, "simclrv1")
    np.testing.assert_allclose(np.asarray(out), image - 0.2, atol=1e-7)
    luma = image @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    gray = np.asarray(ja.to_grayscale(jnp.asarray(image)))
    np.testing.assert_allclose(gray, np.repeat(luma[..., None], 3, axis=-1), atol=1e-6)


def test_color_jitter_applies_ops_in_the_given_order_with_clipping():
    image = jnp.asarray(_color_image(8, seed=4))
    factors = jnp.array([1.6, 0.5, 1.7, 0.1])

    @functools.partial(jax.jit, static_argnums=0)
    def composed(order, x):
        ops = [
            lambda x: ja.adjust_brightness(x, factors[0]),
            lambda x: ja.adjust_contrast(x, factors[1]),
            lambda x: ja.adjust_saturation(x, factors[2]),
            lambda x: ja.adjust_hue(x, factors[3]),
        ]
        for index in order:
            x = jnp.clip(ops[index](x), 0.0, 1.0)
        return x

    for order in ((0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)):
        out = color_jitter(image, jnp.array(order), factors, strength=1.0)
        np.testing.assert_allclose(np.asarray(out), np.asarray(composed(order, image)), atol=1e-6)


@pytest.mark.parametrize("mode", ["simclrv2", "simclrv1"])
def test_jitter_factors_are_bounded_by_the_strength(mode):
    strength = 0.5
    params = _params(color_jitter_strength=strength, brightness_mode=mode)
    draws = _draws(params, N_DRAWS)
    factors = np.asarray(draws.jitter_factors)
    b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength
    bright = (1 - b, 1 + b) if mode == "simclrv2" else (-b, b)
    for column, (low, high) in enumerate([bright, (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)]):
        values = factors[:, column]
        assert values.min() >= low and values.max() <= high
        assert values.min() < low + 0.01 * (high - low) and values.max() > high - 0.01 * (
            high - low
        )
    orders = np.asarray(draws.jitter_order)
    assert np.all(np.sort(orders, axis=1) == np.arange(4))
    first_op_counts = np.bincount(orders[:, 0], minlength=4) / len(orders)
    assert np.all(np.abs(first_op_counts - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(orders)))
    # Brightness alone on an image that never clips: the mean changes by exactly the factor.
    image = _color_image(8) * 0.5
    brightened = jax.vmap(lambda f: ja.adjust_brightness(image, f, mode))(factors[:64, 0])
    change = np.asarray(brightened).mean(axis=(1, 2, 3)) - image.mean()
    if mode == "simclrv2":
        change = np.asarray(brightened).mean(axis=(1, 2, 3)) / image.mean()
        assert np.all((change >= 1 - b - 1e-5) & (change <= 1 + b + 1e-5))
    else:
        assert np.all(np.abs(change) <= b + 1e-5)


def test_draw_rates_follow_the_config():
    params = _params(color_jitter_strength=0.5)  # shares a compiled sampler with the test above
    draws = _draws(params, N_DRAWS, seed=1)
    assert _within_binomial(np.asarray(draws.flip), 0.5)
    assert _within_binomial(np.asarray(draws.jitter), 0.8)
    assert _within_binomial(np.asarray(draws.grayscale), 0.2)
    assert _within_binomial(np.asarray(draws.blur), 0.5)
    sigma = np.asarray(draws.blur_sigma)
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.04


# ------------------------------------------------------------------ blur


def _numpy_gaussian(sigma: float, taps: int) -> np.ndarray:
    offsets = np.arange(taps) - taps // 2
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


@pytest.mark.parametrize("image_size,taps", [(32, 3), (64, 7), (224, 23), (9, 1)])
def test_blur_kernel_size_is_a_tenth_made_odd(image_size, taps):
    assert spec.blur_kernel_size(image_size) == taps


def test_blur_of_an_impulse_is_the_gaussian_kernel_with_zero_padding():
    sigma, taps = 1.3, spec.blur_kernel_size(64)
    kernel2d = np.outer(_numpy_gaussian(sigma, taps), _numpy_gaussian(sigma, taps))
    impulse = np.zeros((20, 20, 3), np.float32)
    impulse[10, 10] = 1.0
    impulse[0, 0] = 1.0  # near the border the kernel is cut off, not renormalized
    out = np.asarray(gaussian_blur(jnp.asarray(impulse), sigma, taps))
    r = taps // 2
    expected = np.zeros((20, 20))
    expected[10 - r : 10 + r + 1, 10 - r : 10 + r + 1] += kernel2d
    expected[: r + 1, : r + 1] += kernel2d[r:, r:]
    for channel in range(3):
        np.testing.assert_allclose(out[..., channel], expected, atol=1e-6)


def test_blur_in_the_pipeline_uses_the_view_sigma_and_size():
    crop = jnp.asarray(_color_image(32, seed=5) * 1.2 - 0.1)  # bicubic overshoot: not clipped
    params = _params(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=1.0)
    draws = ja.ViewDraws(
        flip=jnp.array(True),
        jitter=jnp.array(False),
        jitter_order=jnp.arange(4),
        jitter_factors=jnp.array([1.0, 1.0, 1.0, 0.0]),
        grayscale=jnp.array(False),
        blur=jnp.array(True),
        blur_sigma=jnp.array(1.2),
    )
    apply = jax.jit(ja.apply_view, static_argnums=(2,))
    with_blur = apply(crop, draws, params)
    without = apply(crop, draws._replace(blur=jnp.array(False)), params)
    expected = crop[:, ::-1]
    np.testing.assert_allclose(np.asarray(without), np.clip(expected, 0, 1), atol=1e-6)
    expected = jnp.clip(gaussian_blur(without, 1.2, 3), 0.0, 1.0)
    np.testing.assert_allclose(np.asarray(with_blur), np.asarray(expected), atol=1e-6)
    assert not np.allclose(np.asarray(with_blur), np.asarray(without), atol=1e-3)


# ------------------------------------------------------------------ end to end


def _ramp_batch(n: int, size: int = 16) -> np.ndarray:
    ramp = np.broadcast_to(np.linspace(0.1, 0.9, size, dtype=np.float32), (size, size))
    crop = np.stack([ramp, ramp[::-1].T, ramp * 0.5], -1)
    return np.broadcast_to(crop, (n, 1, size, size, 3))


def test_crop_and_flip_flips_at_the_configured_rate():
    n = 2000
    augment = ja.make_augment_fn(BASE, augmentation="crop_flip")
    views = np.asarray(augment(jax.random.key(3), _ramp_batch(n), np.arange(n)))[:, 0]
    # The red channel rises left to right in every crop; a flipped view falls instead.
    slope = np.diff(views[..., 0].mean(axis=1), axis=1)
    rising, falling = np.all(slope > 0, axis=1), np.all(slope < 0, axis=1)
    assert np.all(rising | falling)
    assert _within_binomial(falling, 0.5)


def test_grayscale_rate_end_to_end():
    n = 2000
    params = _params(color_jitter_prob=0.0, grayscale_prob=0.2, blur_prob=0.0)
    augment = ja.make_augment_fn(params)
    images = np.broadcast_to(_color_image(16), (n, 1, 16, 16, 3))
    views = np.asarray(augment(jax.random.key(4), images, np.arange(n)))[:, 0]
    gray = np.abs(views - views[..., :1]).max(axis=(1, 2, 3)) < 1e-6
    assert _within_binomial(gray, 0.2)


@pytest.fixture(scope="module")
def simclr_batch():
    images = np.random.default_rng(7).uniform(-0.05, 1.05, (16, 2, 20, 20, 3)).astype(np.float32)
    ids = np.arange(100, 116, dtype=np.int32)
    return images, ids


@pytest.fixture(scope="module")
def simclr_fn():
    return ja.make_augment_fn(BASE)


def test_views_are_float_in_unit_range_differ_and_are_reproducible(simclr_batch, simclr_fn):
    images, ids = simclr_batch
    key = jax.random.key(0)
    views = np.asarray(simclr_fn(key, images, ids))
    assert views.shape == (16, 2, 20, 20, 3) and views.dtype == np.float32
    assert views.min() >= 0.0 and views.max() <= 1.0
    assert np.all(np.abs(views[:, 0] - views[:, 1]).max(axis=(1, 2, 3)) > 1e-2)
    np.testing.assert_array_equal(np.asarray(simclr_fn(key, images, ids)), views)
    assert not np.allclose(np.asarray(simclr_fn(jax.random.key(1), images, ids)), views)
    # Keys follow the example id, not the position in the batch.
    order = np.roll(np.arange(16), 5)
    moved = np.asarray(simclr_fn(key, images[order], ids[order]))
    np.testing.assert_allclose(moved, views[order], atol=1e-5)


def test_sharded_views_match_one_device_without_communication(simclr_batch, devices):
    images, ids = simclr_batch
    key = jax.random.key(5)
    results = {}
    for name, mesh in [
        ("one", parallel.create_mesh(devices=devices[:1])),
        ("eight", parallel.create_mesh()),
    ]:
        batch = parallel.batch_sharding(mesh)
        args = (
            jax.device_put(key, parallel.replicated(mesh)),
            jax.device_put(images, batch),
            jax.device_put(ids, batch),
        )
        compiled = ja.make_augment_fn(BASE, mesh).lower(*args).compile()
        hlo = compiled.as_text()
        for collective in COLLECTIVES:
            assert collective not in hlo, f"{name}: {collective} in the compiled HLO"
        out = compiled(*args)
        assert out.sharding.is_equivalent_to(batch, out.ndim)
        results[name] = np.asarray(out)
    assert {s.data.shape[0] for s in out.addressable_shards} == {2}
    np.testing.assert_allclose(results["eight"], results["one"], atol=1e-5)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"flip_prob": 1.5}, "data.flip_prob=1.5"),
        ({"brightness_mode": "v3"}, "data.brightness_mode='v3'"),
        ({"color_jitter_strength": 2.0}, "data.color_jitter_strength=2.0"),
        ({"crop_min_area": 0.0}, "data.crop_min_area=0.0"),
    ],
)
def test_bad_config_values_name_the_field(changes, match):
    from simclr_jax.config import get_base_config

    data = get_base_config().data
    data.update(changes)
    with pytest.raises(ValueError, match=match):
        spec.augment_params(data)


def test_bad_shapes_are_rejected_before_compiling():
    key, ids = jax.random.key(0), np.arange(2)
    with pytest.raises(ValueError, match="must be RGB"):
        ja.augment_views(key, np.zeros((2, 1, 8, 8)), BASE, example_ids=ids)
    with pytest.raises(ValueError, match="example_ids"):
        ja.augment_views(key, np.zeros((2, 1, 8, 8, 3)), BASE, example_ids=np.arange(3))
    with pytest.raises(ValueError, match="uint8 or floating"):
        ja.augment_views(key, np.zeros((2, 1, 8, 8, 3), np.int32), BASE, example_ids=ids)


def test_reads_the_fields_of_the_config_schema():
    from simclr_jax.config import get_base_config

    data = get_base_config().data
    assert spec.augment_params(data) == BASE


def test_ops_match_the_tensorflow_reference_ops():
    tf = pytest.importorskip("tensorflow")
    image = np.random.default_rng(8).uniform(0, 1, (20, 26, 3)).astype(np.float32)
    x = jnp.asarray(image)
    pairs = [
        (ja.adjust_saturation(x, 1.7), tf.image.adjust_saturation(image, 1.7)),
        (ja.adjust_saturation(x, 0.3), tf.image.adjust_saturation(image, 0.3)),
        (ja.adjust_hue(x, -0.17), tf.image.adjust_hue(image, -0.17)),
        (ja.adjust_contrast(x, 0.4), tf.image.adjust_contrast(image, 0.4)),
        (ja.to_grayscale(x), tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])),
        (
            numpy_pipeline.resize_bicubic(image[3:14, 5:19], 16, 16),
            tf.image.resize(image[3:14, 5:19], [16, 16], method="bicubic"),
        ),
    ]
    for ours, reference in pairs:
        np.testing.assert_allclose(np.asarray(ours), reference.numpy(), atol=2e-6)
