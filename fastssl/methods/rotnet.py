"""RotNet: predict the rotation applied to an image (Gidaris et al. 2018, "Unsupervised Representation
Learning by Predicting Image Rotations"; ClusterFit's source model). LOSS.name ``rotnet_loss``.

The four rotations are multiples of 90 degrees (section 2.2: rotations by 90-degree steps are exact
transposes and flips, so they leave no low-level artefact that would give the angle away). They are made
here, on the device, for the whole batch (``torch.rot90`` of the batch tensor), so every loader backend
gets them without a per-image PIL call. The model is trunk + an ``mlp`` head with four outputs, trained
with cross-entropy against the rotation index y in {0, 1, 2, 3} (angle 90 y degrees, counter-clockwise).

``all_rotations`` True (the default): each image is fed at all four rotations in the same batch, the
paper's choice (section 2.3: "feeding all four rotated copies of an image simultaneously ... results in
a significant improvement"); the forward then sees 4 B images. False: one rotation drawn uniformly per
image, as VISSL's ImgRotatePil transform does (num_rotations_per_img 1).

VISSL names this loss ``cross_entropy_multiple_output_single_target``: there the rotation and its label
come from the data pipeline (ImgRotatePil) and the loss is the generic cross-entropy. fastssl makes the
rotation inside the method, and its registry holds one method per LOSS.name
(``cross_entropy_multiple_output_single_target`` is the linear-evaluation method), hence its own name.
The images' own labels are never read: RotNet trains on unlabelled folders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loaders.batch import Batch

from .base import Method, RunInfo, detached

NUM_ROTATIONS = 4  # 0, 90, 180, 270 degrees


def rotate_batch(images: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Each image turned by rotations[i] * 90 degrees counter-clockwise: (B, C, H, H), (B,) int64 -> (B, C, H, H).

    The four turns of the whole batch are made once and the wanted one is picked per image (no host sync)."""
    turned = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)])  # (4, B, C, H, H)
    return turned[rotations, torch.arange(images.shape[0], device=images.device)]


def all_rotations_of(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4 B, C, H, H) rotation-major (rows [k B, (k + 1) B) are turned by k * 90 degrees), and their labels (4 B,)."""
    batch_size = images.shape[0]
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(batch_size)
    return rotated, labels


class RotNet(Method):
    def __init__(self, *, all_rotations: bool):
        super().__init__()
        self.all_rotations = all_rotations
        self._last_rotations = None

    @classmethod
    def from_config(cls, params: dict, run: RunInfo) -> "RotNet":
        """LOSS.rotnet_loss; the last head (MODEL.HEAD.PARAMS[-1]) must output the four rotation scores."""
        last = run.head_params[-1] if run.head_params else None
        if last is None or last[0] != "mlp" or last[1]["dims"][-1] != NUM_ROTATIONS:
            raise ValueError(f"rotnet_loss needs an mlp head with {NUM_ROTATIONS} outputs last in MODEL.HEAD.PARAMS "
                             f"(VISSL's [[\"mlp\", {{\"dims\": [2048, 4]}}]]), got {run.head_params}")
        if run.num_crops != 1:
            raise ValueError(f"rotnet_loss takes one crop per image (RandomResizedCrop), the transforms make "
                             f"{run.num_crops}")
        return cls(all_rotations=params["all_rotations"])

    def training_loss(self, model: nn.Module, batch: Batch, *, step: int) -> torch.Tensor:
        images = batch.crops[0]  # (B, 3, H, H), square crops
        if self.all_rotations:
            rotated, rotations = all_rotations_of(images)
        else:
            rotations = torch.randint(NUM_ROTATIONS, (images.shape[0],), device=images.device)
            rotated = rotate_batch(images, rotations)
        scores = model([rotated.contiguous(memory_format=torch.channels_last)])  # (R B, 4)
        self._last_outputs, self._last_rotations = detached(scores), rotations
        return self.loss(scores, batch, step=step, rotations=rotations)

    def loss(self, outputs, batch: Batch, *, step: int, rotations: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of the rotation scores (R B, 4) against the rotation indices (R B,)."""
        return F.cross_entropy(outputs.float(), rotations)

    def debug_tensors(self) -> dict:
        rotations = {} if self._last_rotations is None else {"rotations": self._last_rotations}
        return {**super().debug_tensors(), **rotations}
