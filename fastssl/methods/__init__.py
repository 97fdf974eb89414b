"""The registry of methods, keyed by their VISSL loss name (LOSS.name)."""
from .base import Method, RunInfo
from .byol import BYOL
from .clusterfit import ClusterFit
from .deepclusterv2 import DeepClusterV2
from .linear_eval import LinearEvaluation
from .npid import NPID
from .rotnet import RotNet
from .swav import SwAV

METHODS = {"swav_loss": SwAV, "deepclusterv2_loss": DeepClusterV2, "nce_loss_with_memory": NPID, "byol_loss": BYOL,
           "cross_entropy_multiple_output_single_target": LinearEvaluation,
           "rotnet_loss": RotNet, "clusterfit_loss": ClusterFit}

__all__ = ["METHODS", "Method", "RunInfo"]
