"""ResNet backbones, projection head and the composed SimCLR model (outputs: see simclr.py)."""

from simclr_jax.models.build import (
    MODEL_FIELDS,
    build_for_run,
    build_model,
    init_variables,
    validate_model_fields,
)
from simclr_jax.models.heads import PROJ_HEAD_MODES, ProjectionHead, linear_classifier
from simclr_jax.models.resnet import BLOCKS_PER_GROUP, STAGE_NAMES, ResNet
from simclr_jax.models.simclr import (
    ARCHITECTURE_FIELDS,
    LINEAR_EVAL_BLOCK,
    SimCLRModel,
    architecture_defaults,
    frozen_mask,
    frozen_tree,
    keep_frozen_stats,
)

__all__ = [
    "ARCHITECTURE_FIELDS",
    "BLOCKS_PER_GROUP",
    "LINEAR_EVAL_BLOCK",
    "MODEL_FIELDS",
    "PROJ_HEAD_MODES",
    "STAGE_NAMES",
    "ProjectionHead",
    "ResNet",
    "SimCLRModel",
    "architecture_defaults",
    "build_for_run",
    "build_model",
    "frozen_mask",
    "frozen_tree",
    "init_variables",
    "keep_frozen_stats",
    "linear_classifier",
    "validate_model_fields",
]
