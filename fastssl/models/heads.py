"""Heads (VISSL's MODEL.HEAD.PARAMS): a list of [name, {kwargs}] applied one after the other.

    PARAMS: [["mlp", {"dims": [2048, 2048], "use_relu": True}], ["mlp", {"dims": [2048, 128]}]]
    PARAMS: [["swav_head", {"dims": [2048, 2048, 128], "use_bn": True, "num_clusters": [3000]}]]
    PARAMS: [["eval_mlp", {"in_channels": 2048, "dims": [2048, 1000]}]]   # linear evaluation

Each head's keyword defaults are VISSL's and live in HEAD_DEFAULTS, the one place they are written.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"ReLU": lambda: nn.ReLU(inplace=True), "GELU": nn.GELU}


class MLPHead(nn.Sequential):
    """VISSL's "mlp": Linear between consecutive dims, each followed by BatchNorm1d (use_bn) and
    ReLU (use_relu), except after the last Linear when skip_last_layer_relu_bn.

    Note VISSL's consequence: a one-layer ["mlp", {"dims": [a, b], "use_relu": True}] is a bare
    Linear unless "skip_last_layer_relu_bn": False. (N, dims[0]) -> (N, dims[-1]).
    """

    def __init__(self, *, dims: list[int], use_bn: bool, use_relu: bool, skip_last_layer_relu_bn: bool):
        layers = []
        for index, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(in_dim, out_dim))
            if index == len(dims) - 2 and skip_last_layer_relu_bn:
                break
            if use_bn:
                layers.append(nn.BatchNorm1d(out_dim))
            if use_relu:
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.in_dim, self.out_dim = dims[0], dims[-1]


class SwAVHead(nn.Module):
    """VISSL's "swav_head": a projection MLP, L2 normalisation, then prototype layers.

    Projection: Linear between consecutive dims; after every Linear but the last (all of them
    when not skip_last_bn) a BatchNorm1d (use_bn) and the activation. Prototypes: one
    `nn.Linear(dims[-1], K, bias=False)` per entry K of num_clusters, in `self.prototypes`, so the
    method can normalise or freeze them. The normalisation and the prototype scores run in
    float32 even under autocast: the scores are divided by a small temperature (0.1) or Sinkhorn
    epsilon (0.05) and exponentiated, where bfloat16's 8-bit mantissa costs several percent.

    Forward: features (N, dims[0]) -> (embedding (N, dims[-1]), [scores (N, K) per prototype
    layer]); the embedding is unit-norm when normalize_feats, and None when not
    return_embeddings.
    """

    def __init__(self, *, dims: list[int], use_bn: bool, num_clusters: list[int], normalize_feats: bool,
                 return_embeddings: bool, activation_name: str, skip_last_bn: bool, use_bias: bool):
        super().__init__()
        if activation_name not in ACTIVATIONS:
            raise ValueError(f"swav_head activation_name {activation_name!r} is not one of {list(ACTIVATIONS)}")
        if isinstance(num_clusters, int):
            raise ValueError(f"swav_head num_clusters must be a list (one entry per prototype layer), "
                             f"got {num_clusters}; write [{num_clusters}]")
        layers = []
        for index, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(in_dim, out_dim, bias=use_bias))
            if index == len(dims) - 2 and skip_last_bn:
                break
            if use_bn:
                layers.append(nn.BatchNorm1d(out_dim))
            layers.append(ACTIVATIONS[activation_name]())
        self.projection_head = nn.Sequential(*layers)
        self.prototypes = nn.ModuleList(nn.Linear(dims[-1], k, bias=False) for k in num_clusters)
        self.normalize_feats = normalize_feats
        self.return_embeddings = return_embeddings
        self.in_dim, self.out_dim = dims[0], dims[-1]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        embedding = self.projection_head(features)
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            if embedding.dtype in (torch.float16, torch.bfloat16):
                embedding = embedding.float()
            if self.normalize_feats:
                embedding = F.normalize(embedding, dim=1, p=2)
            scores = [prototype(embedding) for prototype in self.prototypes]
        return (embedding if self.return_embeddings else None), scores


class EvalMLPHead(nn.Module):
    """VISSL's "eval_mlp", the linear-evaluation classifier: BatchNorm2d over in_channels (a trunk
    feature map, pooled or not), flatten, then an "mlp" over dims (dims[0] = in_channels * h * w).

    (N, C, h, w) or (N, C) (taken as (N, C, 1, 1)) -> (N, dims[-1]).
    """

    def __init__(self, *, in_channels: int, dims: list[int], use_bn: bool, use_relu: bool):
        super().__init__()
        if not isinstance(in_channels, int) or isinstance(in_channels, bool):
            raise ValueError(f"eval_mlp needs in_channels, the channels of its feature map, got {in_channels!r}")
        self.channel_bn = nn.BatchNorm2d(in_channels)
        self.clf = MLPHead(dims=dims, use_bn=use_bn, use_relu=use_relu, skip_last_layer_relu_bn=True)
        self.in_dim, self.out_dim = dims[0], dims[-1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 2:
            features = features[:, :, None, None]
        return self.clf(torch.flatten(self.channel_bn(features), start_dim=1))


HEADS = {"mlp": MLPHead, "swav_head": SwAVHead, "eval_mlp": EvalMLPHead}
HEAD_DEFAULTS = {
    "mlp": {"use_bn": False, "use_relu": False, "skip_last_layer_relu_bn": True},
    "eval_mlp": {"in_channels": None, "use_bn": False, "use_relu": False},
    "swav_head": {"use_bn": True, "num_clusters": [3000], "normalize_feats": True, "return_embeddings": True,
                  "activation_name": "ReLU", "skip_last_bn": True, "use_bias": True},
}


def check_head_params(params) -> None:
    """A one-line ValueError for the first entry of MODEL.HEAD.PARAMS that is not [known head name, {its known
    arguments}] with integer dims of at least 2 entries (naming the entry, the argument and the closest one)."""
    if not isinstance(params, (list, tuple)):
        raise ValueError(f"MODEL.HEAD.PARAMS must be a list of [name, {{arguments}}] entries, got {params!r}")
    for position, entry in enumerate(params):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise ValueError(f"MODEL.HEAD.PARAMS[{position}] must be [name, {{arguments}}], got {entry!r}")
        name, kwargs = entry
        if name not in HEADS:
            closest = difflib.get_close_matches(str(name), HEADS, n=1)
            hint = f"; did you mean {closest[0]!r}?" if closest else ""
            raise ValueError(f"unknown head {name!r} in MODEL.HEAD.PARAMS[{position}]{hint} (supported: "
                             f"{', '.join(HEADS)})")
        known = ("dims", *HEAD_DEFAULTS[name])
        for key in kwargs:
            if key not in known:
                closest = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {closest[0]!r}?" if closest else ""
                raise ValueError(f"unknown {name} argument {key!r} in MODEL.HEAD.PARAMS[{position}]{hint}")
        dims = kwargs.get("dims")
        if (not isinstance(dims, (list, tuple)) or len(dims) < 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
            raise ValueError(f"MODEL.HEAD.PARAMS[{position}] ({name}) needs dims: a list of at least 2 positive "
                             f"integers, got {dims!r}")


def build_heads(params: list, *, in_dim: int | None = None) -> nn.Sequential:
    """Build MODEL.HEAD.PARAMS, a list of [name, {kwargs}], as an nn.Sequential.

    in_dim: the trunk's feature_dim; the first head's dims[0] must equal it, and each later head's
    dims[0] the previous head's dims[-1] (None skips the first check). A head whose output is not a
    single tensor (swav_head) must be last. An empty list gives the identity.
    """
    heads = []
    previous_dim, previous_name = in_dim, "trunk feature_dim"
    check_head_params(params)
    for position, (name, kwargs) in enumerate(params):
        dims = [int(dim) for dim in kwargs["dims"]]
        if previous_dim is not None and dims[0] != previous_dim:
            raise ValueError(f"MODEL.HEAD.PARAMS[{position}] ({name}) has input dims[0]={dims[0]} but the "
                             f"{previous_name} is {previous_dim}; they must match")
        if heads and isinstance(heads[-1], SwAVHead):
            raise ValueError(f"swav_head returns (embedding, scores) and must be the last head, "
                             f"but MODEL.HEAD.PARAMS[{position}] ({name}) follows it")
        heads.append(HEADS[name](**{**HEAD_DEFAULTS[name], **kwargs, "dims": dims}))
        previous_dim, previous_name = dims[-1], f"output of MODEL.HEAD.PARAMS[{position}]"
    return nn.Sequential(*heads)
