"""Trunks (VISSL's MODEL.TRUNK): ResNe(X)t, RegNet and AlexNet, built from torchvision's classes.

Every trunk maps images (N, 3, H, W) to globally average-pooled features (N, feature_dim) and
exposes the intermediate stages under VISSL's feature names through `forward_features`, for
feature extraction (ClusterFit's LAYER_NAME) and linear evaluation. Submodules keep torchvision's
attribute names (`conv1`, `layer4`; `stem`, `trunk_output`), so a torchvision classification
checkpoint loads into a trunk once its `fc.*` entries are dropped. Weights are never downloaded.
"""
from __future__ import annotations

import difflib

import torch
import torchvision
from torch import nn
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.resnet import BasicBlock, Bottleneck

# VISSL's MODEL.TRUNK.RESNETS.DEPTH -> (torchvision block, blocks per stage).
RESNET_LAYOUTS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
RESNET_KEYS = ("DEPTH", "WIDTH_MULTIPLIER", "GROUPS", "WIDTH_PER_GROUP", "ZERO_INIT_RESIDUAL", "CONV_INIT", "STEM")
STEMS = ("imagenet", "cifar")
CONV_INITS = ("pytorch", "kaiming_fan_out")
REGNET_CUSTOM_KEYS = ("depth", "w_0", "w_a", "w_m", "group_width", "bottleneck_multiplier", "se_ratio")


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C); a plain mean, so it is indifferent to the memory format."""
    return x.mean(dim=(-2, -1))


class StagedTrunk(nn.Module):
    """A trunk that runs named stages in order, then a global average pool.

    Subclasses set `feature_dim` and `pooled_layer_name` and implement `stages()`.
    `layer_names` lists every name `forward_features` accepts, the pooled one last.
    """

    feature_dim: int
    pooled_layer_name: str

    def stages(self) -> list[tuple[str, tuple[nn.Module, ...]]]:
        """Ordered (VISSL feature name, modules run in sequence) pairs."""
        raise NotImplementedError

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.stages()) + (self.pooled_layer_name,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> pooled features (N, feature_dim)."""
        return self.forward_features(x, self.pooled_layer_name)

    def forward_features(self, x: torch.Tensor, layer_name: str) -> torch.Tensor:
        """Output of the stage named `layer_name`, stopping the forward there.

        Stage names give the unpooled map (N, C, h, w), as VISSL's feature names do; the pooled
        name ("res5avg" for ResNet and RegNet) gives (N, feature_dim). ClusterFit's LAYER_NAME
        "res5" with VISSL's 7x7 average pool on 224-pixel inputs equals `global_average_pool` of
        the "res5" map, i.e. the "res5avg" output.
        """
        return self.forward_layers(x, [layer_name])[0]

    def forward_layers(self, x: torch.Tensor, layer_names: list[str]) -> list[torch.Tensor]:
        """Outputs of several layers (names as `forward_features` takes them) from one forward, in the
        order asked (a name may repeat); the forward stops after the deepest one (linear evaluation
        of several layers, VISSL's LINEAR_EVAL_FEAT_POOL_OPS_MAP)."""
        unknown = [name for name in layer_names if name not in self.layer_names]
        if unknown:
            raise ValueError(f"unknown layer {unknown[0]!r}; this trunk has {list(self.layer_names)}")
        wanted, outputs = set(layer_names), {}
        for name, modules in self.stages():
            if wanted <= outputs.keys():
                break
            for module in modules:
                x = module(x)
            if name in wanted:
                outputs[name] = x
        if self.pooled_layer_name in wanted:
            outputs[self.pooled_layer_name] = global_average_pool(x)
        return [outputs[name] for name in layer_names]


class ResNetTrunk(StagedTrunk):
    """ResNet / ResNeXt / wide ResNet made of torchvision's BasicBlock or Bottleneck.

    Width multiplier w (VISSL's and SwAV's ResNet-50-w2) multiplies every width: the stem has
    64*w channels and stage i has planes 64*w*2^i, so R50-w2 ends with 2048*2 = 4096 channels.
    (torchvision's wide_resnet50_2 only widens the bottleneck's inner 3x3 and keeps 2048.)
    groups / width_per_group give ResNeXt: the inner width of a bottleneck is
    planes * width_per_group / 64 * groups, as in torchvision. With w = 1 the parameter names
    and shapes are exactly torchvision's resnet{depth} / resnext without `fc`.

    conv_init: "pytorch" keeps each convolution's own initialisation (torch.nn.Conv2d: uniform within
    +-1/sqrt(fan_in)), as VISSL's ResNeXt trunk does: it rebuilds the stem and the four stages after
    torchvision's ResNet has initialised its own. "kaiming_fan_out": He normal with fan-out, as
    torchvision's ResNet and the official SwAV code.
    """

    pooled_layer_name = "res5avg"

    def __init__(self, *, depth: int, width_multiplier: int, groups: int, width_per_group: int,
                 zero_init_residual: bool, conv_init: str, stem: str):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown MODEL.TRUNK.RESNETS.STEM {stem!r}; supported: {list(STEMS)}")
        if conv_init not in CONV_INITS:
            raise ValueError(f"unknown MODEL.TRUNK.RESNETS.CONV_INIT {conv_init!r}; supported: {list(CONV_INITS)}")
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"unsupported ResNet DEPTH {depth}; supported: {sorted(RESNET_LAYOUTS)}")
        block, blocks_per_stage = RESNET_LAYOUTS[depth]
        if block is BasicBlock and (groups != 1 or width_per_group != 64):
            raise ValueError(f"ResNet-{depth} has basic blocks, which support only GROUPS=1 and "
                             f"WIDTH_PER_GROUP=64 (got {groups} and {width_per_group})")
        if width_multiplier < 1:
            raise ValueError(f"WIDTH_MULTIPLIER must be a positive integer, got {width_multiplier}")
        stem_width = 64 * width_multiplier
        # imagenet: 7x7 stride 2, then a 3x3 max-pool stride 2 (224 px -> 56 px maps); cifar (solo-learn's and
        # lightly's small-image benchmarks): 3x3 stride 1 and no max-pool. Children in torchvision's order.
        imagenet = stem == "imagenet"
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7 if imagenet else 3, stride=2 if imagenet else 1,
                               padding=3 if imagenet else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if imagenet else nn.Identity()
        in_channels = stem_width
        for index, num_blocks in enumerate(blocks_per_stage):
            stage = _resnet_stage(block, in_channels=in_channels, planes=stem_width * 2**index,
                                  num_blocks=num_blocks, stride=1 if index == 0 else 2,
                                  groups=groups, width_per_group=width_per_group)
            self.add_module(f"layer{index + 1}", stage)
            in_channels = stem_width * 2**index * block.expansion
        self.feature_dim = in_channels
        _init_resnet(self, zero_init_residual=zero_init_residual, kaiming_convs=conv_init == "kaiming_fan_out")

    def stages(self):
        return [
            ("conv1", (self.conv1, self.bn1, self.relu)),
            ("res1", (self.maxpool,)),
            ("res2", (self.layer1,)),
            ("res3", (self.layer2,)),
            ("res4", (self.layer3,)),
            ("res5", (self.layer4,)),
        ]


def _resnet_stage(block, *, in_channels: int, planes: int, num_blocks: int, stride: int,
                  groups: int, width_per_group: int) -> nn.Sequential:
    """One ResNet stage; the first block projects the shortcut when the shape changes."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    blocks = [block(in_channels, planes, stride, downsample, groups=groups, base_width=width_per_group)]
    blocks += [block(out_channels, planes, groups=groups, base_width=width_per_group)
               for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _init_resnet(trunk: nn.Module, *, zero_init_residual: bool, kaiming_convs: bool) -> None:
    """Unit BN; with kaiming_convs He init of the convolutions (fan-out), otherwise they keep their own;
    optionally zero the last BN of each residual branch so every block starts as the identity
    (Goyal et al. 2017, section 5.1)."""
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d) and kaiming_convs:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in trunk.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)


class RegNetTrunk(StagedTrunk):
    """torchvision's RegNet without its classifier: `stem` ("conv1"), `trunk_output` stages
    block1..blockS ("res2".."res{S+1}"), then the global average pool ("res{S+1}avg")."""

    def __init__(self, model: RegNet):
        super().__init__()
        self.stem = model.stem
        self.trunk_output = model.trunk_output
        self.feature_dim = model.fc.in_features
        self.pooled_layer_name = f"res{len(self.trunk_output) + 1}avg"

    def stages(self):
        stages = [("conv1", (self.stem,))]
        stages += [(f"res{index + 2}", (block,)) for index, block in enumerate(self.trunk_output)]
        return stages


class AlexNetTrunk(StagedTrunk):
    """AlexNet's five convolutions (torchvision's widths 64-192-384-256-256), each followed by
    BatchNorm and ReLU as in VISSL's AlexNet for self-supervision, with max-pools after conv1,
    conv2 and conv5. Inputs must be at least 63 pixels wide. feature_dim = 256."""

    pooled_layer_name = "conv5avg"

    def __init__(self):
        super().__init__()
        self.conv1 = _conv_bn_relu(3, 64, kernel_size=11, stride=4, padding=2, pool=True)
        self.conv2 = _conv_bn_relu(64, 192, kernel_size=5, stride=1, padding=2, pool=True)
        self.conv3 = _conv_bn_relu(192, 384, kernel_size=3, stride=1, padding=1, pool=False)
        self.conv4 = _conv_bn_relu(384, 256, kernel_size=3, stride=1, padding=1, pool=False)
        self.conv5 = _conv_bn_relu(256, 256, kernel_size=3, stride=1, padding=1, pool=True)
        self.feature_dim = 256
        _init_resnet(self, zero_init_residual=False, kaiming_convs=True)

    def stages(self):
        return [(name, (getattr(self, name),)) for name in ("conv1", "conv2", "conv3", "conv4", "conv5")]


def _conv_bn_relu(in_channels: int, out_channels: int, *, kernel_size: int, stride: int, padding: int,
                  pool: bool) -> nn.Sequential:
    """Conv (no bias: BN follows) -> BN -> ReLU, then a 3x3 stride-2 max-pool when pool."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
              nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
    return nn.Sequential(*layers)


def build_trunk(name: str, *, resnet: dict, regnet: dict, alexnet: dict | None = None) -> StagedTrunk:
    """Build the trunk named by MODEL.TRUNK.NAME from its parameter group.

    name: "resnet", "regnet" or "alexnet".
    resnet: MODEL.TRUNK.RESNETS, all of DEPTH (18/34/50/101/152), WIDTH_MULTIPLIER, GROUPS,
        WIDTH_PER_GROUP, ZERO_INIT_RESIDUAL, CONV_INIT ("pytorch" or "kaiming_fan_out").
    regnet: MODEL.TRUNK.REGNET, either {"name": a torchvision regnet constructor such as
        "regnet_y_400mf"} or {depth, w_0, w_a, w_m, group_width, and optionally
        bottleneck_multiplier (1.0) and se_ratio (0.25: RegNetY; 0: RegNetX)}.
        Entries set to None count as absent (so se_ratio=None means 0.25).
    alexnet: AlexNet has no parameters; None or {}.
    Returns a trunk mapping (N, 3, H, W) to (N, trunk.feature_dim). Construct huge trunks under
    `with torch.device("meta"):` to inspect them without allocating.
    """
    if name == "resnet":
        _check_keys("MODEL.TRUNK.RESNETS", resnet, required=RESNET_KEYS, optional=())
        return ResNetTrunk(depth=resnet["DEPTH"], width_multiplier=resnet["WIDTH_MULTIPLIER"],
                           groups=resnet["GROUPS"], width_per_group=resnet["WIDTH_PER_GROUP"],
                           zero_init_residual=resnet["ZERO_INIT_RESIDUAL"], conv_init=resnet["CONV_INIT"],
                           stem=resnet["STEM"])
    if name == "regnet":
        return RegNetTrunk(_build_torchvision_regnet(regnet))
    if name == "alexnet":
        if alexnet:
            raise ValueError(f"the AlexNet trunk takes no parameters, got {sorted(alexnet)}")
        return AlexNetTrunk()
    raise ValueError(f"unknown MODEL.TRUNK.NAME {name!r}; supported: resnet, regnet, alexnet")


def _build_torchvision_regnet(regnet: dict) -> RegNet:
    """A torchvision RegNet (classifier included, dropped by the caller) from a REGNET group."""
    params = {key: value for key, value in regnet.items() if value is not None}
    preset = params.pop("name", None)
    if preset:
        custom = sorted(set(params) & {"depth", "w_0", "w_a", "w_m", "group_width"})
        if custom:
            raise ValueError(f"MODEL.TRUNK.REGNET sets both name={preset!r} and {custom}; give one")
        presets = torchvision.models.list_models(include="regnet_*")
        if preset not in presets:
            raise ValueError(f"unknown MODEL.TRUNK.REGNET.name {preset!r}; torchvision has {presets}")
        # torchvision's presets compute their widths with torch ops read back as ints, which fails on
        # the meta device: presets are built on the CPU (the largest is a few GB; seeds name small ones).
        with torch.device("cpu"):
            return torchvision.models.get_model(preset, weights=None)
    _check_keys("MODEL.TRUNK.REGNET", params, required=REGNET_CUSTOM_KEYS[:5],
                optional=REGNET_CUSTOM_KEYS[5:])
    # The stage widths are computed with torch ops and read back as ints: pin them to the CPU so
    # that building under `with torch.device("meta"):` still works.
    with torch.device("cpu"):
        block_params = BlockParams.from_init_params(
            depth=params["depth"], w_0=params["w_0"], w_a=params["w_a"], w_m=params["w_m"],
            group_width=params["group_width"],
            bottleneck_multiplier=params.get("bottleneck_multiplier", 1.0),
            se_ratio=params.get("se_ratio", 0.25),  # VISSL's custom RegNets are RegNetY (SE) by default
        )
    return RegNet(block_params)


def _check_keys(group: str, params: dict, *, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    """Raise a ValueError naming missing keys, and unknown keys with the closest real one."""
    missing = [key for key in required if key not in params]
    if missing:
        raise ValueError(f"{group} is missing {missing}")
    known = required + optional
    for key in params:
        if key not in known:
            closest = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {closest[0]!r}?" if closest else ""
            raise ValueError(f"unknown key {group}.{key}{hint} (known: {list(known)})")
