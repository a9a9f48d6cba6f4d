"""ResNet v1.5 encoder for SimCLR (v1 and v2): widths 1-4, selective kernels, ResNet-D, SE.

Parameter paths are stable names, because checkpoints are restored by name:
  stem/conv1 (conv2, conv3 with ResNet-D)            each a ConvBN with 'conv' and 'bn'
  stage{1..4}/block{0..n-1}/shortcut                 projection 'conv' + 'bn' (first block)
  stage{i}/block{j}/conv1, conv2, conv3              ConvBN (basic blocks: conv1, conv2)
  stage{i}/block{j}/sk_conv                          replaces the 3x3 ConvBN of a bottleneck
                                                     when sk_ratio > 0 (split_conv, reduce, expand)
  stage{i}/block{j}/se                               squeeze-excitation (reduce, expand)

Deliberate fidelity to the reference TensorFlow code (so its checkpoints map one to one):
- the first block of every stage has a projection shortcut, also stage 1 of ResNet-18/34;
- selective kernels replace the 3x3 conv of bottleneck blocks only; for depth 18/34 a positive
  sk_ratio switches on the ResNet-D stem and shortcut pooling and nothing else;
- ResNet-D shortcuts average-pool 2x2 before the 1x1 conv: zero-padded bottom/right and strided
  for strided blocks, 'SAME' with stride 1 (padding not counted) for stride-1 projections.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from simclr_jax.models.conv import make_conv_general_dilated

# depth -> (block kind, blocks per stage)
STAGE_SIZES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
MAX_WIDTH_MULTIPLIER = 4
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SK_MIN_DIM = 32
CONV_OUTPUT = "conv_output"  # checkpoint_name of every convolution output inside a block
# model.remat -> the jax.checkpoint policy of a residual block (None: no remat). 'block' keeps
# only the block's input and recomputes everything; 'conv_outputs' keeps every convolution's
# output and recomputes BatchNorm, ReLU and the SK/SE mixing; 'dots' is JAX's dots_saveable
# (convolutions and matrix products, by primitive: the same on TPU, where every conv is
# conv_general_dilated).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "conv_outputs": jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT),
    "dots": jax.checkpoint_policies.dots_saveable,
}

# The reference's tf.keras.initializers.VarianceScaling() for every conv (SK and SE included):
# scale 1, fan_in, normal truncated at 2 sigma with the std corrected for the truncation.
conv_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
CIFAR_STEM_CHOICES = (True, False, "auto")
CIFAR_STEM_MAX_SIZE = 32  # the reference: cifar_stem = image_size <= 32


def resolve_cifar_stem(cifar_stem: Any, image_size: Any) -> bool:
    """model.cifar_stem True/False as given; 'auto' -> image_size <= 32, as the reference."""
    if isinstance(cifar_stem, (bool, np.bool_)):
        return bool(cifar_stem)
    if cifar_stem != "auto":
        raise ValueError(
            f"model.cifar_stem={cifar_stem!r} is not supported; choose True, False or 'auto' "
            f"(on when data.image_size <= {CIFAR_STEM_MAX_SIZE})"
        )
    if not is_integer(image_size) or image_size <= 0:
        raise ValueError(
            f"model.cifar_stem='auto' needs a positive integer data.image_size, got "
            f"{image_size!r}; fix data.image_size or set model.cifar_stem to True or False"
        )
    return int(image_size) <= CIFAR_STEM_MAX_SIZE


def is_integer(value: Any) -> bool:
    """True for Python and NumPy integers, False for bools and floats (2.0 is not an integer)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """True for Python/NumPy ints and floats, False for bools."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def resolve_dtype(value: Any, field: str = "model.dtype") -> Any:
    """Maps 'float32' | 'bfloat16' (or the matching dtype) to a jnp dtype; ValueError otherwise."""
    name = value if isinstance(value, str) else getattr(value, "__name__", None)
    if name is None:
        try:
            name = np.dtype(value).name
        except TypeError:
            name = repr(value)
    if name not in DTYPES:
        raise ValueError(f"{field}={value!r} is not supported; choose 'float32' or 'bfloat16'")
    return DTYPES[name]


def validate_remat(remat: Any) -> str:
    """Returns model.remat when it names a policy; ValueError listing the known ones."""
    if not isinstance(remat, str) or remat not in REMAT_POLICIES:
        raise ValueError(
            f"model.remat={remat!r} is not a remat policy; choose one of "
            f"{', '.join(map(repr, REMAT_POLICIES))} ('none': keep every activation)"
        )
    return remat


def validate_encoder_args(
    *,
    resnet_depth: Any,
    width_multiplier: Any,
    sk_ratio: Any,
    se_ratio: Any,
    bn_momentum: Any,
    bn_epsilon: Any,
    fine_tune_after_block: Any,
) -> None:
    """Raises ValueError naming the model.* field when an encoder argument is invalid."""
    depths = ", ".join(str(d) for d in STAGE_SIZES)
    if not is_integer(resnet_depth) or int(resnet_depth) not in STAGE_SIZES:
        raise ValueError(
            f"model.resnet_depth={resnet_depth!r} is not supported; choose one of {depths}"
        )
    if not is_integer(width_multiplier):
        raise ValueError(
            f"model.width_multiplier={width_multiplier!r} must be an integer "
            f"(got {type(width_multiplier).__name__}); choose 1..{MAX_WIDTH_MULTIPLIER}"
        )
    if not 1 <= int(width_multiplier) <= MAX_WIDTH_MULTIPLIER:
        raise ValueError(
            f"model.width_multiplier={width_multiplier!r} is out of range; "
            f"choose an integer in 1..{MAX_WIDTH_MULTIPLIER}"
        )
    for field, value in (("sk_ratio", sk_ratio), ("se_ratio", se_ratio)):
        if not is_real(value) or not np.isfinite(value) or value < 0:
            raise ValueError(
                f"model.{field}={value!r} must be a number >= 0 (0 switches it off; "
                f"SimCLRv2 uses sk_ratio=0.0625)"
            )
    if not is_real(bn_momentum) or not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"model.bn_momentum={bn_momentum!r} must be in [0, 1), e.g. 0.9")
    if not is_real(bn_epsilon) or not bn_epsilon > 0:
        raise ValueError(f"model.bn_epsilon={bn_epsilon!r} must be > 0, e.g. 1e-5")
    if not is_integer(fine_tune_after_block) or not -1 <= int(fine_tune_after_block) <= 4:
        raise ValueError(
            f"model.fine_tune_after_block={fine_tune_after_block!r} must be an integer in "
            "-1..4 (-1 trains everything, 0 freezes the stem, k freezes up to stage k, "
            "4 freezes the whole encoder)"
        )


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """Batch-norm constants and compute dtype shared by every layer of the encoder."""

    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    conv_kernel_grad: str = "auto"  # see models/conv.py
    remat: str = "none"  # REMAT_POLICIES

    def tag_conv(self, x: jax.Array) -> jax.Array:
        """Names a conv output for the 'conv_outputs' policy (untouched without remat)."""
        return x if self.remat == "none" else checkpoint_name(x, CONV_OUTPUT)

    def batch_norm(self, train: bool, zero_init_scale: bool = False, name: str = "bn") -> nn.Module:
        """A BatchNorm with float32 params and statistics, computing in self.dtype."""
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            scale_init=nn.initializers.zeros if zero_init_scale else nn.initializers.ones,
            name=name,
        )

    def conv(self, features: int, kernel_size: int, strides: int = 1, **kwargs: Any) -> nn.Module:
        """A bias-free conv with the reference's fixed padding (pad (k-1)//2 before, rest after)."""
        pad_before = (kernel_size - 1) // 2
        pad = (pad_before, kernel_size - 1 - pad_before)
        return nn.Conv(
            features,
            (kernel_size, kernel_size),
            strides=(strides, strides),
            padding=(pad, pad),
            use_bias=False,
            kernel_init=conv_kernel_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            conv_general_dilated=make_conv_general_dilated(self.conv_kernel_grad),
            **kwargs,
        )


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional ReLU."""

    features: int
    kernel_size: int
    strides: int = 1
    relu: bool = True
    zero_init_scale: bool = False
    settings: LayerSettings = LayerSettings()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies the conv and BN; BN uses batch statistics when train is True."""
        x = self.settings.conv(self.features, self.kernel_size, self.strides, name="conv")(x)
        x = self.settings.tag_conv(x)
        x = self.settings.batch_norm(train, self.zero_init_scale)(x)
        return nn.relu(x) if self.relu else x


class SelectiveKernelConv(nn.Module):
    """SimCLRv2 selective-kernel 3x3 conv: two streams mixed by a softmax over global context."""

    features: int
    strides: int
    sk_ratio: float
    settings: LayerSettings = LayerSettings()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Returns (N, H', W', features): the attention-weighted sum of the two streams."""
        x = ConvBN(2 * self.features, 3, self.strides, settings=self.settings, name="split_conv")(
            x, train
        )
        streams = jnp.stack(jnp.split(x, 2, axis=-1))  # (2, N, H, W, f)
        context = jnp.mean(jnp.sum(streams, axis=0), axis=(1, 2), keepdims=True)
        mid_dim = max(int(self.features * self.sk_ratio), SK_MIN_DIM)
        context = ConvBN(mid_dim, 1, settings=self.settings, name="reduce")(context, train)
        mixing = self.settings.tag_conv(
            self.settings.conv(2 * self.features, 1, name="expand")(context)
        )
        # Softmax in float32: the mixing weights are tiny tensors and bf16 exp loses precision.
        mixing = jax.nn.softmax(jnp.stack(jnp.split(mixing.astype(jnp.float32), 2, -1)), axis=0)
        return jnp.sum(streams * mixing.astype(streams.dtype), axis=0)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: channel gates from globally pooled features."""

    reduced_features: int
    settings: LayerSettings = LayerSettings()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Scales every channel of x by a sigmoid gate in (0, 1)."""
        dense = lambda features, name: nn.Conv(
            features,
            (1, 1),
            use_bias=True,
            kernel_init=conv_kernel_init,
            dtype=self.settings.dtype,
            param_dtype=jnp.float32,
            name=name,
        )
        gates = jnp.mean(x, axis=(1, 2), keepdims=True)
        gates = dense(x.shape[-1], "expand")(nn.relu(dense(self.reduced_features, "reduce")(gates)))
        return nn.sigmoid(gates) * x


class Shortcut(nn.Module):
    """Projection shortcut: (ResNet-D: 2x2 avg-pool, then) 1x1 conv + BN without ReLU."""

    features: int
    strides: int
    resnet_d: bool
    settings: LayerSettings = LayerSettings()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Projects x to features channels at the block's output resolution."""
        conv_strides = self.strides
        if self.resnet_d:
            if self.strides > 1:
                # The reference pads one zero row/column at the end and counts it in the mean.
                x = nn.avg_pool(x, (2, 2), (self.strides,) * 2, padding=((0, 1), (0, 1)))
            else:
                x = nn.avg_pool(x, (2, 2), (1, 1), padding="SAME", count_include_pad=False)
            conv_strides = 1
        x = self.settings.tag_conv(
            self.settings.conv(self.features, 1, conv_strides, name="conv")(x)
        )
        return self.settings.batch_norm(train)(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs (stride on the first), last BN gamma initialized to zero."""

    filters: int
    strides: int
    use_projection: bool
    resnet_d: bool = False
    se_ratio: float = 0.0
    settings: LayerSettings = LayerSettings()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """relu(residual(x) + shortcut(x))."""
        shortcut = x
        if self.use_projection:
            shortcut = Shortcut(
                self.filters, self.strides, self.resnet_d, self.settings, name="shortcut"
            )(x, train)
        s = self.settings
        y = ConvBN(self.filters, 3, self.strides, settings=s, name="conv1")(x, train)
        y = ConvBN(self.filters, 3, relu=False, zero_init_scale=True, settings=s, name="conv2")(
            y, train
        )
        if self.se_ratio > 0:
            y = SqueezeExcite(max(1, int(self.filters * self.se_ratio)), s, name="se")(y)
        return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (strided; SK when sk_ratio > 0) -> 1x1 to 4*filters, last BN gamma zero."""

    filters: int
    strides: int
    use_projection: bool
    resnet_d: bool = False
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    settings: LayerSettings = LayerSettings()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """relu(residual(x) + shortcut(x))."""
        s = self.settings
        shortcut = x
        if self.use_projection:
            shortcut = Shortcut(4 * self.filters, self.strides, self.resnet_d, s, name="shortcut")(
                x, train
            )
        y = ConvBN(self.filters, 1, settings=s, name="conv1")(x, train)
        if self.sk_ratio > 0:
            y = SelectiveKernelConv(self.filters, self.strides, self.sk_ratio, s, name="sk_conv")(
                y, train
            )
        else:
            y = ConvBN(self.filters, 3, self.strides, settings=s, name="conv2")(y, train)
        y = ConvBN(4 * self.filters, 1, relu=False, zero_init_scale=True, settings=s, name="conv3")(
            y, train
        )
        if self.se_ratio > 0:
            y = SqueezeExcite(max(1, int(self.filters * self.se_ratio)), s, name="se")(y)
        return nn.relu(y + shortcut)


class Stem(nn.Module):
    """Standard 7x7/2 conv + 3x3/2 max-pool; ResNet-D three 3x3 convs; or CIFAR 3x3/1, no pool."""

    width: int  # 64 * width_multiplier
    cifar_stem: bool = False
    resnet_d: bool = False
    settings: LayerSettings = LayerSettings()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps images (N, H, W, 3) to (N, H/4, W/4, width), or (N, H, W, width) for CIFAR."""
        s = self.settings
        if self.cifar_stem:
            return ConvBN(self.width, 3, 1, settings=s, name="conv1")(x, train)
        if self.resnet_d:
            x = ConvBN(self.width // 2, 3, 2, settings=s, name="conv1")(x, train)
            x = ConvBN(self.width // 2, 3, 1, settings=s, name="conv2")(x, train)
            x = ConvBN(self.width, 3, 1, settings=s, name="conv3")(x, train)
        else:
            x = ConvBN(self.width, 7, 2, settings=s, name="conv1")(x, train)
        return nn.max_pool(x, (3, 3), (2, 2), padding="SAME")


class Stage(nn.Module):
    """One block group: the first block strides and projects, the rest keep the shape."""

    block_kind: str  # basic | bottleneck
    filters: int
    num_blocks: int
    strides: int
    resnet_d: bool = False
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    settings: LayerSettings = LayerSettings()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Runs block0 .. block{num_blocks-1}, each under remat when settings.remat says so."""
        block_class = BasicBlock if self.block_kind == "basic" else BottleneckBlock
        policy = REMAT_POLICIES[self.settings.remat]
        if self.settings.remat != "none":
            # train (argument 2 counting self) is a Python bool that picks BN's mode.
            block_class = nn.remat(block_class, policy=policy, static_argnums=(2,))
        for j in range(self.num_blocks):
            common = dict(
                filters=self.filters,
                strides=self.strides if j == 0 else 1,
                use_projection=j == 0,
                resnet_d=self.resnet_d,
                se_ratio=self.se_ratio,
                settings=self.settings,
                name=f"block{j}",
            )
            if self.block_kind != "basic":
                common["sk_ratio"] = self.sk_ratio
            x = block_class(**common)(x, train)
        return x


class ResNet(nn.Module):
    """SimCLR ResNet encoder: images (N, H, W, 3) in [0, 1] -> pooled features h (N, C) float32.

    fine_tune_after_block k >= 0 freezes the stem and stages 1..k: a stop_gradient after stage k
    (0 = after the stem) and batch norm of the frozen part in inference mode even when train is
    True, so its running statistics do not move. 4 freezes everything (linear evaluation).
    """

    depth: int = 50
    width_multiplier: int = 1
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    cifar_stem: bool | str = False  # 'auto': from the input size (<= 32 px), as the reference
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    fine_tune_after_block: int = -1
    conv_kernel_grad: str = "auto"
    remat: str = "none"  # REMAT_POLICIES: recompute residual blocks in the backward pass

    def _settings(self) -> LayerSettings:
        validate_encoder_args(
            resnet_depth=self.depth,
            width_multiplier=self.width_multiplier,
            sk_ratio=self.sk_ratio,
            se_ratio=self.se_ratio,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            fine_tune_after_block=self.fine_tune_after_block,
        )
        return LayerSettings(
            float(self.bn_momentum),
            float(self.bn_epsilon),
            resolve_dtype(self.dtype),
            self.conv_kernel_grad,
            validate_remat(self.remat),
        )

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Returns global-average-pooled features, float32, shape (N, 512*w or 2048*w)."""
        settings = self._settings()
        frozen_until = int(self.fine_tune_after_block)
        width = int(self.width_multiplier)
        resnet_d = self.sk_ratio > 0
        block_kind, stage_sizes = STAGE_SIZES[int(self.depth)]

        size = images.shape[1] if isinstance(self.cifar_stem, str) else None
        cifar_stem = resolve_cifar_stem(self.cifar_stem, size)
        x = Stem(64 * width, cifar_stem, resnet_d, settings, name="stem")(
            images, train and frozen_until < 0
        )
        if frozen_until == 0:
            x = jax.lax.stop_gradient(x)
        for i, num_blocks in enumerate(stage_sizes, start=1):
            x = Stage(
                block_kind=block_kind,
                filters=64 * width * 2 ** (i - 1),
                num_blocks=num_blocks,
                strides=1 if i == 1 else 2,
                resnet_d=resnet_d,
                sk_ratio=float(self.sk_ratio),
                se_ratio=float(self.se_ratio),
                settings=settings,
                name=f"stage{i}",
            )(x, train and i > frozen_until)
            if i == frozen_until:
                x = jax.lax.stop_gradient(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def feature_dim(depth: int, width_multiplier: int) -> int:
    """Width of h: 512*w for basic-block ResNets, 2048*w for bottleneck ones."""
    block_kind, _ = STAGE_SIZES[int(depth)]
    return (512 if block_kind == "basic" else 2048) * int(width_multiplier)


__all__ = [
    "ResNet",
    "Stem",
    "Stage",
    "BasicBlock",
    "BottleneckBlock",
    "SelectiveKernelConv",
    "SqueezeExcite",
    "ConvBN",
    "Shortcut",
    "LayerSettings",
    "STAGE_SIZES",
    "feature_dim",
    "REMAT_POLICIES",
    "validate_encoder_args",
    "validate_remat",
    "resolve_dtype",
    "resolve_cifar_stem",
]
