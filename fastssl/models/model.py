"""The self-supervised model: a trunk, the heads, and the multi-resolution forward."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from fastssl.models.heads import build_heads, check_head_params
from fastssl.models.trunks import StagedTrunk, build_trunk


def group_by_resolution(crops: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split crops into runs of consecutive crops with the same (H, W).

    Shapes are host metadata, so this never synchronises with the device. Only consecutive
    crops are grouped, so the order of the features follows the order of the crops.
    """
    return [list(group) for _, group in itertools.groupby(crops, key=lambda crop: tuple(crop.shape[-2:]))]


class SSLModel(nn.Module):
    """Trunk then heads, over a list of multi-crop views.

    The trunk runs once per resolution group, on the concatenation of that group's crops (SwAV,
    Caron et al. 2020, section 4: multi-crop costs one forward per resolution, not per crop); the
    heads run once over the features of every crop. Batch-norm statistics are therefore shared
    within a resolution group in the trunk and across all crops in the heads, as in SwAV.
    """

    def __init__(self, *, trunk: StagedTrunk, heads: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.heads = heads

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features: (N, 3, H, W) -> (N, trunk.feature_dim)."""
        return self.trunk(images)

    def forward(self, crops: list[torch.Tensor]):
        """crops: list of (B, 3, H_i, W_i) views in crop order (large crops first).

        Returns the heads' output over num_crops*B rows in crop-major order (rows [i*B, (i+1)*B)
        are crop i), e.g. for swav_head (embedding (num_crops*B, D), [scores (num_crops*B, K)]).
        """
        features = [self.trunk(group[0] if len(group) == 1 else torch.cat(group))
                    for group in group_by_resolution(crops)]
        return self.heads(features[0] if len(features) == 1 else torch.cat(features))


def fit_head_to_trunk(head_params: list, feature_dim: int) -> tuple[list, bool]:
    """Set the first head's input dims[0] to the trunk's feature_dim.

    The seed command lines change the trunk (ResNet-50-w2: 4096 features) without restating the
    head, whose dims[0] was written for ResNet-50 (2048). Returns (params, whether dims[0] changed).
    """
    check_head_params(head_params)
    if not head_params:
        return head_params, False
    (name, kwargs), rest = head_params[0], head_params[1:]
    if kwargs["dims"][0] == feature_dim:
        return head_params, False
    return [[name, {**kwargs, "dims": [feature_dim, *kwargs["dims"][1:]]}], *rest], True


def build_model(*, trunk_name: str, resnet: dict, regnet: dict, alexnet: dict | None, head_params: list,
                channels_last: bool) -> SSLModel:
    """Build MODEL.TRUNK and MODEL.HEAD into an SSLModel (see build_trunk, build_heads).

    channels_last: convert the convolution weights to channels_last; feed channels_last inputs
    to keep every activation channels_last (faster convolutions on tensor cores).
    Raises ValueError when the first head's dims[0] differs from the trunk's feature_dim.
    """
    trunk = build_trunk(trunk_name, resnet=resnet, regnet=regnet, alexnet=alexnet)
    heads = build_heads(head_params, in_dim=trunk.feature_dim)
    model = SSLModel(trunk=trunk, heads=heads)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
