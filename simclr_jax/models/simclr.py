"""The SimCLR model (encoder + projection head + classifier) and its config-driven factory."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.models.conv import make_conv_general_dilated
from simclr_jax.models.heads import (
    ProjectionHead,
    supervised_head,
    validate_head_args,
    validate_num_classes,
)
from simclr_jax.models.resnet import (
    CIFAR_STEM_CHOICES,
    ResNet,
    is_integer,
    resolve_dtype,
    validate_encoder_args,
    validate_remat,
)

MODES = ("pretrain", "finetune")
MODEL_FIELDS = (
    "resnet_depth",
    "width_multiplier",
    "sk_ratio",
    "se_ratio",
    "cifar_stem",
    "bn_momentum",
    "bn_epsilon",
    "dtype",
    "proj_head_mode",
    "num_proj_layers",
    "proj_out_dim",
    "ft_proj_selector",
    "fine_tune_after_block",
    "zero_init_logits_layer",
)


class SimCLR(nn.Module):
    """Encoder f, projection head g and a linear classifier.

    mode 'pretrain': the classifier is the online linear probe on stop_gradient(h), so it never
    changes the encoder. mode 'finetune': the classifier reads hiddens[ft_proj_selector] of the
    projection head (0 = h) with gradients flowing back (up to the encoder's frozen part).
    Submodule names: 'encoder', 'projection_head', 'classifier'.
    """

    encoder: ResNet
    projection_head: ProjectionHead
    num_classes: int
    mode: str = "pretrain"
    ft_proj_selector: int = 0
    zero_init_logits_layer: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """images (N, H, W, 3) in [0, 1] -> dict(h=(N, C), z=(N, proj_dim), logits), float32."""
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; choose one of {MODES}")
        h = self.encoder(images, train=train)
        z, hiddens = self.projection_head(h, train=train)
        if self.mode == "pretrain":
            probe_input = jax.lax.stop_gradient(h)
        else:
            probe_input = hiddens[self.ft_proj_selector]
        logits = supervised_head(self.num_classes, self.zero_init_logits_layer)(probe_input)
        return {
            "h": h.astype(jnp.float32),
            "z": z.astype(jnp.float32),
            "logits": logits.astype(jnp.float32),
        }


def _read_fields(model_config: Any) -> dict[str, Any]:
    """Reads every model.* field the model needs; ValueError naming any that is missing."""
    missing = [f for f in MODEL_FIELDS if f not in model_config]
    if missing:
        raise ValueError(
            f"model config is missing field(s) {', '.join('model.' + f for f in missing)}; "
            "start from simclr_jax.config.get_base_config().model"
        )
    fields = {f: model_config[f] for f in MODEL_FIELDS}
    # Optional: checkpoints written before the field existed restore with the default.
    fields["conv_kernel_grad"] = model_config.get("conv_kernel_grad", "auto")
    fields["remat"] = model_config.get("remat", "none")
    return fields


def validate_model_config(model_config: Any, *, num_classes: int, mode: str = "pretrain") -> None:
    """Raises ValueError naming the first bad field; nothing is built or compiled."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; choose one of {', '.join(MODES)}")
    validate_num_classes(num_classes)
    c = _read_fields(model_config)
    validate_encoder_args(
        resnet_depth=c["resnet_depth"],
        width_multiplier=c["width_multiplier"],
        sk_ratio=c["sk_ratio"],
        se_ratio=c["se_ratio"],
        bn_momentum=c["bn_momentum"],
        bn_epsilon=c["bn_epsilon"],
        fine_tune_after_block=c["fine_tune_after_block"],
    )
    resolve_dtype(c["dtype"])
    make_conv_general_dilated(c["conv_kernel_grad"])
    validate_remat(c["remat"])
    if c["remat"] != "none" and mode == "finetune" and c["fine_tune_after_block"] == 4:
        raise ValueError(
            f"model.remat={c['remat']!r} cannot apply: model.fine_tune_after_block=4 freezes the "
            "whole encoder, so no block is differentiated; set model.remat='none'"
        )
    validate_head_args(
        proj_head_mode=c["proj_head_mode"],
        num_proj_layers=c["num_proj_layers"],
        proj_out_dim=c["proj_out_dim"],
        ft_proj_selector=c["ft_proj_selector"],
    )
    if not isinstance(c["cifar_stem"], (bool, np.bool_)) and not (
        isinstance(c["cifar_stem"], str) and c["cifar_stem"] == "auto"
    ):
        raise ValueError(
            f"model.cifar_stem={c['cifar_stem']!r} is not supported; choose one of "
            f"{', '.join(map(repr, CIFAR_STEM_CHOICES))} ('auto': on when data.image_size <= 32)"
        )
    if not isinstance(c["zero_init_logits_layer"], (bool, np.bool_)):
        raise ValueError(
            f"model.zero_init_logits_layer={c['zero_init_logits_layer']!r} must be True or False"
        )


def create_model(model_config: Any, *, num_classes: int, mode: str = "pretrain") -> SimCLR:
    """Builds SimCLR from model_config (a ConfigDict or mapping of model.* fields), checked
    beforehand by validate_model_config (modes.validate_config runs it before anything is built).

    model.fine_tune_after_block only acts in mode 'finetune'; pretraining never freezes layers.
    """
    c = _read_fields(model_config)
    as_int = lambda v: int(v) if is_integer(v) else v
    encoder = ResNet(
        depth=int(c["resnet_depth"]),
        width_multiplier=int(c["width_multiplier"]),
        sk_ratio=float(c["sk_ratio"]),
        se_ratio=float(c["se_ratio"]),
        cifar_stem=c["cifar_stem"] if isinstance(c["cifar_stem"], str) else bool(c["cifar_stem"]),
        bn_momentum=float(c["bn_momentum"]),
        bn_epsilon=float(c["bn_epsilon"]),
        dtype=resolve_dtype(c["dtype"]),
        fine_tune_after_block=int(c["fine_tune_after_block"]) if mode == "finetune" else -1,
        conv_kernel_grad=str(c["conv_kernel_grad"]),
        remat=str(c["remat"]),
    )
    head = ProjectionHead(
        mode=c["proj_head_mode"],
        num_layers=as_int(c["num_proj_layers"]),
        out_dim=int(c["proj_out_dim"]),
        bn_momentum=float(c["bn_momentum"]),
        bn_epsilon=float(c["bn_epsilon"]),
    )
    return SimCLR(
        encoder=encoder,
        projection_head=head,
        num_classes=int(num_classes),
        mode=mode,
        ft_proj_selector=int(c["ft_proj_selector"]),
        zero_init_logits_layer=bool(c["zero_init_logits_layer"]),
    )


def model_mode(train_mode: str) -> str:
    """The model's mode for a run's mode: the probe head for pretraining, else 'finetune'."""
    return "pretrain" if train_mode == "pretrain" else "finetune"


def model_from_config(config: Any) -> SimCLR:
    """The model a run's config (or a checkpoint's saved config) trains or evaluates."""
    return create_model(
        config.model, num_classes=int(config.model.num_classes), mode=model_mode(config.mode)
    )


def variables_init(model: SimCLR, image_size: int) -> Any:
    """rng -> the model's fresh {'params', 'batch_stats'} (the values depend on rng only)."""

    def init(rng: jax.Array) -> dict[str, Any]:
        variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3)), train=False)
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    return init


def abstract_variables(model: SimCLR, image_size: int) -> dict[str, Any]:
    """The model's {'params', 'batch_stats'} as ShapeDtypeStructs; nothing is allocated."""
    return jax.eval_shape(variables_init(model, image_size), jax.random.key(0))
