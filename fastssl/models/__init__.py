"""Models: trunks (ResNe(X)t, RegNet, AlexNet), heads (mlp, swav_head), the multi-resolution forward."""
from fastssl.models.heads import HEAD_DEFAULTS, MLPHead, SwAVHead, build_heads
from fastssl.models.model import SSLModel, build_model, fit_head_to_trunk, group_by_resolution
from fastssl.models.trunks import (AlexNetTrunk, RegNetTrunk, ResNetTrunk, StagedTrunk, build_trunk,
                                   global_average_pool)

__all__ = [
    "AlexNetTrunk", "HEAD_DEFAULTS", "MLPHead", "RegNetTrunk", "ResNetTrunk", "SSLModel", "StagedTrunk",
    "SwAVHead", "build_heads", "build_model", "fit_head_to_trunk", "build_trunk", "global_average_pool", "group_by_resolution",
]
