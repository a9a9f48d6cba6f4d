"""The SimCLR augmentation spec both input backends share: the reference's constants and
AugmentParams, the `config.data` fields the augmentations read.

augment_params(data_config) is the one place those fields are read and validated; augment.py
(tf.data), grain_pipeline.py and jax_augment.py (data.backend='jax') take the frozen result
and do not check it again. No TensorFlow or JAX here.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

# Inception crop (tf.image.sample_distorted_bounding_box with the whole image as the box).
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
MIN_OBJECT_COVERED = 0.1
MAX_CROP_ATTEMPTS = 100
BLUR_SIGMA_RANGE = (0.1, 2.0)
EVAL_CROP_PROPORTION = 0.875  # eval: centre crop keeping this much of the shorter side
BRIGHTNESS_MODES = ("simclrv2", "simclrv1")
AUGMENTATIONS = ("simclr", "crop_flip")  # pretraining views | fine-tuning crop and flip
# The reference's tf.image.random_contrast/random_saturation need 1 - 0.8 s >= 0.
MAX_JITTER_STRENGTH = 1.25
_PROBABILITIES = ("flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Augmentation settings (field names as in `config.data`); made by augment_params."""

    image_size: int = 224
    crop_min_area: float = 0.08
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    color_jitter_strength: float = 1.0
    brightness_mode: str = "simclrv2"
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5


def augment_params(data_config: Any) -> AugmentParams:
    """Reads and validates the augmentation fields of `config.data` (absent ones keep their
    defaults); raises ValueError naming the first bad field."""
    names = [f.name for f in dataclasses.fields(AugmentParams)]
    values = {n: data_config[n] for n in names if n in data_config}
    size = values.get("image_size", AugmentParams.image_size)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"data.image_size={size!r} must be a positive integer.")
    params = AugmentParams(**{**values, "image_size": int(size)})
    if not 0.0 < params.crop_min_area <= 1.0:
        raise ValueError(f"data.crop_min_area={params.crop_min_area!r} must be in (0, 1].")
    for name in _PROBABILITIES:
        value = getattr(params, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"data.{name}={value!r} must be a probability in [0, 1].")
    strength = params.color_jitter_strength
    if not 0.0 <= strength <= MAX_JITTER_STRENGTH:
        raise ValueError(
            f"data.color_jitter_strength={strength!r} must be in [0, {MAX_JITTER_STRENGTH}] "
            "(contrast/saturation factors U[1 - 0.8 s, 1 + 0.8 s] must stay >= 0)."
        )
    if params.brightness_mode not in BRIGHTNESS_MODES:
        raise ValueError(
            f"data.brightness_mode={params.brightness_mode!r}; allowed: {BRIGHTNESS_MODES}."
        )
    return params


def jitter_ranges(strength: float, brightness_mode: str) -> tuple[tuple[float, float], ...]:
    """Uniform ranges of the colour jitter's brightness, contrast, saturation and hue draws at
    a strength (the reference's 0.8 s, 0.8 s, 0.8 s, 0.2 s); simclrv2 brightness is a factor,
    simclrv1 brightness an additive delta."""
    b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength
    bright = (max(0.0, 1.0 - b), 1.0 + b) if brightness_mode == "simclrv2" else (-b, b)
    return bright, (1.0 - c, 1.0 + c), (1.0 - s, 1.0 + s), (-h, h)


def blur_kernel_size(image_size: int) -> int:
    """Gaussian blur taps for a view size: image_size // 10 made odd (the reference's radius
    (image_size // 10) // 2)."""
    return 2 * ((image_size // 10) // 2) + 1
