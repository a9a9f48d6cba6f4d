"""Augmentation ops: ranges, rates and exact values against NumPy re-derivations."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_jax.data import augment, spec

N_DRAWS = 1000


# The per-op reference chain the fused view (augment.distort) must equal: each op drawn from
# its own seed split, as simclr_view splits them.


def _color_jitter(image, seed, strength, mode="simclrv2"):
    return augment._jitter(image, augment.sample_jitter_draws(seed, strength, mode))


def _adjust_brightness(image, seed, strength, mode):
    d = augment.sample_jitter_draws(seed, strength, mode)
    return image * d["brightness_scale"] + d["brightness_shift"]


def _random_grayscale(image, seed, prob=0.2):
    return augment._apply_with_prob(prob, seed, augment.to_grayscale, image)[0]


def _random_color_distortion(image, seed, params):
    jitter_seed, apply_seed, gray_seed = tf.unstack(augment.split_seed(seed, 3))
    strength, mode = params.color_jitter_strength, params.brightness_mode
    jitter = lambda x: _color_jitter(x, jitter_seed, strength, mode)  # noqa: E731
    image, _ = augment._apply_with_prob(params.color_jitter_prob, apply_seed, jitter, image)
    return _random_grayscale(image, gray_seed, params.grayscale_prob)


def _random_blur(image, seed, prob, image_size):
    if prob <= 0.0:
        return image
    apply_seed, sigma_seed = tf.unstack(augment.split_seed(seed, 2))
    kernel = augment.blur_kernel_size(image_size)
    sigma = augment._uniform(sigma_seed, *spec.BLUR_SIGMA_RANGE)
    blur = lambda x: augment.gaussian_blur(x, sigma, kernel)  # noqa: E731
    return augment._apply_with_prob(prob, apply_seed, blur, image)[0]


def _seeds(n, offset=0):
    return [tf.constant([7, offset + i], tf.int64) for i in range(n)]


def _random_images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth-ish images with structure so every op changes them.
    base = rng.random((n, size // 4, size // 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)


def _numpy_blur(image, sigma, kernel_size):
    radius = kernel_size // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-(x**2) / (2 * sigma**2))
    taps /= taps.sum()
    padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)))
    h, w = image.shape[:2]
    vertical = sum(taps[k] * padded[k : k + h, :, :] for k in range(kernel_size))
    out = sum(taps[k] * vertical[:, k : k + w, :] for k in range(kernel_size))
    return np.clip(out, 0, 1)


def test_crop_window_sampler_ranges():
    height, width = 300, 600  # aspect 2: the whole-image fallback is out of range
    sample = tf.function(
        lambda s: augment.sample_crop_window(tf.constant([height, width, 3]), s, (0.08, 1.0))
    )
    areas, aspects, fallbacks = [], [], 0
    for seed in _seeds(N_DRAWS):
        begin, size = (t.numpy() for t in sample(seed))
        assert np.all(begin >= 0) and np.all(begin + size <= [height, width])
        if tuple(size) == (height, width):
            fallbacks += 1
            continue
        areas.append(size[0] * size[1] / (height * width))
        aspects.append(size[1] / size[0])
    areas, aspects = np.array(areas), np.array(aspects)
    assert fallbacks < N_DRAWS * 0.05
    # min_object_covered=0.1 of the whole-image box lifts the effective minimum area to 0.1.
    assert areas.min() >= 0.1 - 0.01 and areas.max() <= 1.0
    assert areas.min() < 0.15 and areas.max() > 0.6  # the range is really explored
    slack = 1.0 / 30  # integer rounding of h and w
    assert aspects.min() >= 3 / 4 - slack and aspects.max() <= 4 / 3 + slack
    assert aspects.min() < 0.8 and aspects.max() > 1.25


def test_crop_min_area_is_respected():
    sample = tf.function(
        lambda s: augment.sample_crop_window(tf.constant([200, 200, 3]), s, (0.5, 1.0))
    )
    areas = [np.prod(sample(s)[1].numpy()) / 200**2 for s in _seeds(300)]
    assert min(areas) >= 0.5 - 0.01


def test_random_crop_resize_shape_and_small_input():
    tiny = tf.random.stateless_uniform([8, 6, 3], seed=[0, 1])  # smaller than the crop
    out = augment.random_crop_resize(tiny, tf.constant([1, 2]), 32)
    assert out.shape == (32, 32, 3)
    # Not clipped (bicubic overshoot reaches the jitter, as in the reference); views are.
    params = augment.AugmentParams(image_size=32)
    view = augment.crop_flip_view(tiny, tf.constant([1, 2]), params)
    assert 0.0 <= float(tf.reduce_min(view)) and float(tf.reduce_max(view)) <= 1.0


def test_flip_rate():
    image = tf.reshape(tf.range(4 * 5 * 3, dtype=tf.float32) / 60.0, [4, 5, 3])
    flip = tf.function(lambda s: augment.random_flip(image, s, 0.5))
    flipped = [not np.array_equal(flip(s).numpy(), image.numpy()) for s in _seeds(N_DRAWS)]
    assert abs(np.mean(flipped) - 0.5) < 0.06
    assert np.array_equal(flip(_seeds(1)[0]).numpy().shape, image.shape)
    mirrored = augment.random_flip(image, _seeds(1)[0], 1.0).numpy()
    np.testing.assert_array_equal(mirrored, image.numpy()[:, ::-1])


@pytest.mark.parametrize("jitter_prob", [0.0, 1.0])
def test_grayscale_rate_with_and_without_jitter(jitter_prob):
    params = augment.AugmentParams(image_size=8, color_jitter_prob=jitter_prob, blur_prob=0.0)
    image = tf.constant(_random_images(1, 8)[0])
    distort = tf.function(lambda s: _random_color_distortion(image, s, params))
    gray = []
    for seed in _seeds(600):
        out = distort(seed).numpy()
        gray.append(np.allclose(out[..., 0], out[..., 1]) and np.allclose(out[..., 1], out[..., 2]))
    assert abs(np.mean(gray) - 0.2) < 0.05


def test_blur_matches_numpy_and_rate():
    image_size = 64
    kernel = augment.blur_kernel_size(image_size)
    assert kernel == 7 and augment.blur_kernel_size(224) == 23 and augment.blur_kernel_size(32) == 3
    images = _random_images(3, image_size, seed=1)
    sigmas = np.array([0.1, 0.9, 2.0], np.float32)
    batched = augment.gaussian_blur(tf.constant(images), tf.constant(sigmas), kernel).numpy()
    for i in range(3):
        expected = _numpy_blur(images[i], sigmas[i], kernel)
        np.testing.assert_allclose(batched[i], expected, atol=1e-5)
        single = augment.gaussian_blur(tf.constant(images[i]), sigmas[i], kernel).numpy()
        np.testing.assert_allclose(single, expected, atol=1e-5)
    blur = tf.function(lambda s: _random_blur(tf.constant(images[0]), s, 0.5, image_size))
    changed = [not np.allclose(blur(s).numpy(), images[0]) for s in _seeds(400)]
    assert abs(np.mean(changed) - 0.5) < 0.07
    off = _random_blur(tf.constant(images[0]), _seeds(1)[0], 0.0, image_size)
    np.testing.assert_array_equal(off.numpy(), images[0])


@pytest.mark.parametrize("mode", ["simclrv2", "simclrv1"])
def test_brightness_bounded_by_strength(mode):
    strength = 0.5
    b = 0.4
    ranges = [pytest.approx(r) for r in spec.jitter_ranges(strength, mode)]
    assert ranges == [
        (1 - b, 1 + b) if mode == "simclrv2" else (-b, b),
        (0.6, 1.4),
        (0.6, 1.4),
        (-0.1, 0.1),
    ]
    image = tf.fill([2, 2, 3], 0.5)
    adjust = tf.function(lambda s: _adjust_brightness(image, s, strength, mode))
    values = np.array([float(adjust(s)[0, 0, 0]) for s in _seeds(500)])
    if mode == "simclrv2":
        factors = values / 0.5
        assert factors.min() >= 1 - b - 1e-6 and factors.max() <= 1 + b + 1e-6
        assert factors.min() < 1 - 0.9 * b and factors.max() > 1 + 0.9 * b
    else:
        deltas = values - 0.5
        assert deltas.min() >= -b - 1e-6 and deltas.max() <= b + 1e-6
        assert deltas.min() < -0.9 * b and deltas.max() > 0.9 * b


def test_color_jitter_zero_strength_is_identity_and_bounded():
    image = tf.constant(_random_images(1, 16)[0])
    same = _color_jitter(image, tf.constant([3, 4]), 0.0)
    np.testing.assert_allclose(same.numpy(), image.numpy(), atol=2e-6)
    jitter = tf.function(lambda s: _color_jitter(image, s, 1.0))
    outs = np.stack([jitter(s).numpy() for s in _seeds(50)])
    assert outs.min() >= 0.0 and outs.max() <= 1.0
    # Brightness alone moves the mean at most by the factor range; all four change pixels.
    assert np.abs(outs - image.numpy()).mean() > 0.02


def test_jitter_brightness_and_contrast_factors_within_strength():
    # A gray two-pixel image: saturation and hue leave it alone, brightness (x * b) scales the
    # mean by b and contrast (mean + c * (x - mean)) scales the spread by c; both must lie in
    # [1 - 0.8 s, 1 + 0.8 s] whatever the random order.
    strength = 0.5
    limit = 0.8 * strength
    image = tf.constant([[[0.2] * 3, [0.3] * 3]], tf.float32)
    jitter = tf.function(lambda s: _color_jitter(image, s, strength))
    b_factors, c_factors = [], []
    for seed in _seeds(300):
        out = jitter(seed).numpy()
        np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)  # still gray
        b = out[..., 0].mean() / 0.25
        b_factors.append(b)
        c_factors.append((out[0, 1, 0] - out[0, 0, 0]) / 0.1 / b)
    for factors in (np.array(b_factors), np.array(c_factors)):
        assert factors.min() >= 1 - limit - 1e-4 and factors.max() <= 1 + limit + 1e-4
        assert factors.min() < 1 - 0.8 * limit and factors.max() > 1 + 0.8 * limit


def test_simclr_view_range_views_differ_and_seeded():
    params = augment.AugmentParams(image_size=32, blur_prob=0.5, color_jitter_strength=0.5)
    image = tf.constant(_random_images(1, 48, seed=2)[0])
    view = tf.function(lambda s: augment.simclr_view(image, s, params))
    first, second = view(tf.constant([0, 1])).numpy(), view(tf.constant([0, 2])).numpy()
    assert first.shape == (32, 32, 3) and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, view(tf.constant([0, 1])).numpy())


def _ops(params):
    return {
        "crop": lambda x, s: augment.random_crop_resize(x, s, params.image_size),
        "flip": lambda x, s: augment.random_flip(x, s, 0.5),
        "jitter": lambda x, s: _color_jitter(x, s, 1.0),
        "grayscale": lambda x, s: _random_grayscale(x, s, 0.5),
        "blur": lambda x, s: _random_blur(x, s, 1.0, params.image_size),
        "simclr": lambda x, s: augment.simclr_view(x, s, params),
        "crop_flip": lambda x, s: augment.crop_flip_view(x, s, params),
    }


@pytest.mark.parametrize("name", list(_ops(augment.AugmentParams(image_size=32))))
def test_eager_equals_tf_data(name):
    params = augment.AugmentParams(image_size=32, blur_prob=1.0)
    op = _ops(params)[name]
    images = _random_images(4, 32, seed=3)
    seeds = np.array([[5, i] for i in range(4)], np.int64)
    eager = np.stack([op(tf.constant(images[i]), tf.constant(seeds[i])).numpy() for i in range(4)])
    ds = tf.data.Dataset.from_tensor_slices((images, seeds)).map(op, num_parallel_calls=2)
    graph = np.stack(list(ds.as_numpy_iterator()))
    np.testing.assert_allclose(eager, graph, atol=1e-6)


def test_eval_transform_center_crop_and_small_images():
    image64 = _random_images(1, 64, seed=4)[0]
    out = augment.eval_transform(tf.constant(image64), 56).numpy()
    np.testing.assert_array_equal(out, image64[4:60, 4:60])  # 0.875 * 64 = 56, centred
    resized = augment.eval_transform(tf.constant(image64), 32).numpy()
    expected = tf.image.resize(image64[4:60, 4:60], [32, 32], method="bicubic").numpy()
    np.testing.assert_allclose(resized, np.clip(expected, 0, 1), atol=1e-6)
    image32 = _random_images(1, 32, seed=5)[0]
    np.testing.assert_array_equal(augment.eval_transform(tf.constant(image32), 32), image32)
    uint8 = (image32 * 255).astype(np.uint8)
    np.testing.assert_allclose(augment.eval_transform(uint8, 32).numpy(), uint8 / 255.0, atol=1e-6)


def test_params_validation():
    with pytest.raises(ValueError, match="brightness_mode"):
        spec.augment_params({"brightness_mode": "v3"})
    with pytest.raises(ValueError, match="blur_prob"):
        spec.augment_params({"blur_prob": 1.5})
    with pytest.raises(ValueError, match="augmentation"):
        augment.make_view_fn("mixup", augment.AugmentParams())


def test_jitter_hue_shift_within_strength():
    # One pixel: contrast (around the image mean) does nothing, multiplicative brightness and
    # saturation keep the hue, so the hue moves by the hue delta alone: |delta| <= 0.2 s.
    strength = 0.5
    pixel = tf.constant([[[0.5, 0.4, 0.35]]], tf.float32)
    hue_in = tf.image.rgb_to_hsv(pixel)[0, 0, 0].numpy()
    jitter = tf.function(lambda s: tf.image.rgb_to_hsv(_color_jitter(pixel, s, strength)))
    shifts = []
    for seed in _seeds(300):
        delta = jitter(seed)[0, 0, 0].numpy() - hue_in
        shifts.append((delta + 0.5) % 1.0 - 0.5)  # hue is circular
    shifts = np.array(shifts)
    assert np.abs(shifts).max() <= 0.2 * strength + 1e-4
    assert shifts.min() < -0.08 and shifts.max() > 0.08


def _reference_view(image, seed, params):
    """simclr_view as it was before the fused `distort`: the per-op functions in order."""
    crop_seed, flip_seed, color_seed, blur_seed = tf.unstack(augment.split_seed(seed, 4))
    image = augment.random_crop_resize(image, crop_seed, params.image_size, params.crop_min_area)
    image = augment.random_flip(image, flip_seed, params.flip_prob)
    image = _random_color_distortion(image, color_seed, params)
    image = tf.clip_by_value(image, 0.0, 1.0)
    image = _random_blur(image, blur_seed, params.blur_prob, params.image_size)
    return tf.clip_by_value(image, 0.0, 1.0)


@pytest.mark.parametrize(
    "strength,mode,blur", [(0.5, "simclrv2", 0.0), (1.0, "simclrv2", 0.5), (2.0, "simclrv1", 0.5)]
)
def test_fused_view_equals_per_op_reference(strength, mode, blur):
    # Same seeds -> same draws -> the same view within float rounding; uint8 input so the
    # bicubic overshoot (values outside [0, 1]) reaches the jitter as in the pipeline.
    params = augment.AugmentParams(
        image_size=32, color_jitter_strength=strength, brightness_mode=mode, blur_prob=blur
    )
    image = tf.constant((_random_images(1, 48, seed=6)[0] * 255).astype(np.uint8))
    fused = tf.function(lambda s: augment.simclr_view(image, s, params))
    reference = tf.function(lambda s: _reference_view(image, s, params))
    for seed in _seeds(150):
        np.testing.assert_allclose(fused(seed).numpy(), reference(seed).numpy(), atol=2e-5)


def test_fused_saturation_and_hue_equal_the_kernels():
    rng = np.random.default_rng(7)
    pixels = rng.uniform(-0.1, 1.1, (64, 64, 3)).astype(np.float32)
    pixels[0, :8] = [[0.5] * 3, [0.0] * 3, [1, 0, 0], [0, 1, 1], [-0.1, -0.2, 0.0], [1.1, 1.0, 0.2],
                     [0.3, 0.3, 0.6], [0.2, 0.5, 0.5]]  # fmt: skip
    x = tf.constant(pixels)
    for factor in (-0.5, 0.0, 0.6, 1.0, 1.8, 3.0):
        np.testing.assert_allclose(
            augment._saturation(x, factor), tf.image.adjust_saturation(x, factor), atol=2e-6
        )
    for delta in (-1.0, -0.5, -0.2, 0.0, 0.1, 0.5, 0.99):
        np.testing.assert_allclose(augment._hue(x, delta), tf.image.adjust_hue(x, delta), atol=5e-6)


def _kernel_jitter(image, seed, strength, mode):
    """The reference's colour jitter written with TensorFlow's own image kernels, on the draws
    of augment.sample_jitter_draws: what augment's single jitter implementation must equal."""
    d = augment.sample_jitter_draws(seed, strength, mode)
    ops = [
        lambda x: x * d["brightness_scale"] + d["brightness_shift"],
        lambda x: tf.image.adjust_contrast(x, d["contrast"]),
        lambda x: tf.image.adjust_saturation(x, d["saturation"]),
        lambda x: tf.image.adjust_hue(x, d["hue"]),
    ]
    for i in range(4):
        image = tf.switch_case(d["order"][i], [lambda f=f, x=image: f(x) for f in ops])
        image = tf.clip_by_value(image, 0.0, 1.0)
    return image


@pytest.mark.parametrize("strength,mode", [(0.5, "simclrv2"), (1.0, "simclrv1")])
def test_color_jitter_equals_tensorflow_kernels(strength, mode):
    image = tf.constant(_random_images(1, 16, seed=8)[0])
    ours = tf.function(lambda s: _color_jitter(image, s, strength, mode))
    kernels = tf.function(lambda s: _kernel_jitter(image, s, strength, mode))
    for seed in _seeds(60):
        np.testing.assert_allclose(ours(seed).numpy(), kernels(seed).numpy(), atol=2e-5)


def test_fused_contrast_equals_the_kernel():
    x = tf.constant(_random_images(2, 12, seed=9))
    for factor in (0.2, 1.0, 1.8):
        np.testing.assert_allclose(
            augment._contrast(x, factor), tf.image.adjust_contrast(x, factor), atol=2e-6
        )


def test_seed_split_and_uniform_draws_match_the_public_stateless_ops():
    # augment uses the one-op V1 kernels; they must give the tf.random.stateless_* values.
    for seed in _seeds(50) + [tf.constant([-(2**62), 2**61 + 5], tf.int64)]:
        np.testing.assert_array_equal(
            augment.split_seed(seed, 5), tf.random.experimental.stateless_split(seed, 5)
        )
        expected = tf.random.stateless_uniform([], seed=seed, minval=0.6, maxval=1.4)
        assert float(augment._uniform(seed, 0.6, 1.4)) == float(expected)
