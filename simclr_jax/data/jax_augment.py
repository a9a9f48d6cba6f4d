"""SimCLR augmentations in pure JAX, run on the accelerator, one PRNG key per example and view.

Where the crop runs and why: on the device, like every other op here. The host pipeline then
only decodes images to one fixed size and ships them once as uint8 (one (H, W, 3) image per
example instead of two float32 views: 8x fewer bytes over PCIe/host memory and almost no host
CPU, which is what starves TPU hosts). A variable-size crop window would need dynamic shapes,
so each example's window becomes two small resampling matrices (bicubic weights restricted to
the window), and crop + resize + flip is two batched matmuls with static shapes. The blur is
matmuls too. Caveat: all images of a batch must share one (H, W), so sources of mixed sizes
(ImageNet) need a host-side resize first, and the crop then samples that resized image.
That is why the training input (grain_pipeline.py) now crops on the host, at full
resolution, and passes (B, V, S, S, 3) crops, for which augment_views skips the crop
(augment_cropped_views); the device crop stays for callers whose images share one size.

Semantics follow the authors' TensorFlow code (tf.image ops), so this path and the tf.data path
produce the same distribution of views:
- Crop: `tf.image.sample_distorted_bounding_box` with bbox = the whole image, area range
  (crop_min_area, 1), aspect (w/h) range (3/4, 4/3), min_object_covered 0.1, 100 attempts, all
  evaluated at once and the first valid one taken, else the whole image. Per attempt TF draws the
  aspect ratio, then the crop height uniformly among the integers from the height giving the
  minimum area to the largest that fits (so areas are not uniform), width = round(h * ratio),
  offsets uniform in [0, H - h) (TF never touches the bottom/right edge unless the crop spans the
  image). min_object_covered against the whole image rejects crops under 10% of the image, so the
  effective minimum area is max(crop_min_area, 0.1) = 0.1 (rejected attempts are redrawn, not
  clamped).
- Resize: bicubic (Keys, a = -0.5), half-pixel centres, no antialiasing, taps outside the crop
  window dropped and the weights renormalized, i.e. `tf.image.resize(crop, method="bicubic")`.
  Not clipped: as in the reference (and augment.random_crop_resize), bicubic overshoot goes
  into the colour jitter, and the view is clipped after jitter/grayscale, before the blur.
- Colour: brightness (simclrv2: x * U[max(0, 1-b), 1+b]; simclrv1: x + U[-b, b]), contrast
  (`tf.image.adjust_contrast`: around each channel's mean), saturation
  (`tf.image.adjust_saturation`: HSV saturation scaled and clipped to [0, 1]), hue
  (`tf.image.adjust_hue`: HSV hue rotated); b = c = sat = 0.8 s, h = 0.2 s, random order,
  clip to [0, 1] after each. Saturation and hue use closed forms of the HSV round trip (value and
  chroma are unchanged by both), which is exact and needs no branches.
- Grayscale: ITU-R 601 luma (0.2989, 0.5870, 0.1140) tiled to 3 channels.
- Blur: sigma ~ U(0.1, 2.0) per view (the reference draws one per batch), kernel
  2 * ((image_size // 10) // 2) + 1 taps, separable, zero padding, then clip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from simclr_jax import parallel

ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
MIN_OBJECT_COVERED = 0.1
MAX_CROP_ATTEMPTS = 100
BLUR_SIGMA_RANGE = (0.1, 2.0)
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)
BRIGHTNESS_MODES = ("simclrv2", "simclrv1")
AUGMENTATIONS = ("simclr", "crop_flip")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class JaxAugmentParams:
    """Validated, hashable augmentation settings (field names as in `config.data`); named
    apart from augment.AugmentParams (the tf.data path's, which also holds image_size)."""

    crop_min_area: float = 0.08
    flip_prob: float = 0.5
    color_jitter_strength: float = 1.0
    color_jitter_prob: float = 0.8
    brightness_mode: str = "simclrv2"
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5


class ViewDraws(NamedTuple):
    """Every random decision for one view; `apply_view` turns them into pixels."""

    window: jax.Array  # int32 (4,): y, x, height, width of the crop in input pixels
    flip: jax.Array  # bool
    jitter: jax.Array  # bool: apply colour jitter
    jitter_order: jax.Array  # int32 (4,): permutation of (brightness, contrast, saturation, hue)
    jitter_factors: jax.Array  # float32 (4,): brightness factor/delta, contrast, saturation, hue
    grayscale: jax.Array  # bool
    blur: jax.Array  # bool
    blur_sigma: jax.Array  # float32


def augment_params(data_config: Any) -> JaxAugmentParams:
    """Reads and validates the augmentation fields of `config.data` (or a JaxAugmentParams)."""
    fields = {f.name: getattr(data_config, f.name) for f in dataclasses.fields(JaxAugmentParams)}
    for name in ("flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob"):
        if not 0.0 <= fields[name] <= 1.0:
            raise ValueError(f"data.{name}={fields[name]!r} must be a probability in [0, 1].")
    if not 0.0 < fields["crop_min_area"] <= 1.0:
        raise ValueError(f"data.crop_min_area={fields['crop_min_area']!r} must be in (0, 1].")
    # tf.image.random_contrast/random_saturation need 1 - 0.8 s >= 0: the same limit here.
    if not 0.0 <= fields["color_jitter_strength"] <= 1.25:
        raise ValueError(
            f"data.color_jitter_strength={fields['color_jitter_strength']!r} must be in "
            "[0, 1.25] (contrast/saturation factors U[1 - 0.8 s, 1 + 0.8 s] must stay >= 0)."
        )
    if fields["brightness_mode"] not in BRIGHTNESS_MODES:
        raise ValueError(
            f"data.brightness_mode={fields['brightness_mode']!r} must be one of {BRIGHTNESS_MODES}."
        )
    return JaxAugmentParams(**fields)


def blur_kernel_size(image_size: int) -> int:
    """Gaussian blur taps for an output size: image_size // 10 made odd (reference rule)."""
    return 2 * ((image_size // 10) // 2) + 1


# ----------------------------------------------------------------------------- crop window


def _check_crop_args(min_area, max_area, aspect_ratio_range, min_object_covered, max_attempts):
    if not 0.0 < min_area <= max_area <= 1.0:
        raise ValueError(
            f"crop area range ({min_area!r}, {max_area!r}) must satisfy 0 < min <= max <= 1."
        )
    low, high = aspect_ratio_range
    if not 0.0 < low <= high:
        raise ValueError(f"aspect_ratio_range={aspect_ratio_range!r} must satisfy 0 < low <= high.")
    if min_object_covered < 0:
        raise ValueError(f"min_object_covered={min_object_covered!r} must be >= 0.")
    if max_attempts < 1:
        raise ValueError(f"max_attempts={max_attempts!r} must be >= 1.")


def _uniform_int(uniform: jax.Array, count: jax.Array) -> jax.Array:
    """Integers in [0, count) from U[0, 1) draws, for float `count` >= 1 (TF's Uniform(n))."""
    draw = jnp.floor(uniform * count)
    return jnp.minimum(draw, count - 1.0)  # float rounding can reach `count` when u -> 1


def _candidate_heights(uniform, ratio, height, width, min_area, max_area):
    """Crop heights the way TF's GenerateRandomCrop draws them, one per attempt."""
    shortest = jnp.round(jnp.sqrt(min_area / ratio))
    tallest = jnp.round(jnp.sqrt(max_area / ratio))
    # Tallest crop whose rounded width still fits (TF's kEps fix-up, then one more step).
    fitting = jnp.floor((width + 0.5 - 1e-7) / ratio)
    fitting = jnp.where(jnp.round(fitting * ratio) > width, fitting - 1.0, fitting)
    tallest = jnp.where(jnp.round(tallest * ratio) > width, fitting, tallest)
    tallest = jnp.minimum(tallest, float(height))
    shortest = jnp.minimum(shortest, tallest)
    return shortest + _uniform_int(uniform, jnp.maximum(tallest - shortest + 1.0, 1.0))


def crop_window_from_uniforms(
    uniforms: jax.Array,
    height: int,
    width: int,
    *,
    min_area: float = 0.08,
    max_area: float = 1.0,
    aspect_ratio_range: tuple[float, float] = ASPECT_RATIO_RANGE,
    min_object_covered: float = MIN_OBJECT_COVERED,
) -> jax.Array:
    """`sample_crop_window` given its (4, attempts) U[0, 1) draws: ratio, height, y, x."""
    _check_crop_args(min_area, max_area, aspect_ratio_range, min_object_covered, 1)
    image_area = float(height * width)
    min_px, max_px = min_area * image_area, max_area * image_area
    low, high = aspect_ratio_range
    ratio = low + uniforms[0] * (high - low)
    h = _candidate_heights(uniforms[1], ratio, height, width, min_px, max_px)
    w = jnp.round(h * ratio)
    # TF's rounding repairs: one step up if too small, then one step down if too big.
    too_small = w * h < min_px
    h = jnp.where(too_small, h + 1.0, h)
    w = jnp.where(too_small, jnp.round(h * ratio), w)
    too_big = w * h > max_px
    h = jnp.where(too_big, h - 1.0, h)
    w = jnp.where(too_big, jnp.round(h * ratio), w)
    area = w * h
    valid = (area >= min_px) & (area <= max_px) & (h >= 1) & (w >= 1)
    valid &= (h <= height) & (w <= width) & (area / image_area >= min_object_covered)
    y = jnp.where(h < height, _uniform_int(uniforms[2], jnp.maximum(height - h, 1.0)), 0.0)
    x = jnp.where(w < width, _uniform_int(uniforms[3], jnp.maximum(width - w, 1.0)), 0.0)
    first = jnp.argmax(valid)
    whole = jnp.array([0, 0, height, width], jnp.int32)
    chosen = jnp.stack([y[first], x[first], h[first], w[first]]).astype(jnp.int32)
    return jnp.where(valid[first], chosen, whole)


def sample_crop_window(
    key: jax.Array,
    height: int,
    width: int,
    *,
    min_area: float = 0.08,
    max_area: float = 1.0,
    aspect_ratio_range: tuple[float, float] = ASPECT_RATIO_RANGE,
    min_object_covered: float = MIN_OBJECT_COVERED,
    max_attempts: int = MAX_CROP_ATTEMPTS,
) -> jax.Array:
    """Inception crop window int32 [y, x, h, w] like tf.image.sample_distorted_bounding_box
    with the whole image as the box; all attempts drawn at once, first valid wins, else all."""
    _check_crop_args(min_area, max_area, aspect_ratio_range, min_object_covered, max_attempts)
    return crop_window_from_uniforms(
        jax.random.uniform(key, (4, max_attempts)),
        height,
        width,
        min_area=min_area,
        max_area=max_area,
        aspect_ratio_range=aspect_ratio_range,
        min_object_covered=min_object_covered,
    )


# ----------------------------------------------------------------------------- resampling


def _keys_cubic(t: jax.Array) -> jax.Array:
    """Keys cubic convolution kernel with a = -0.5 (TF / PIL 'bicubic')."""
    a, t = -0.5, jnp.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return jnp.where(t <= 1.0, near, jnp.where(t < 2.0, far, 0.0))


def resize_matrix(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
    """(out_size, in_size) bicubic weights resampling input pixels [start, start + length)."""
    start, length = jnp.asarray(start, jnp.float32), jnp.asarray(length, jnp.float32)
    centers = start + (jnp.arange(out_size) + 0.5) * (length / out_size) - 0.5
    pixels = jnp.arange(in_size, dtype=jnp.float32)
    weights = _keys_cubic(centers[:, None] - pixels[None, :])
    # Like resizing the cropped image: pixels outside the window do not exist.
    inside = (pixels >= start) & (pixels < start + length)
    weights = jnp.where(inside[None, :], weights, 0.0)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def _separable(rows: jax.Array, image: jax.Array, cols: jax.Array) -> jax.Array:
    """out[i, l] = sum_jk rows[i, j] image[j, k] cols[l, k], per channel."""
    tmp = jnp.einsum("ij,jkc->ikc", rows, image, precision=_HIGHEST)
    return jnp.einsum("ikc,lk->ilc", tmp, cols, precision=_HIGHEST)


def crop_resize_flip(
    image: jax.Array, window: jax.Array, image_size: int, flip: jax.Array | bool = False
) -> jax.Array:
    """Crops `window` [y, x, h, w], resizes it bicubically to image_size^2, flips if asked."""
    height, width = image.shape[0], image.shape[1]
    rows = resize_matrix(window[0], window[2], height, image_size)
    cols = resize_matrix(window[1], window[3], width, image_size)
    # A horizontal flip of the output is the column matrix read backwards.
    cols = jnp.where(flip, cols[::-1], cols)
    return _separable(rows, image, cols)


# ----------------------------------------------------------------------------- colour


def adjust_brightness(image: jax.Array, factor: jax.Array, mode: str = "simclrv2") -> jax.Array:
    """simclrv2: image * factor; simclrv1: image + factor (an additive delta)."""
    return image * factor if mode == "simclrv2" else image + factor


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """tf.image.adjust_contrast: scales each channel's deviation from its own mean."""
    mean = jnp.mean(image, axis=(0, 1), keepdims=True)
    return (image - mean) * factor + mean


def _value_chroma(image: jax.Array) -> tuple[jax.Array, jax.Array]:
    value = jnp.max(image, axis=-1, keepdims=True)
    return value, value - jnp.min(image, axis=-1, keepdims=True)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    """tf.image.adjust_saturation: HSV saturation * factor clipped to [0, 1], hue/value kept."""
    value, chroma = _value_chroma(image)
    # With H and V fixed every channel is V - S * V * g(H), so scaling S scales V - x;
    # the clip S' <= 1 caps the scale at 1 / S = V / C.
    safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
    scale = jnp.where(value > 0, jnp.minimum(factor, value / safe_chroma), 0.0)
    return value - scale * (value - image)


def rgb_to_hue(image: jax.Array) -> jax.Array:
    """HSV hue in [0, 1) (0 for gray pixels), as in tf.image.rgb_to_hsv."""
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    value, chroma = _value_chroma(image)
    value, chroma = value[..., 0], chroma[..., 0]
    safe = jnp.where(chroma > 0, chroma, 1.0)
    hue = jnp.where(
        value == red,
        (green - blue) / safe,
        jnp.where(value == green, (blue - red) / safe + 2.0, (red - green) / safe + 4.0),
    )
    return jnp.where(chroma > 0, jnp.mod(hue / 6.0, 1.0), 0.0)


def adjust_hue(image: jax.Array, delta: jax.Array) -> jax.Array:
    """tf.image.adjust_hue: rotates the HSV hue by `delta` (in turns), value/chroma kept."""
    value, chroma = _value_chroma(image)
    hue = jnp.mod(rgb_to_hue(image) + delta, 1.0)[..., None]
    # Closed-form HSV -> RGB: channel n (R=5, G=3, B=1) is V - C * clip(min(k, 4 - k), 0, 1).
    k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + 6.0 * hue, 6.0)
    return value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def to_grayscale(image: jax.Array) -> jax.Array:
    """ITU-R 601 luma (tf.image.rgb_to_grayscale) tiled back to 3 channels."""
    luma = jnp.tensordot(image, jnp.array(LUMA_WEIGHTS, image.dtype), axes=1, precision=_HIGHEST)
    return jnp.repeat(luma[..., None], 3, axis=-1)


def jitter_ranges(strength: float, brightness_mode: str) -> tuple[tuple[float, float], ...]:
    """Uniform ranges of the brightness, contrast, saturation and hue draws for a strength."""
    b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength
    bright = (max(0.0, 1.0 - b), 1.0 + b) if brightness_mode == "simclrv2" else (-b, b)
    return bright, (1.0 - c, 1.0 + c), (1.0 - s, 1.0 + s), (-h, h)


def color_jitter(
    image: jax.Array,
    order: jax.Array,
    factors: jax.Array,
    *,
    strength: float,
    brightness_mode: str = "simclrv2",
) -> jax.Array:
    """Applies the four colour ops in `order` with `factors`, clipping to [0, 1] after each."""
    ops = [
        lambda x: adjust_brightness(x, factors[0], brightness_mode),
        lambda x: adjust_contrast(x, factors[1]),
        lambda x: adjust_saturation(x, factors[2]),
        lambda x: adjust_hue(x, factors[3]),
    ]
    # The reference skips an op of strength 0 (identity), but still clips after its slot.
    ops = [op if strength > 0 else (lambda x: x) for op in ops]
    # A loop (not 4 unrolled switches) keeps one copy of each op in the program: under vmap
    # every branch runs at every step anyway, and the unrolled form compiles 4x slower.
    step = lambda i, x: jnp.clip(jax.lax.switch(order[i], ops, x), 0.0, 1.0)
    return jax.lax.fori_loop(0, 4, step, image)


# ----------------------------------------------------------------------------- blur


def blur_matrix(sigma: jax.Array, kernel_size: int, size: int) -> jax.Array:
    """(size, size) matrix of a zero-padded 1-D Gaussian blur with `kernel_size` taps."""
    radius = kernel_size // 2
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    norm = jnp.sum(jnp.exp(-(taps**2) / (2.0 * sigma**2)))
    offset = jnp.arange(size, dtype=jnp.float32)[:, None] - jnp.arange(size)[None, :]
    weights = jnp.exp(-(offset**2) / (2.0 * sigma**2)) / norm
    return jnp.where(jnp.abs(offset) <= radius, weights, 0.0)


def gaussian_blur(image: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
    """Separable Gaussian blur with zero padding ('SAME'), like the reference gaussian_blur."""
    rows = blur_matrix(sigma, kernel_size, image.shape[0])
    cols = blur_matrix(sigma, kernel_size, image.shape[1])
    return _separable(rows, image, cols)


# ----------------------------------------------------------------------------- one view


def _scale(uniform: jax.Array, low: Any, high: Any) -> jax.Array:
    return low + uniform * (high - low)


def sample_view_draws(
    key: jax.Array, params: JaxAugmentParams, height: int, width: int
) -> ViewDraws:
    """Draws every random decision of one view of an (height, width) image from one key."""
    # One random call per view: each threefry call costs about a second of XLA compile time.
    crop_size = 4 * MAX_CROP_ATTEMPTS
    u = jax.random.uniform(key, (crop_size + 13,))
    ranges = jitter_ranges(params.color_jitter_strength, params.brightness_mode)
    low, high = (jnp.array(bound, jnp.float32) for bound in zip(*ranges, strict=True))
    window = crop_window_from_uniforms(
        u[:crop_size].reshape(4, MAX_CROP_ATTEMPTS), height, width, min_area=params.crop_min_area
    )
    rest = u[crop_size:]
    return ViewDraws(
        window=window,
        flip=rest[0] < params.flip_prob,
        jitter=rest[1] < params.color_jitter_prob,
        jitter_order=jnp.argsort(rest[2:6]).astype(jnp.int32),
        jitter_factors=_scale(rest[6:10], low, high),
        grayscale=rest[10] < params.grayscale_prob,
        blur=rest[11] < params.blur_prob,
        blur_sigma=_scale(rest[12], *BLUR_SIGMA_RANGE),
    )


def to_float_image(image: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1]; float images are taken as already in [0, 1]."""
    if image.dtype == jnp.uint8:
        return image.astype(jnp.float32) * (1.0 / 255.0)
    return image.astype(jnp.float32)


def apply_view(
    image: jax.Array, draws: ViewDraws, params: JaxAugmentParams, image_size: int
) -> jax.Array:
    """Pixels of one SimCLR view: crop+resize, flip, jitter, grayscale, clip, blur, clip."""
    view = crop_resize_flip(to_float_image(image), draws.window, image_size, draws.flip)
    if params.color_jitter_prob > 0:
        jittered = color_jitter(
            view,
            draws.jitter_order,
            draws.jitter_factors,
            strength=params.color_jitter_strength,
            brightness_mode=params.brightness_mode,
        )
        view = jnp.where(draws.jitter, jittered, view)
    if params.grayscale_prob > 0:
        view = jnp.where(draws.grayscale, to_grayscale(view), view)
    view = jnp.clip(view, 0.0, 1.0)
    kernel_size = blur_kernel_size(image_size)
    if params.blur_prob > 0 and kernel_size > 1:
        blurred = gaussian_blur(view, draws.blur_sigma, kernel_size)
        view = jnp.clip(jnp.where(draws.blur, blurred, view), 0.0, 1.0)
    return view


def _check_image(image: jax.Array, batched: bool) -> None:
    rank = 4 if batched else 3
    if image.ndim != rank or image.shape[-1] != 3:
        layout = "(B, H, W, 3)" if batched else "(H, W, 3)"
        raise ValueError(f"images of shape {image.shape} must be RGB {layout}.")
    if image.dtype != jnp.uint8 and not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(f"image dtype {image.dtype} must be uint8 or floating point in [0, 1].")


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive integer.")


def _check_batch_options(image_size: int, num_views: int, augmentation: str) -> None:
    _check_size(image_size)
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation={augmentation!r} must be one of {AUGMENTATIONS}.")
    if not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views={num_views!r} must be a positive integer.")


def simclr_augment(
    key: jax.Array, image: jax.Array, data_config: Any, image_size: int
) -> jax.Array:
    """One SimCLR pretraining view (image_size, image_size, 3) float32 in [0, 1]."""
    params = augment_params(data_config)
    _check_image(image, batched=False)
    _check_size(image_size)
    draws = sample_view_draws(key, params, image.shape[0], image.shape[1])
    return apply_view(image, draws, params, image_size)


def crop_and_flip(
    key: jax.Array,
    image: jax.Array,
    image_size: int,
    *,
    crop_min_area: float = 0.08,
    flip_prob: float = 0.5,
) -> jax.Array:
    """Fine-tune / linear-eval train view: inception crop, bicubic resize, flip, clip."""
    _check_image(image, batched=False)
    _check_size(image_size)
    u = jax.random.uniform(key, (4 * MAX_CROP_ATTEMPTS + 1,))
    window = crop_window_from_uniforms(
        u[1:].reshape(4, MAX_CROP_ATTEMPTS), image.shape[0], image.shape[1], min_area=crop_min_area
    )
    view = crop_resize_flip(to_float_image(image), window, image_size, u[0] < flip_prob)
    return jnp.clip(view, 0.0, 1.0)


# ----------------------------------------------------------------------------- batches


def view_keys(key: jax.Array, example_ids: jax.Array, num_views: int) -> jax.Array:
    """Keys (B, num_views): fold_in(fold_in(key, example_id), view), independent of sharding."""
    per_example = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)
    views = jnp.arange(num_views)
    return jax.vmap(lambda k: jax.vmap(lambda v: jax.random.fold_in(k, v))(views))(per_example)


def augment_views(
    key: jax.Array,
    images: jax.Array,
    data_config: Any,
    *,
    num_views: int = 2,
    image_size: int,
    example_ids: jax.Array | None = None,
    augmentation: str = "simclr",
) -> jax.Array:
    """Augments a batch (B, H, W, 3) into (B, num_views, S, S, 3) float32 views in [0, 1].

    `example_ids` (B,) are the GLOBAL example indices (default: position in the batch); keys
    depend only on (key, example id, view), so the views do not depend on the device count.
    """
    params = augment_params(data_config)
    if images.ndim == 5:  # (B, V, S, S, 3): views cropped on the host (grain_pipeline)
        return augment_cropped_views(
            key, images, params, image_size=image_size, example_ids=example_ids,
            augmentation=augmentation,
        )  # fmt: skip
    _check_image(images, batched=True)
    _check_batch_options(image_size, num_views, augmentation)
    if example_ids is None:
        example_ids = jnp.arange(images.shape[0], dtype=jnp.int32)
    if example_ids.shape != images.shape[:1] or not jnp.issubdtype(example_ids.dtype, jnp.integer):
        raise ValueError(
            f"example_ids of shape {example_ids.shape} and dtype {example_ids.dtype} must be "
            f"integers of shape ({images.shape[0]},), one global id per image."
        )
    if augmentation == "simclr":
        one_view = lambda k, image: simclr_augment(k, image, params, image_size)
    else:
        one_view = lambda k, image: crop_and_flip(
            k, image, image_size, crop_min_area=params.crop_min_area, flip_prob=params.flip_prob
        )
    per_example = jax.vmap(one_view, in_axes=(0, None))
    return jax.vmap(per_example)(view_keys(key, example_ids, num_views), images)


def augment_cropped_views(
    key: jax.Array,
    views: jax.Array,
    data_config: Any,
    *,
    image_size: int,
    example_ids: jax.Array,
    augmentation: str = "simclr",
) -> jax.Array:
    """The rest of each view after a host crop: (B, V, S, S, 3) crops -> float32 views with
    flip, colour jitter, grayscale and blur (simclr) or flip only (crop_flip), the same draws
    (from key, example id, view) as augment_views makes apart from the crop window."""
    params = augment_params(data_config)
    _check_batch_options(image_size, views.shape[1], augmentation)
    if views.ndim != 5 or views.shape[2:] != (image_size, image_size, 3):
        raise ValueError(
            f"host-cropped views of shape {views.shape} must be (B, V, {image_size}, "
            f"{image_size}, 3)."
        )
    whole = jnp.array([0, 0, image_size, image_size], jnp.int32)

    def one_view(k, view):
        if augmentation == "simclr":
            draws = sample_view_draws(k, params, image_size, image_size)._replace(window=whole)
            return apply_view(view, draws, params, image_size)
        flip = jax.random.uniform(k, (4 * MAX_CROP_ATTEMPTS + 1,))[0] < params.flip_prob
        return jnp.clip(crop_resize_flip(to_float_image(view), whole, image_size, flip), 0, 1)

    keys = view_keys(key, example_ids, views.shape[1])
    return jax.vmap(jax.vmap(one_view))(keys, views)


def make_augment_fn(
    data_config: Any,
    mesh: Mesh | None = None,
    *,
    image_size: int,
    num_views: int = 2,
    augmentation: str = "simclr",
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """Jitted fn(key, images (B,H,W,3), example_ids (B,)) -> (B, num_views, S, S, 3).

    With a mesh, images, ids and output are sharded on 'data' and the key replicated: every
    device augments its own examples, with no communication.
    """
    params = augment_params(data_config)
    _check_batch_options(image_size, num_views, augmentation)

    def augment(key, images, example_ids):
        return augment_views(
            key,
            images,
            params,
            num_views=num_views,
            image_size=image_size,
            example_ids=example_ids,
            augmentation=augmentation,
        )

    if mesh is None:
        return jax.jit(augment)
    batch, whole = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    return jax.jit(augment, in_shardings=(whole, batch, batch), out_shardings=batch)
