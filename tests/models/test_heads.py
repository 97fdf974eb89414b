"""Heads: VISSL's mlp layer structure, swav_head outputs, dims checks."""
import pytest
import torch
from torch import nn

from fastssl.models.heads import SwAVHead, build_heads


def layer_types(module):
    return [type(layer).__name__ for layer in module]


def test_mlp_layer_structure():
    heads = build_heads([["mlp", {"dims": [8, 16, 16, 4], "use_bn": True, "use_relu": True}]], in_dim=8)
    assert layer_types(heads[0]) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    heads = build_heads([["mlp", {"dims": [8, 4], "use_bn": True, "use_relu": True,
                                  "skip_last_layer_relu_bn": False}]], in_dim=8)
    assert layer_types(heads[0]) == ["Linear", "BatchNorm1d", "ReLU"]
    # VISSL's defaults: no BN, no ReLU, nothing after the last Linear.
    heads = build_heads([["mlp", {"dims": [2048, 2048], "use_relu": True}], ["mlp", {"dims": [2048, 128]}]],
                        in_dim=2048)
    assert [layer_types(head) for head in heads] == [["Linear"], ["Linear"]]
    assert heads(torch.randn(3, 2048)).shape == (3, 128)


def test_swav_head_outputs_and_structure():
    torch.manual_seed(0)
    heads = build_heads([["swav_head", {"dims": [32, 64, 16], "use_bn": True, "num_clusters": [30, 20]}]],
                        in_dim=32)
    head = heads[0]
    assert layer_types(head.projection_head) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert isinstance(head.prototypes, nn.ModuleList) and len(head.prototypes) == 2
    assert head.prototypes[0].bias is None and head.prototypes[0].weight.shape == (30, 16)
    embedding, scores = heads(torch.randn(5, 32))
    assert embedding.shape == (5, 16)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(5))
    assert [score.shape for score in scores] == [(5, 30), (5, 20)]
    torch.testing.assert_close(scores[1], embedding @ head.prototypes[1].weight.t())


def test_swav_head_scores_are_float32_under_autocast():
    head = SwAVHead(dims=[8, 8, 4], use_bn=False, num_clusters=[6], normalize_feats=True, return_embeddings=True,
                    activation_name="ReLU", skip_last_bn=True, use_bias=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        embedding, scores = head(torch.randn(3, 8))
    assert embedding.dtype == torch.float32 and scores[0].dtype == torch.float32


def test_swav_head_without_embeddings_or_normalisation():
    heads = build_heads([["swav_head", {"dims": [8, 4], "use_bn": False, "num_clusters": [5],
                                        "return_embeddings": False, "normalize_feats": False}]], in_dim=8)
    features = torch.randn(3, 8)
    embedding, scores = heads(features)
    assert embedding is None
    torch.testing.assert_close(scores[0], heads[0].prototypes[0](heads[0].projection_head(features)))


def test_dims_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"dims\[0\]=2048 but the trunk feature_dim is 4096"):
        build_heads([["swav_head", {"dims": [2048, 2048, 128], "use_bn": True, "num_clusters": [3000]}]],
                    in_dim=4096)
    with pytest.raises(ValueError, match=r"dims\[0\]=256 but the output of MODEL.HEAD.PARAMS\[0\] is 128"):
        build_heads([["mlp", {"dims": [512, 128]}], ["mlp", {"dims": [256, 10]}]], in_dim=512)


def test_head_config_errors():
    with pytest.raises(ValueError, match="did you mean 'use_bn'"):
        build_heads([["mlp", {"dims": [8, 4], "use_bnn": True}]])
    with pytest.raises(ValueError, match="unknown head 'byol_head'"):
        build_heads([["byol_head", {"dims": [8, 4]}]])
    with pytest.raises(ValueError, match="must be the last head"):
        build_heads([["swav_head", {"dims": [8, 4], "num_clusters": [3]}], ["mlp", {"dims": [4, 2]}]])
    with pytest.raises(ValueError, match="must be a list"):
        build_heads([["swav_head", {"dims": [8, 4], "num_clusters": 3000}]])
