"""The tf.data path's SimCLR augmentations: TensorFlow ops with explicit stateless seeds, so
(image, seed) gives the same view eagerly and inside tf.data. Images are float32 [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from simclr_jax.data.spec import (
    ASPECT_RATIO_RANGE,
    AUGMENTATIONS,
    BLUR_SIGMA_RANGE,
    EVAL_CROP_PROPORTION,
    MAX_CROP_ATTEMPTS,
    MIN_OBJECT_COVERED,
    AugmentParams,
    blur_kernel_size,
    jitter_ranges,
)

# The V1 stateless ops give the same values as tf.random.stateless_uniform and
# tf.random.experimental.stateless_split (Philox on CPU, tested) with one op per draw instead of
# two: a view makes ~15 draws, and per-op overhead is most of their cost in tf.data.


def split_seed(seed: tf.Tensor, num: int) -> tf.Tensor:
    """Splits a [2] stateless seed into `num` independent [2] seeds (shape [num, 2])."""
    seed = tf.cast(seed, tf.int64)
    return tf.raw_ops.StatelessRandomUniformFullInt(shape=[num, 2], seed=seed, dtype=tf.int64)


def _uniform(seed: tf.Tensor, minval: float | tf.Tensor = 0.0, maxval: float | tf.Tensor = 1.0):
    minval, maxval = tf.cast(minval, tf.float32), tf.cast(maxval, tf.float32)
    unit = tf.raw_ops.StatelessRandomUniform(shape=[], seed=seed, dtype=tf.float32)
    return unit * (maxval - minval) + minval


def _apply_with_prob(
    prob: float, seed: tf.Tensor, fn, image: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Applies fn(image) with probability `prob`; returns (image, applied)."""
    applied = _uniform(seed) < prob
    return tf.cond(applied, lambda: fn(image), lambda: image), applied


# ---------------------------------------------------------------- crop and resize


def sample_crop_window(
    image_shape: tf.Tensor, seed: tf.Tensor, area_range: tuple[float, float] = (0.08, 1.0)
) -> tuple[tf.Tensor, tf.Tensor]:
    """Inception-style crop window (whole image as fallback); returns ([y, x], [h, w])."""
    image_shape = tf.cast(image_shape, tf.int32)
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.stack([image_shape[0], image_shape[1], tf.constant(1, tf.int32)]),
        bounding_boxes=bbox,
        seed=seed,
        min_object_covered=MIN_OBJECT_COVERED,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=area_range,
        max_attempts=MAX_CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[:2], size[:2]


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] (or float [0, 1]) -> float32 [0, 1]."""
    return tf.image.convert_image_dtype(image, tf.float32)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bicubic resize to (size, size) as float32 clipped to [0, 1]; no-op at that size."""
    image = to_float(image)
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    resized = tf.cond(
        same,
        lambda: image,
        lambda: tf.clip_by_value(tf.image.resize(image, [size, size], method="bicubic"), 0.0, 1.0),
    )
    return tf.ensure_shape(resized, [size, size, 3])


def random_crop_resize(
    image: tf.Tensor, seed: tf.Tensor, size: int, crop_min_area: float = 0.08
) -> tf.Tensor:
    """Random resized crop (crop first, then one bicubic resize of the window), NOT clipped:
    the reference clips only after the colour distortion, so bicubic overshoot reaches the
    jitter as in the authors' code (the Grain path's host crops do the same)."""
    begin, crop_size = sample_crop_window(tf.shape(image), seed, area_range=(crop_min_area, 1.0))
    return crop_resize(image, begin, crop_size, size)


def crop_resize(image: tf.Tensor, begin: tf.Tensor, crop_size: tf.Tensor, size: int) -> tf.Tensor:
    """The window at begin [y, x] of crop_size [h, w], bicubic-resized to size, not clipped."""
    crop = tf.slice(image, tf.concat([begin, [0]], 0), tf.concat([crop_size, [-1]], 0))
    resized = tf.image.resize(to_float(crop), [size, size], method="bicubic")
    return tf.ensure_shape(resized, [size, size, 3])


def random_flip(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
    """Horizontal flip with probability `prob`."""
    return _apply_with_prob(prob, seed, lambda x: tf.reverse(x, axis=[1]), image)[0]


# ---------------------------------------------------------------- colour


def sample_jitter_draws(
    seed: tf.Tensor, strength: float, brightness_mode: str = "simclrv2"
) -> dict[str, tf.Tensor]:
    """The random draws of one colour jitter: op order and the four factors."""
    bright, contrast, saturation, hue = jitter_ranges(strength, brightness_mode)
    order_seed, b_seed, c_seed, s_seed, h_seed = tf.unstack(split_seed(seed, 5))
    brightness = _uniform(b_seed, *bright)
    v2 = brightness_mode == "simclrv2"  # brightness is x * scale + shift: v2 draws the scale
    return {
        "order": tf.argsort(tf.raw_ops.StatelessRandomUniform(shape=[4], seed=order_seed)),
        "brightness_scale": brightness if v2 else tf.constant(1.0),
        "brightness_shift": tf.constant(0.0) if v2 else brightness,
        "contrast": _uniform(c_seed, *contrast),
        "saturation": _uniform(s_seed, *saturation),
        "hue": _uniform(h_seed, *hue),
    }


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """Luma tiled back to three channels."""
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


# ---------------------------------------------------------------- blur


def gaussian_kernel_1d(sigma: tf.Tensor, kernel_size: int) -> tf.Tensor:
    """Normalized 1-D Gaussian taps, shape (kernel_size,)."""
    radius = kernel_size // 2
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    taps = tf.exp(-tf.square(x) / (2.0 * tf.square(tf.cast(sigma, tf.float32))))
    return taps / tf.reduce_sum(taps)


def _blur_matrix(taps: tf.Tensor, n: int) -> tf.Tensor:
    """(B, K) taps -> (B, n, n) banded matrices M with M[i, j] = taps[j - i + K // 2]; rows
    simply miss the taps that fall outside the image, which is zero padding."""
    radius = taps.shape[-1] // 2
    offsets = tf.range(n)[None, :] - tf.range(n)[:, None] + radius  # (n, n)
    inside = tf.logical_and(offsets >= 0, offsets <= 2 * radius)
    gathered = tf.gather(taps, tf.clip_by_value(offsets, 0, 2 * radius), axis=1)
    return tf.where(inside[None], gathered, 0.0)


def gaussian_blur(images: tf.Tensor, sigma: tf.Tensor, kernel_size: int) -> tf.Tensor:
    """Separable Gaussian blur with zero padding of (H, W, C) images with a scalar sigma, or
    (B, H, W, C) with sigmas (B,). Each 1-D pass is a matmul with a banded matrix: on CPUs
    several times faster than a depthwise convolution with a large kernel."""
    single = images.shape.rank == 3
    if single:
        images, sigma = images[None], tf.reshape(sigma, [1])
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    taps = tf.map_fn(
        lambda s: gaussian_kernel_1d(s, kernel_size),
        tf.reshape(tf.cast(sigma, tf.float32), [-1]),
        fn_output_signature=tf.TensorSpec([kernel_size], tf.float32),
    )
    rows, cols = _blur_matrix(taps, shape[1]), _blur_matrix(taps, shape[2])
    out = tf.einsum("bij,bjwc->biwc", rows, images)
    out = tf.einsum("bwj,bhjc->bhwc", cols, out)
    out = tf.ensure_shape(tf.clip_by_value(out, 0.0, 1.0), images.shape)
    return out[0] if single else out


# ---------------------------------------------------------------- full transforms


def sample_view_draws(
    flip_seed: tf.Tensor, color_seed: tf.Tensor, blur_seed: tf.Tensor, params: AugmentParams
) -> dict[str, tf.Tensor]:
    """Every random draw of a view after its crop: flip, then from color_seed the jitter's
    (seed, apply, grayscale) splits, from blur_seed the (apply, sigma) splits."""
    jitter_seed, jitter_apply_seed, gray_seed = tf.unstack(split_seed(color_seed, 3))
    blur = params.blur_prob > 0.0
    blur_apply_seed, sigma_seed = tf.unstack(split_seed(blur_seed, 2)) if blur else (None, None)
    return {
        "flip": _uniform(flip_seed) < params.flip_prob,
        "jitter": _uniform(jitter_apply_seed) < params.color_jitter_prob,
        **sample_jitter_draws(jitter_seed, params.color_jitter_strength, params.brightness_mode),
        "gray": _uniform(gray_seed) < params.grayscale_prob,
        # No blur draws at blur_prob 0: each draw costs a few microseconds.
        "blur": _uniform(blur_apply_seed) < params.blur_prob if blur else tf.constant(False),
        "sigma": _uniform(sigma_seed, *BLUR_SIGMA_RANGE) if blur else tf.constant(1.0),
    }


def _max_min(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return tf.maximum(r, tf.maximum(g, b)), tf.minimum(r, tf.minimum(g, b))


def _saturation(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """tf.image.adjust_saturation without the HSV round trip: scaling S = (max - min) / max at
    fixed hue and V = max moves every channel towards the max, c' = max + (c - max) * f with
    f = clip(factor, 0, max / (max - min)) (S clipped to [0, 1] as the kernel does); max <= 0
    gives S = 0 (all channels = max), again as the kernel. One known difference: when red is
    the max and green is below blue by a few ulps, the kernel's hue rounds to 1.0, falls out
    of its switch and returns a gray pixel; here the pixel keeps its (correct) colour."""
    vmax, vmin = _max_min(x)
    f = tf.maximum(tf.minimum(factor, tf.math.divide_no_nan(vmax, vmax - vmin)), 0.0)
    vmax, f = vmax[..., None], tf.where(vmax > 0, f, 0.0)[..., None]
    return vmax + (x - vmax) * f


def _hue(x: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    """tf.image.adjust_hue in one pass: hue in sextants h in [0, 6) from RGB, shifted by
    6 * delta, then back to RGB with the closed form c = max - (max - min) *
    clip(min(k, 4 - k), 0, 1), k = (h + n_c) mod 6, n = (5, 3, 1) for (r, g, b). Wraps with
    floor and compares, not floormod (a slow library call per element under XLA).
    Same values as the kernel within float rounding (tests/test_augment.py)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    vmax, vmin = _max_min(x)
    spread = vmax - vmin
    inv = tf.math.divide_no_nan(1.0, spread)
    hue = tf.where(
        tf.equal(r, vmax),
        (g - b) * inv,
        tf.where(tf.equal(g, vmax), (b - r) * inv + 2.0, (r - g) * inv + 4.0),
    )
    hue = hue + 6.0 * delta
    hue = hue - 6.0 * tf.floor(hue / 6.0)
    k = hue[..., None] + tf.constant([5.0, 3.0, 1.0])
    k = tf.where(k >= 6.0, k - 6.0, k)
    t = tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0)
    return vmax[..., None] - spread[..., None] * t


def _contrast(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """tf.image.adjust_contrast: (x - per-channel mean) * factor + mean."""
    mean = tf.reduce_mean(x, axis=[-3, -2], keepdims=True)
    return (x - mean) * factor + mean


def _jitter(x: tf.Tensor, d: dict[str, tf.Tensor]) -> tf.Tensor:
    """The colour jitter maths, once, for drawn factors `d` (sample_jitter_draws): the four
    ops in d['order'], clipped after each (the branches read x when called, i.e. the output
    of the previous step). Contrast, saturation and hue equal TensorFlow's kernels within
    float rounding (tests/test_augment.py)."""
    ops = [
        lambda: x * d["brightness_scale"] + d["brightness_shift"],
        lambda: _contrast(x, d["contrast"]),
        lambda: _saturation(x, d["saturation"]),
        lambda: _hue(x, d["hue"]),
    ]
    for i in range(4):
        x = tf.clip_by_value(tf.switch_case(d["order"][i], ops), 0.0, 1.0)
    return x


def _distort(image: tf.Tensor, d: dict[str, tf.Tensor]) -> tf.Tensor:
    image = tf.cond(d["flip"], lambda: tf.reverse(image, axis=[1]), lambda: image)
    image = tf.cond(d["jitter"], lambda: _jitter(image, d), lambda: image)
    image = tf.cond(d["gray"], lambda: to_grayscale(image), lambda: image)
    # The reference clips here (end of preprocess_for_train), then blurs and clips again.
    image = tf.clip_by_value(image, 0.0, 1.0)
    kernel = blur_kernel_size(image.shape[0])
    blurred = lambda: gaussian_blur(image, d["sigma"], kernel)  # noqa: E731
    return tf.cond(d["blur"], blurred, lambda: image)


# Everything of simclr_view after the crop (flip, colour jitter, grayscale, blur, clips) for
# drawn values `d` (sample_view_draws); equal, within float rounding, to the per-op functions
# above and to TensorFlow's colour kernels (tests/test_augment.py). XLA fuses the dozens of
# element-wise passes into a few loops: the HSV kernels alone cost ~1 ms per 224 px view, the
# fused jitter a fraction of that.
distort = tf.function(_distort, jit_compile=True)


@tf.function(jit_compile=True)
def distort_batch(images: tf.Tensor, d: dict[str, tf.Tensor]) -> tf.Tensor:
    """distort over a batch (B, S, S, 3) with draws of shape (B, ...): one XLA call whose loop
    runs each image's own conditionals and op order, ~3x cheaper than a call per view at 32 px
    (same outputs)."""
    return tf.map_fn(lambda a: _distort(*a), (images, d), fn_output_signature=tf.float32)


def simclr_crop(image: tf.Tensor, seed: tf.Tensor, params: AugmentParams):
    """The per-image part of simclr_view: (crop+resize, draws for distort)."""
    crop_seed, flip_seed, color_seed, blur_seed = tf.unstack(split_seed(seed, 4))
    crop = random_crop_resize(image, crop_seed, params.image_size, params.crop_min_area)
    return crop, sample_view_draws(flip_seed, color_seed, blur_seed, params)


def simclr_view(image: tf.Tensor, seed: tf.Tensor, params: AugmentParams) -> tf.Tensor:
    """One pretraining view: crop+resize, flip, colour distortion, blur (per data_config)."""
    return distort(*simclr_crop(image, seed, params))


def crop_flip_view(image: tf.Tensor, seed: tf.Tensor, params: AugmentParams) -> tf.Tensor:
    """Fine-tune / linear-eval train transform: crop+resize and flip only."""
    crop_seed, flip_seed = tf.unstack(split_seed(seed, 2))
    image = random_crop_resize(image, crop_seed, params.image_size, params.crop_min_area)
    return tf.clip_by_value(random_flip(image, flip_seed, params.flip_prob), 0.0, 1.0)


def eval_transform(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Center crop keeping 0.875 of the shorter side, then resize; no crop for <= 32 px."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]

    def center_crop() -> tf.Tensor:
        side = tf.cast(
            tf.round(EVAL_CROP_PROPORTION * tf.cast(tf.minimum(h, w), tf.float32)), tf.int32
        )
        top, left = (h - side + 1) // 2, (w - side + 1) // 2
        return tf.slice(image, [top, left, 0], [side, side, -1])

    small = tf.logical_and(h <= 32, w <= 32)
    cropped = tf.cond(small, lambda: image, center_crop)
    return resize(cropped, image_size)


def make_view_fn(augmentation: str, params: AugmentParams) -> tuple[Callable, Callable]:
    """(per_view(image, seed) per example, per_batch(batched per_view outputs) -> images
    (batch, views, S, S, 3)): SimCLR crops per example (sizes differ), distorts per batch."""
    if augmentation == "simclr":

        def per_batch(views):
            crops, draws = views
            flat = lambda x: tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))  # noqa: E731
            images = distort_batch(flat(crops), tf.nest.map_structure(flat, draws))
            return tf.ensure_shape(tf.reshape(images, tf.shape(crops)), crops.shape)

        return lambda image, seed: simclr_crop(image, seed, params), per_batch
    if augmentation == "crop_flip":
        return lambda image, seed: crop_flip_view(image, seed, params), lambda views: views
    raise ValueError(f"augmentation={augmentation!r}; allowed: {AUGMENTATIONS}.")
