"""Models: trunks (ResNe(X)t, RegNet, AlexNet), heads (mlp, swav_head, eval_mlp), the multi-resolution forward,
the feature-evaluation model (a frozen trunk's pooled layers, one classifier each)."""
from fastssl.models.feature_eval import FeatureEvalModel, build_feature_eval_model, check_head_inputs
from fastssl.models.heads import HEAD_DEFAULTS, MLPHead, SwAVHead, build_heads
from fastssl.models.model import SSLModel, build_model, fit_head_to_trunk, group_by_resolution
from fastssl.models.trunks import (AlexNetTrunk, RegNetTrunk, ResNetTrunk, StagedTrunk, build_trunk,
                                   global_average_pool)

__all__ = [
    "AlexNetTrunk", "FeatureEvalModel", "HEAD_DEFAULTS", "MLPHead", "RegNetTrunk", "ResNetTrunk", "SSLModel",
    "StagedTrunk", "SwAVHead", "build_feature_eval_model", "build_heads", "build_model", "check_head_inputs",
    "fit_head_to_trunk", "build_trunk", "global_average_pool", "group_by_resolution",
]
