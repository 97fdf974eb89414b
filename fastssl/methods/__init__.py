"""The registry of methods, keyed by their VISSL loss name (LOSS.name)."""
from .base import Method, RunInfo
from .byol import BYOL
from .clusterfit import ClusterFit
from .deepclusterv2 import DeepClusterV2
from .npid import NPID
from .rotnet import RotNet
from .swav import SwAV

METHODS = {"swav_loss": SwAV, "deepclusterv2_loss": DeepClusterV2, "nce_loss_with_memory": NPID, "byol_loss": BYOL,
           "rotnet_loss": RotNet, "clusterfit_loss": ClusterFit}

__all__ = ["METHODS", "Method", "RunInfo"]
