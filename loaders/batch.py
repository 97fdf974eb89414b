"""The one batch contract every loader backend yields (STYLE.md, "The flow")."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A multi-crop training batch.

    crops: list of (B, 3, H, W) tensors in crop order (large crops first), normalised,
        channels_last, in the training dtype, on the training device.
    indices: (B,) int64 dataset index of each sample, on the training device.
    labels: (B,) int64 class label of each sample where the data has one, else None.
    """

    crops: list[torch.Tensor]
    indices: torch.Tensor
    labels: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]
