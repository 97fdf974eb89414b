"""The registry of methods, keyed by their VISSL loss name (LOSS.name)."""
from .base import Method, RunInfo
from .swav import SwAV

METHODS = {"swav_loss": SwAV}

__all__ = ["METHODS", "Method", "RunInfo"]
