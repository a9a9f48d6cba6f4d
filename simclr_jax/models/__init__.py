"""SimCLR models: ResNet encoder, projection/supervised heads, and the create_model factory."""

from simclr_jax.models.heads import ProjectionHead, num_head_outputs, supervised_head
from simclr_jax.models.resnet import STAGE_SIZES, ResNet, feature_dim, resolve_cifar_stem
from simclr_jax.models.simclr import (
    SimCLR,
    abstract_variables,
    create_model,
    model_from_config,
    model_mode,
    validate_model_config,
    variables_init,
)

__all__ = [
    "STAGE_SIZES",
    "ProjectionHead",
    "ResNet",
    "SimCLR",
    "abstract_variables",
    "create_model",
    "feature_dim",
    "model_from_config",
    "model_mode",
    "num_head_outputs",
    "resolve_cifar_stem",
    "supervised_head",
    "validate_model_config",
    "variables_init",
]
