"""The device half of data.backend='jax': flip, colour jitter, grayscale and blur of the
crops grain_pipeline.py makes on the host, in pure JAX under jit, sharded like the batch, one
PRNG key per example and view (so views do not depend on the device count).

The crops arrive as float32 (B, V, S, S, 3), resized but not clipped: as in the reference (and
augment.py), bicubic overshoot goes into the colour jitter, and the view is clipped after
jitter/grayscale, before the blur. The ops follow the authors' tf.image ops (saturation and hue
as exact closed forms of the HSV round trip), except that the blur draws its sigma per view
where the reference draws one per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from simclr_jax import parallel
from simclr_jax.data.spec import (
    AUGMENTATIONS,
    BLUR_SIGMA_RANGE,
    MAX_CROP_ATTEMPTS,
    AugmentParams,
    blur_kernel_size,
    jitter_ranges,
)

LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)
_HIGHEST = jax.lax.Precision.HIGHEST
# Draws per view: 4 * MAX_CROP_ATTEMPTS slots ahead of the 13 view draws. The slots are unused
# (the crop is sampled on the host) but fix where each draw sits in the key's stream, and so
# the views of every (seed, example, view).
_SKIPPED = 4 * MAX_CROP_ATTEMPTS


class ViewDraws(NamedTuple):
    """Every random decision for one view after its crop; `apply_view` turns them into pixels."""

    flip: jax.Array  # bool
    jitter: jax.Array  # bool: apply colour jitter
    jitter_order: jax.Array  # int32 (4,): permutation of (brightness, contrast, saturation, hue)
    jitter_factors: jax.Array  # float32 (4,): brightness factor/delta, contrast, saturation, hue
    grayscale: jax.Array  # bool
    blur: jax.Array  # bool
    blur_sigma: jax.Array  # float32


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
    # out[i, l] = sum_jk rows[i, j] image[j, k] cols[l, k], per channel
    tmp = jnp.einsum("ij,jkc->ikc", rows, image, precision=_HIGHEST)
    return jnp.einsum("ikc,lk->ilc", tmp, cols, precision=_HIGHEST)


# ----------------------------------------------------------------------------- one view


def _scale(uniform: jax.Array, low: Any, high: Any) -> jax.Array:
    return low + uniform * (high - low)


def sample_view_draws(key: jax.Array, params: AugmentParams) -> ViewDraws:
    """Draws every random decision of one view from one key (one random call per view: each
    threefry call costs about a second of XLA compile time)."""
    rest = jax.random.uniform(key, (_SKIPPED + 13,))[_SKIPPED:]
    ranges = jitter_ranges(params.color_jitter_strength, params.brightness_mode)
    low, high = (jnp.array(bound, jnp.float32) for bound in zip(*ranges, strict=True))
    return ViewDraws(
        flip=rest[0] < params.flip_prob,
        jitter=rest[1] < params.color_jitter_prob,
        jitter_order=jnp.argsort(rest[2:6]).astype(jnp.int32),
        jitter_factors=_scale(rest[6:10], low, high),
        grayscale=rest[10] < params.grayscale_prob,
        blur=rest[11] < params.blur_prob,
        blur_sigma=_scale(rest[12], *BLUR_SIGMA_RANGE),
    )


def to_float_image(image: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1]; float images are taken as they are."""
    if image.dtype == jnp.uint8:
        return image.astype(jnp.float32) * (1.0 / 255.0)
    return image.astype(jnp.float32)


def flip(view: jax.Array, flipped: jax.Array | bool) -> jax.Array:
    """The view mirrored left-right where `flipped`."""
    return jnp.where(flipped, view[:, ::-1], view)


def apply_view(crop: jax.Array, draws: ViewDraws, params: AugmentParams) -> jax.Array:
    """One SimCLR view of an (S, S, 3) crop: flip, jitter, grayscale, clip, blur, clip."""
    view = flip(to_float_image(crop), draws.flip)
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
    kernel_size = blur_kernel_size(crop.shape[0])
    if params.blur_prob > 0 and kernel_size > 1:
        blurred = gaussian_blur(view, draws.blur_sigma, kernel_size)
        view = jnp.clip(jnp.where(draws.blur, blurred, view), 0.0, 1.0)
    return view


# ----------------------------------------------------------------------------- batches


def view_keys(key: jax.Array, example_ids: jax.Array, num_views: int) -> jax.Array:
    """Keys (B, num_views): fold_in(fold_in(key, example_id), view), independent of sharding."""
    per_example = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)
    views = jnp.arange(num_views)
    return jax.vmap(lambda k: jax.vmap(lambda v: jax.random.fold_in(k, v))(views))(per_example)


def _check_batch(crops: jax.Array, example_ids: jax.Array) -> None:
    if crops.ndim != 5 or crops.shape[2] != crops.shape[3] or crops.shape[4] != 3:
        raise ValueError(f"crops of shape {crops.shape} must be RGB (B, V, S, S, 3).")
    if crops.dtype != jnp.uint8 and not jnp.issubdtype(crops.dtype, jnp.floating):
        raise ValueError(f"crop dtype {crops.dtype} must be uint8 or floating point.")
    if example_ids.shape != crops.shape[:1] or not jnp.issubdtype(example_ids.dtype, jnp.integer):
        raise ValueError(
            f"example_ids of shape {example_ids.shape} and dtype {example_ids.dtype} must be "
            f"integers of shape ({crops.shape[0]},), one global id per example."
        )


def augment_views(
    key: jax.Array,
    crops: jax.Array,
    params: AugmentParams,
    *,
    example_ids: jax.Array,
    augmentation: str = "simclr",
) -> jax.Array:
    """(B, V, S, S, 3) host crops -> float32 views in [0, 1]: flip, colour jitter, grayscale
    and blur (simclr) or flip only (crop_flip). `example_ids` (B,) are GLOBAL example indices:
    the draws depend only on (key, example id, view)."""
    _check_batch(crops, example_ids)

    def one_view(k, crop):
        if augmentation == "simclr":
            return apply_view(crop, sample_view_draws(k, params), params)
        flipped = jax.random.uniform(k, (_SKIPPED + 1,))[0] < params.flip_prob
        return jnp.clip(flip(to_float_image(crop), flipped), 0.0, 1.0)

    keys = view_keys(key, example_ids, crops.shape[1])
    return jax.vmap(jax.vmap(one_view))(keys, crops)


def make_augment_fn(
    params: AugmentParams, mesh: Mesh | None = None, *, augmentation: str = "simclr"
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """Jitted fn(key, crops (B, V, S, S, 3), example_ids (B,)) -> (B, V, S, S, 3) views; with
    a mesh, all but the key are sharded on 'data', so each device augments its own examples."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation={augmentation!r} must be one of {AUGMENTATIONS}.")

    def augment(key, crops, example_ids):
        return augment_views(key, crops, params, example_ids=example_ids, augmentation=augmentation)

    if mesh is None:
        return jax.jit(augment)
    batch, whole = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    return jax.jit(augment, in_shardings=(whole, batch, batch), out_shardings=batch)
