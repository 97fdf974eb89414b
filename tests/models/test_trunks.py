"""Trunks: feature dims of every supported architecture, torchvision equivalence, stage features."""
import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.regnet import BlockParams, RegNet

from fastssl.config import compose_config
from fastssl.models.trunks import build_trunk, global_average_pool

REGNET_Y_256GF = {"depth": 27, "w_0": 640, "w_a": 230.83, "w_m": 2.53, "group_width": 373}


def resnet(depth, width_multiplier=1, groups=1, width_per_group=64, zero_init_residual=False, conv_init="pytorch"):
    return {"DEPTH": depth, "WIDTH_MULTIPLIER": width_multiplier, "GROUPS": groups,
            "WIDTH_PER_GROUP": width_per_group, "ZERO_INIT_RESIDUAL": zero_init_residual, "CONV_INIT": conv_init, "STEM": "imagenet"}


def trunk_on_meta(name, **params):
    with torch.device("meta"):
        return build_trunk(name, resnet=params.get("resnet", {}), regnet=params.get("regnet", {}))


def num_params(module):
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("depth, feature_dim", [(18, 512), (34, 512), (50, 2048), (101, 2048), (152, 2048)])
def test_resnet_feature_dims_and_sizes_match_torchvision(depth, feature_dim):
    trunk = trunk_on_meta("resnet", resnet=resnet(depth))
    assert trunk.feature_dim == feature_dim
    with torch.device("meta"):
        reference = getattr(torchvision.models, f"resnet{depth}")()
    assert num_params(trunk) == num_params(reference) - num_params(reference.fc)


def test_resnet50_w2_doubles_every_width():
    trunk = trunk_on_meta("resnet", resnet=resnet(50, width_multiplier=2))
    assert trunk.feature_dim == 4096
    assert trunk.conv1.out_channels == 128
    assert trunk.layer1[0].conv1.out_channels == 128  # bottleneck inner width 64*2
    assert trunk.layer4[-1].conv3.out_channels == 4096
    # SwAV's ResNet-50-w2 has about 94M trunk parameters.
    assert 93e6 < num_params(trunk) < 95e6


def test_resnext50_32x4d_matches_torchvision():
    trunk = trunk_on_meta("resnet", resnet=resnet(50, groups=32, width_per_group=4))
    assert trunk.feature_dim == 2048
    assert trunk.layer1[0].conv2.groups == 32 and trunk.layer1[0].conv2.out_channels == 128
    with torch.device("meta"):
        reference = torchvision.models.resnext50_32x4d()
    assert num_params(trunk) == num_params(reference) - num_params(reference.fc)


def test_resnet_loads_torchvision_weights_and_computes_the_same_features():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    trunk = build_trunk("resnet", resnet=resnet(18), regnet={}).eval()
    state = {key: value for key, value in reference.state_dict().items() if not key.startswith("fc.")}
    trunk.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 64, 64)
    expected = torch.flatten(reference.avgpool(reference.layer4(reference.layer3(reference.layer2(
        reference.layer1(reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))))))), 1)
    torch.testing.assert_close(trunk(images), expected)
    torch.testing.assert_close(trunk.forward_features(images, "res5avg"), expected)


def test_forward_features_stage_shapes():
    trunk = build_trunk("resnet", resnet=resnet(18), regnet={}).eval()
    images = torch.randn(2, 3, 64, 64)
    assert trunk.forward_features(images, "conv1").shape == (2, 64, 32, 32)
    assert trunk.forward_features(images, "res4").shape == (2, 256, 4, 4)
    res5 = trunk.forward_features(images, "res5")
    assert res5.shape == (2, 512, 2, 2)
    torch.testing.assert_close(global_average_pool(res5), trunk(images))
    with pytest.raises(ValueError, match="unknown layer 'res6'"):
        trunk.forward_features(images, "res6")


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    zeroed = build_trunk("resnet", resnet=resnet(18, zero_init_residual=True), regnet={})
    plain = build_trunk("resnet", resnet=resnet(18, zero_init_residual=False), regnet={})
    assert all(block.bn2.weight.abs().sum() == 0 for stage in (zeroed.layer1, zeroed.layer4) for block in stage)
    assert plain.layer1[0].bn2.weight.abs().sum() > 0


def test_default_conv_init_is_vissls_pytorch_default():
    """VISSL's vissl/models/trunks/resnext.py builds torchvision's ResNet, then a new stem conv and new
    stages (model._make_layer), which keep torch.nn.Conv2d's own init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    std 1/sqrt(3 fan_in). fastssl's default (CONV_INIT pytorch) is that; kaiming_fan_out is selectable."""
    assert compose_config([]).MODEL.TRUNK.RESNETS.CONV_INIT == "pytorch"
    torch.manual_seed(0)
    trunk = build_trunk("resnet", resnet=resnet(18), regnet={})
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        fan_in = conv.weight[0].numel()
        assert conv.weight.abs().max() <= 1 / math.sqrt(fan_in)
    for conv in [c for c in convs if c.weight.numel() >= 10**5]:
        assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * conv.weight[0].numel()), rel=0.02)
    kaiming = build_trunk("resnet", resnet=resnet(18, conv_init="kaiming_fan_out"), regnet={})
    for conv in [c for c in kaiming.modules() if isinstance(c, nn.Conv2d) and c.weight.numel() >= 10**5]:
        fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    bns = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((bn.weight == 1).all() and (bn.bias == 0).all()) for bn in bns)
    with pytest.raises(ValueError, match="CONV_INIT"):
        build_trunk("resnet", resnet=resnet(18, conv_init="xavier"), regnet={})


def test_demo_config_keeps_the_init_its_figures_were_measured_with():
    cfg = compose_config(["config=pretrain/swav/swav_1node_cpu_resnet18"])
    assert cfg.MODEL.TRUNK.RESNETS.CONV_INIT == "kaiming_fan_out"


def test_resnet_parameter_errors():
    with pytest.raises(ValueError, match="unsupported ResNet DEPTH 42"):
        build_trunk("resnet", resnet=resnet(42), regnet={})
    with pytest.raises(ValueError, match="GROUPS=1"):
        build_trunk("resnet", resnet=resnet(18, groups=32, width_per_group=4), regnet={})
    with pytest.raises(ValueError, match="did you mean 'DEPTH'"):
        build_trunk("resnet", resnet={**resnet(50), "DEPHT": 50}, regnet={})
    with pytest.raises(ValueError, match="unknown MODEL.TRUNK.NAME"):
        build_trunk("vit", resnet=resnet(50), regnet={})


def test_regnet_y_400mf_by_name():
    trunk = build_trunk("regnet", resnet={}, regnet={"name": "regnet_y_400mf"}).eval()
    assert trunk.feature_dim == 440
    assert trunk.layer_names == ("conv1", "res2", "res3", "res4", "res5", "res5avg")
    assert trunk(torch.randn(2, 3, 64, 64)).shape == (2, 440)


def test_regnet_errors():
    with pytest.raises(ValueError, match="unknown MODEL.TRUNK.REGNET.name"):
        build_trunk("regnet", resnet={}, regnet={"name": "regnet_z_1gf"})
    with pytest.raises(ValueError, match="both name"):
        build_trunk("regnet", resnet={}, regnet={"name": "regnet_y_400mf", "depth": 27})
    with pytest.raises(ValueError, match="missing"):
        build_trunk("regnet", resnet={}, regnet={"depth": 27})


def test_custom_regnet_y_256gf_on_meta():
    trunk = trunk_on_meta("regnet", regnet={**REGNET_Y_256GF, "name": None})
    assert trunk.feature_dim == 10444  # the seed's swav_head dims [10444, 10444, 128] fit it
    assert "se" in trunk.trunk_output.block4[0].f._modules  # RegNetY: squeeze-excitation by default
    assert 1.2e9 < num_params(trunk) < 1.3e9
    # Same network as torchvision's RegNet built from the same parameters.
    block_params = BlockParams.from_init_params(**REGNET_Y_256GF, se_ratio=0.25)
    with torch.device("meta"):
        reference = RegNet(block_params)
    assert num_params(trunk) == num_params(reference) - num_params(reference.fc)


def test_custom_regnet_small_runs_channels_last():
    trunk = build_trunk("regnet", resnet={}, regnet={"depth": 6, "w_0": 8, "w_a": 12.0, "w_m": 2.0,
                                                    "group_width": 8, "se_ratio": 0.0}).eval()
    assert all("se" not in block.f._modules for stage in trunk.trunk_output for block in stage)  # RegNetX
    trunk = trunk.to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    res4 = trunk.forward_features(images, "res4")
    assert res4.is_contiguous(memory_format=torch.channels_last)
    assert trunk(images).shape == (2, 64) and trunk.feature_dim == 64


def test_alexnet_trunk():
    trunk = build_trunk("alexnet", resnet={}, regnet={}, alexnet=None).eval()
    assert trunk.feature_dim == 256
    images = torch.randn(2, 3, 64, 64)
    assert trunk(images).shape == (2, 256)
    assert trunk.forward_features(images, "conv5").shape == (2, 256, 1, 1)
    assert sum(isinstance(module, torch.nn.BatchNorm2d) for module in trunk.modules()) == 5
    with pytest.raises(ValueError, match="no parameters"):
        build_trunk("alexnet", resnet={}, regnet={}, alexnet={"DEPTH": 8})


def test_cifar_stem_keeps_small_images_large_through_the_stages():
    params = {"DEPTH": 18, "WIDTH_MULTIPLIER": 1, "GROUPS": 1, "WIDTH_PER_GROUP": 64, "ZERO_INIT_RESIDUAL": False,
              "CONV_INIT": "pytorch"}
    imagenet = build_trunk("resnet", resnet={**params, "STEM": "imagenet"}, regnet={}).eval()
    cifar = build_trunk("resnet", resnet={**params, "STEM": "cifar"}, regnet={}).eval()
    x = torch.randn(2, 3, 32, 32)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert cifar.forward_features(x, "res5").shape[-2:] == (4, 4)      # 32 / 8
    assert imagenet.forward_features(x, "res5").shape[-2:] == (1, 1)   # 32 / 32
    assert cifar(x).shape == imagenet(x).shape == (2, 512)
    with pytest.raises(ValueError, match="STEM"):
        build_trunk("resnet", resnet={**params, "STEM": "tiny"}, regnet={})
