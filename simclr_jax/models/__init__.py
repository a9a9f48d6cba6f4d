"""SimCLR models: ResNet encoder, projection/supervised heads, and the create_model factory."""

from simclr_jax.models.heads import ProjectionHead, num_head_outputs, supervised_head
from simclr_jax.models.resnet import STAGE_SIZES, ResNet, feature_dim, resolve_cifar_stem
from simclr_jax.models.simclr import SimCLR, create_model, validate_model_config

__all__ = [
    "STAGE_SIZES",
    "ProjectionHead",
    "ResNet",
    "SimCLR",
    "create_model",
    "feature_dim",
    "num_head_outputs",
    "resolve_cifar_stem",
    "supervised_head",
    "validate_model_config",
]
