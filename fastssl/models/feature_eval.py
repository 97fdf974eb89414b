"""The feature-evaluation model (VISSL's MODEL.FEATURE_EVAL_SETTINGS): a frozen trunk's features at named
layers, each pooled, and one classifier head per feature.

    LINEAR_EVAL_FEAT_POOL_OPS_MAP: [["res4", ["AvgPool2d", [[8, 8], 3, 0]]], ["res5avg", ["Identity", []]]]
    HEAD.PARAMS: [["eval_mlp", {"in_channels": 1024, "dims": [9216, 1000]}],
                  ["eval_mlp", {"in_channels": 2048, "dims": [2048, 1000]}]]

The heads run side by side, head i on feature i (VISSL's heads_forward with as many heads as features).
An empty map is the trunk's own output (the res5 average pool of a ResNet). The trunk is run by
``features`` and the heads by ``forward``, so that the method runs the frozen trunk without a graph and
the trainable part (what DDP wraps and the optimizer steps) is the heads alone.
"""
from __future__ import annotations

import torch
from torch import nn

from fastssl.models.heads import EvalMLPHead, build_heads
from fastssl.models.trunks import StagedTrunk, build_trunk

POOL_OPS = {"AvgPool2d": nn.AvgPool2d, "AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d, "MaxPool2d": nn.MaxPool2d,
            "AdaptiveMaxPool2d": nn.AdaptiveMaxPool2d, "Identity": nn.Identity}


class FeatureEvalModel(nn.Module):
    """trunk -> [pool_i(layer_i)] -> [head_i(feature_i)].

    flatten: flatten every pooled feature to (N, D) (VISSL's SHOULD_FLATTEN_FEATS); otherwise a feature
    map stays (N, C, h, w) for an eval_mlp head, whose BatchNorm2d normalises its channels.
    """

    def __init__(self, *, trunk: StagedTrunk, layer_names: list[str], pools: list[nn.Module], heads: list[nn.Module],
                 flatten: bool):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.pools = nn.ModuleList(pools)
        self.layer_names = list(layer_names)
        self.flatten = flatten

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> one pooled feature per head: (N, C, h, w), or (N, D) (flattened, or a pooled layer)."""
        maps = self.trunk.forward_layers(images, self.layer_names)
        pooled = [pool(feature_map) for pool, feature_map in zip(self.pools, maps)]
        return [torch.flatten(feature, start_dim=1) for feature in pooled] if self.flatten else pooled

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The heads over ``features``: a list of (N, num_classes) logits, one per head."""
        return [head(feature if isinstance(head, EvalMLPHead) else torch.flatten(feature, start_dim=1))
                for head, feature in zip(self.heads, features)]

    def classify(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images to logits: (N, 3, H, W) -> [(N, num_classes)] per head."""
        return self(self.features(images))


def build_feature_eval_model(*, trunk_name: str, resnet: dict, regnet: dict, alexnet: dict | None, head_params: list,
                             feature_pool_ops: list, flatten: bool, channels_last: bool) -> FeatureEvalModel:
    """The trunk of MODEL.TRUNK, the pools of ``feature_pool_ops`` ([[layer, [pool name, [args]]]], empty:
    the trunk's pooled output) and one head of ``head_params`` per pooled feature. Raises a one-line
    ValueError for an unknown layer or pool, or a head count that differs from the feature count."""
    trunk = build_trunk(trunk_name, resnet=resnet, regnet=regnet, alexnet=alexnet)
    feature_pool_ops = feature_pool_ops or [[trunk.pooled_layer_name, ["Identity", []]]]
    if len(feature_pool_ops) != len(head_params):
        raise ValueError(f"MODEL.HEAD.PARAMS has {len(head_params)} heads for {len(feature_pool_ops)} features of "
                         "MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP: give one head per feature")
    layer_names, pools = [], []
    for layer, (pool_name, pool_args) in feature_pool_ops:
        if layer not in trunk.layer_names:
            raise ValueError(f"LINEAR_EVAL_FEAT_POOL_OPS_MAP: unknown layer {layer!r}; this trunk has "
                             f"{list(trunk.layer_names)}")
        if pool_name not in POOL_OPS:
            raise ValueError(f"LINEAR_EVAL_FEAT_POOL_OPS_MAP: unknown pool {pool_name!r} for {layer}; "
                             f"supported: {list(POOL_OPS)}")
        layer_names.append(layer)
        pools.append(POOL_OPS[pool_name](*pool_args))
    heads = [build_heads([entry])[0] for entry in head_params]
    model = FeatureEvalModel(trunk=trunk, layer_names=layer_names, pools=pools, heads=heads, flatten=flatten)
    return model.to(memory_format=torch.channels_last) if channels_last else model


@torch.no_grad()
def check_head_inputs(model: FeatureEvalModel, *, image_size: int, feature_pool_ops: list) -> None:
    """Raise a one-line ValueError naming the first head whose input does not fit its feature at
    ``image_size`` pixels. Run it on a model built on the meta device: it costs nothing there."""
    device = next(model.parameters()).device
    try:
        features = model.eval().features(torch.empty(2, 3, image_size, image_size, device=device))
    except RuntimeError as error:  # a pool larger than its feature map
        raise ValueError(f"LINEAR_EVAL_FEAT_POOL_OPS_MAP does not fit {image_size} px images: "
                         f"{str(error).splitlines()[0]}") from None
    for index, (head, feature) in enumerate(zip(model.heads, features)):
        shape = tuple(feature.shape[1:])
        size = int(torch.Size(shape).numel())
        channels = shape[0] if len(shape) == 3 else size
        takes = head.in_dim if not isinstance(head, EvalMLPHead) else (head.channel_bn.num_features, head.in_dim)
        needs = size if not isinstance(head, EvalMLPHead) else (channels, size)
        if takes != needs:
            where = (f"{model.layer_names[index]} pooled by {feature_pool_ops[index][1]}" if feature_pool_ops
                     else model.layer_names[index])
            what = "in_channels and dims[0]" if isinstance(head, EvalMLPHead) else "dims[0]"
            raise ValueError(f"MODEL.HEAD.PARAMS[{index}] takes {what} {takes} but {where} at {image_size} px "
                             f"is {' x '.join(map(str, shape))}: it needs {needs}")
