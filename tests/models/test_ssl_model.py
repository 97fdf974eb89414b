"""SSLModel: the multi-resolution forward equals per-crop forwards, one trunk call per resolution."""
import torch

from fastssl.models.model import build_model, group_by_resolution

RESNET18 = {"DEPTH": 18, "WIDTH_MULTIPLIER": 1, "GROUPS": 1, "WIDTH_PER_GROUP": 64, "ZERO_INIT_RESIDUAL": False,
            "CONV_INIT": "pytorch", "STEM": "imagenet"}
SWAV_HEAD = [["swav_head", {"dims": [512, 64, 16], "use_bn": True, "num_clusters": [30]}]]
REGNET_Y_256GF = {"depth": 27, "w_0": 640, "w_a": 230.83, "w_m": 2.53, "group_width": 373}


def small_model(channels_last=False):
    torch.manual_seed(0)
    return build_model(trunk_name="resnet", resnet=RESNET18, regnet={}, alexnet=None, head_params=SWAV_HEAD,
                       channels_last=channels_last)


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda _module, inputs, _output: calls.append(inputs[0].shape[0]))
    return calls


def test_group_by_resolution_groups_consecutive_sizes_only():
    crops = [torch.zeros(2, 3, size, size) for size in (32, 32, 16, 16, 32)]
    assert [len(group) for group in group_by_resolution(crops)] == [2, 2, 1]


def test_multi_crop_forward_equals_per_crop_forward():
    model = small_model().double().eval()
    # Randomise the BN running statistics so eval-mode BN is not the identity.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    batch_size = 3
    crops = [torch.randn(batch_size, 3, size, size, dtype=torch.float64) for size in (64, 64, 32, 32, 32, 32)]
    trunk_calls, head_calls = count_calls(model.trunk), count_calls(model.heads)
    embedding, scores = model(crops)
    assert trunk_calls == [2 * batch_size, 4 * batch_size]  # one trunk call per resolution
    assert head_calls == [6 * batch_size]
    assert embedding.shape == (6 * batch_size, 16) and scores[0].shape == (6 * batch_size, 30)
    for index, crop in enumerate(crops):  # crop-major rows
        crop_embedding, crop_scores = model.heads(model.features(crop))
        rows = slice(index * batch_size, (index + 1) * batch_size)
        torch.testing.assert_close(embedding[rows], crop_embedding)
        torch.testing.assert_close(scores[0][rows], crop_scores[0])


def test_channels_last_is_preserved():
    model = small_model(channels_last=True).eval()
    assert model.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    maps = []
    model.trunk.layer4.register_forward_hook(lambda _module, _inputs, output: maps.append(output))
    crops = [torch.randn(2, 3, size, size).to(memory_format=torch.channels_last) for size in (64, 64, 32)]
    model(crops)
    assert len(maps) == 2
    assert all(output.is_contiguous(memory_format=torch.channels_last) for output in maps)


def test_regnet_y_256gf_with_seed_head_builds_on_meta():
    head = [["swav_head", {"dims": [10444, 10444, 128], "use_bn": False, "num_clusters": [3000]}]]
    with torch.device("meta"):
        model = build_model(trunk_name="regnet", resnet={}, regnet=REGNET_Y_256GF, alexnet=None,
                            head_params=head, channels_last=True)
    assert model.trunk.feature_dim == 10444
    assert model.heads[0].prototypes[0].weight.shape == (3000, 128)
