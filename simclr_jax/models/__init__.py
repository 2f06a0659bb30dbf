"""ResNet backbones, projection head and the composed SimCLR model (outputs: see simclr.py)."""

from simclr_jax.models.build import MODEL_FIELDS, build_model, init_variables, validate_model_fields
from simclr_jax.models.heads import PROJ_HEAD_MODES, ProjectionHead, linear_classifier
from simclr_jax.models.resnet import BLOCKS_PER_GROUP, STAGE_NAMES, ResNet
from simclr_jax.models.simclr import (
    ARCHITECTURE_FIELDS,
    SimCLRModel,
    architecture_defaults,
    frozen_mask,
)

__all__ = [
    "ARCHITECTURE_FIELDS",
    "BLOCKS_PER_GROUP",
    "MODEL_FIELDS",
    "PROJ_HEAD_MODES",
    "STAGE_NAMES",
    "ProjectionHead",
    "ResNet",
    "SimCLRModel",
    "architecture_defaults",
    "build_model",
    "frozen_mask",
    "init_variables",
    "linear_classifier",
    "validate_model_fields",
]
