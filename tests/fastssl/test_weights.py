"""MODEL.WEIGHTS_INIT (fastssl/weights.py) and fastssl-export (fastssl/export.py), on the CPU.

Each file layout is built in memory from a model of this project or from torchvision (weights=None):
a fastssl checkpoint, VISSL's nested classy_state_dict, a torchvision state dict, BYOL-PyTorch's
checkpoint["online_backbone"] (torchvision's ResNet-50 children in an nn.Sequential, 318 entries).
"""
import functools
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from fastssl.checkpoint import rng_state, save_checkpoint
from fastssl.config import compose_config
from fastssl.export import main as export_main
from fastssl.run_model import build_run_model, resolve_head_params, weights_init_options
from fastssl.train import main as train_main
from fastssl.weights import (change_prefixes, fastssl_name, load_initial_weights, read_weights_file, vissl_name)

from test_train_cli import CPU

RESNET18 = ["config=pretrain/swav/swav_1node_cpu_resnet18"]
# An mlp then a swav_head with two prototype layers: every head name VISSL spells differently.
TWO_HEADS = [["mlp", {"dims": [512, 128], "use_bn": True, "use_relu": True, "skip_last_layer_relu_bn": False}],
             ["swav_head", {"dims": [128, 64, 32], "num_clusters": [10, 20]}]]
DEFAULTS = dict(state_dict_key_name="classy_state_dict", skip_layers=["num_batches_tracked"], remove_prefix="",
                append_prefix="")
TORCHVISION_PREFIXES = ["trunk._feature_blocks.", "trunk.base_model._feature_blocks."]  # VISSL's two examples


@functools.lru_cache
def resnet_config(depth):
    return compose_config(RESNET18 + [f"config.MODEL.TRUNK.RESNETS.DEPTH={depth}"])


def resnet(depth, *, seed, head_params=None):
    """fastssl's model for the CPU SwAV recipe with a ResNet-`depth` trunk (or other heads), seeded."""
    cfg = resnet_config(depth)
    torch.manual_seed(seed)
    return build_run_model(cfg, head_params=head_params or resolve_head_params(cfg))


def randomise_batchnorm_statistics(model, *, seed):
    """Running statistics that differ from their init, so that a load that misses them fails."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model


def counts(model_state, *, skip="num_batches_tracked"):
    """(tensors other than `skip`, tensors named by `skip`) of a state dict."""
    skipped = sum(skip in name for name in model_state)
    return len(model_state) - skipped, skipped


def assert_equal_to(model, expected: dict):
    """Every tensor of `expected` (fastssl's names) equals the model's, num_batches_tracked aside."""
    state = model.state_dict()
    assert expected
    for name, value in expected.items():
        if "num_batches_tracked" not in name:
            assert torch.equal(state[name], value), name


def save_fastssl_checkpoint(directory, model):
    """A checkpoint as fastssl's TrainingCheckpoint writes it, numpy's RNG state included (less the optimizer)."""
    return str(save_checkpoint(directory, {"model": model.state_dict(), "rng": rng_state(), "step": 2, "epoch": 1,
                                           "config": {"SEED_VALUE": 0}}, step=2))


def save_flat(tmp_path, contents, name="weights.torch"):
    torch.save(contents, tmp_path / name)
    return str(tmp_path / name)


# ---------------- names ---------------------------------------------------------------------------

@pytest.mark.parametrize("remove, append, name, expected", [
    ("", "", "conv1.weight", "conv1.weight"),
    ("module.", "", "module.conv1.weight", "conv1.weight"),
    ("module.", "", "encoder.module.conv1.weight", "encoder.module.conv1.weight"),  # only at the start
    ("module.", "", "module.module.conv1.weight", "module.conv1.weight"),            # once
    ("", "trunk._feature_blocks.", "conv1.weight", "trunk._feature_blocks.conv1.weight"),
    ("", "trunk.base_model._feature_blocks.", "fc.bias", "trunk.base_model._feature_blocks.fc.bias"),
    ("module.", "trunk.", "module.layer1.0.conv1.weight", "trunk.layer1.0.conv1.weight"),  # remove first
    ("backbone.", "trunk.", "conv1.weight", "trunk.conv1.weight"),                    # append to every name
])
def test_prefix_semantics_are_vissls(remove, append, name, expected):
    assert list(change_prefixes({name: 0}, remove_prefix=remove, append_prefix=append)) == [expected]


RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


@pytest.mark.parametrize("name, expected", [
    ("trunk._feature_blocks.conv1.weight", "trunk.conv1.weight"),
    ("trunk.base_model._feature_blocks.layer4.1.bn2.running_var", "trunk.layer4.1.bn2.running_var"),
    ("trunk.base_model.layer1.0.conv1.weight", "trunk.layer1.0.conv1.weight"),
    ("trunk.conv1.weight", "trunk.conv1.weight"),                                     # fastssl's own
    ("trunk._feature_blocks.0.weight", "trunk.conv1.weight"),                         # Sequential(children)
    ("trunk._feature_blocks.4.2.conv3.weight", "trunk.layer1.2.conv3.weight"),
    ("trunk._feature_blocks.7.0.downsample.1.bias", "trunk.layer4.0.downsample.1.bias"),
    ("trunk._feature_blocks.9.weight", "trunk.9.weight"),                             # no such child
    ("trunk._feature_blocks.fc.weight", "trunk.fc.weight"),
    ("heads.0.clf.0.weight", "heads.0.0.weight"),
    ("heads.1.prototypes0.weight", "heads.1.prototypes.0.weight"),
    ("heads.0.prototypes.0.weight", "heads.0.prototypes.0.weight"),
    ("heads.0.projection_head.3.weight", "heads.0.projection_head.3.weight"),
    ("fc.weight", "fc.weight"),
])
def test_vissl_names_map_to_fastssls(name, expected):
    assert fastssl_name(name, trunk_children=RESNET_CHILDREN) == expected


def test_vissl_name_inverts_fastssl_name_on_every_tensor_of_a_model():
    model = resnet(18, seed=0, head_params=TWO_HEADS)
    children = tuple(name for name, _ in model.trunk.named_children())
    assert children == RESNET_CHILDREN  # torchvision's order, which BYOL-PyTorch's numbering follows
    vissl = [vissl_name(name) for name in model.state_dict()]
    assert "trunk._feature_blocks.layer1.0.conv1.weight" in vissl
    assert {"heads.0.clf.1.running_mean", "heads.1.prototypes1.weight",
            "heads.1.projection_head.0.weight"} <= set(vissl)
    assert [fastssl_name(name, trunk_children=children) for name in vissl] == list(model.state_dict())


# ---------------- layouts -------------------------------------------------------------------------

def test_a_fastssl_checkpoint_loads_with_the_default_key(tmp_path):
    source = randomise_batchnorm_statistics(resnet(18, seed=1, head_params=TWO_HEADS), seed=1)
    path = save_fastssl_checkpoint(tmp_path, source)
    target = resnet(18, seed=2, head_params=TWO_HEADS)
    report = load_initial_weights(target, params_file=path, **DEFAULTS)
    assert_equal_to(target, source.state_dict())
    loaded, skipped = counts(source.state_dict())
    assert (len(report.loaded), len(report.skipped), report.missing, report.unexpected) == (loaded, skipped, [], [])


@pytest.mark.parametrize("trunk_prefix", ["_feature_blocks.", "base_model._feature_blocks."])
def test_a_vissl_checkpoint_loads_with_the_default_key(tmp_path, trunk_prefix):
    source = randomise_batchnorm_statistics(resnet(18, seed=1, head_params=TWO_HEADS), seed=1)
    trunk, heads = {}, {}
    for name, value in source.state_dict().items():  # VISSL's names, spelt out independently of vissl_name
        if name.startswith("trunk."):
            trunk[trunk_prefix + name[len("trunk."):]] = value
        elif name.startswith("heads.0."):    # VISSL's mlp: its layers in `clf`
            heads["0.clf." + name[len("heads.0."):]] = value
        else:                                # VISSL's swav_head: prototypes0, prototypes1
            heads[name[len("heads."):].replace("prototypes.", "prototypes")] = value
    contents = {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}, "meta": {}},
                                      "train_phase_idx": 3}, "phase_idx": 3, "iteration": 100, "type": "consolidated"}
    target = resnet(18, seed=2, head_params=TWO_HEADS)
    report = load_initial_weights(target, params_file=save_flat(tmp_path, contents), **DEFAULTS)
    assert_equal_to(target, source.state_dict())
    assert (len(report.missing), len(report.unexpected)) == (0, 0)


@pytest.fixture(scope="module")
def torchvision_resnet18():
    torch.manual_seed(3)
    return randomise_batchnorm_statistics(torchvision.models.resnet18(weights=None), seed=3)


@pytest.mark.parametrize("append_prefix", TORCHVISION_PREFIXES)
def test_a_torchvision_state_dict_loads_with_vissls_prefixes(tmp_path, torchvision_resnet18, append_prefix):
    weights = torchvision_resnet18.state_dict()
    target = resnet(18, seed=2)
    report = load_initial_weights(target, params_file=save_flat(tmp_path, weights),
                                  **{**DEFAULTS, "state_dict_key_name": "", "append_prefix": append_prefix})
    assert_equal_to(target, {f"trunk.{name}": value for name, value in weights.items() if not name.startswith("fc.")})
    trunk_loaded, trunk_skipped = counts({name: 0 for name in weights if not name.startswith("fc.")})
    heads_loaded, heads_skipped = counts({name: 0 for name in target.state_dict() if name.startswith("heads.")})
    assert report.summary() == (
        f"initial weights from {tmp_path / 'weights.torch'} [flat]: {trunk_loaded} tensors loaded, "
        f"{trunk_skipped + heads_skipped} skipped, {heads_loaded} missing, 2 unexpected; "
        f"missing heads.0.projection_head.0.weight, heads.0.projection_head.0.bias, heads.0.projection_head.1.weight, "
        f"...; unexpected trunk.fc.weight, trunk.fc.bias")
    assert (trunk_loaded, trunk_skipped) == (100, 20)


@pytest.mark.parametrize("remove_prefix", ["", "module."])  # saved from the bare module, or from DDP
def test_byol_pytorch_online_backbone_loads(tmp_path, remove_prefix):
    torch.manual_seed(4)
    resnet50 = randomise_batchnorm_statistics(torchvision.models.resnet50(weights=None), seed=4)
    backbone = nn.Sequential(*list(resnet50.children())[:-1])  # BYOL-PyTorch's encoder: conv1 .. avgpool
    online = {remove_prefix + name: value for name, value in backbone.state_dict().items()}
    assert len(online) == 318 and "4.0.conv1.weight" in backbone.state_dict()
    contents = {"online_backbone": online, "online_projection": nn.Linear(2048, 8).state_dict(), "epoch": 300}
    target = resnet(50, seed=5)
    report = load_initial_weights(target, params_file=save_flat(tmp_path, contents),
                                  **{**DEFAULTS, "state_dict_key_name": "online_backbone",
                                     "remove_prefix": remove_prefix, "append_prefix": "trunk._feature_blocks."})
    assert_equal_to(target, {f"trunk.{name}": value for name, value in resnet50.state_dict().items()
                             if not name.startswith("fc.")})
    assert len(report.loaded) == 318 - 53 and report.unexpected == []
    assert all(name.startswith("heads.") for name in report.missing)


# ---------------- errors --------------------------------------------------------------------------

def one_line_error(call, error=ValueError) -> str:
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_nothing_matching_is_a_one_line_error_naming_both_sides(tmp_path, torchvision_resnet18):
    path = save_flat(tmp_path, torchvision_resnet18.state_dict())
    message = one_line_error(lambda: load_initial_weights(resnet(18, seed=0), params_file=path,
                                                          **{**DEFAULTS, "state_dict_key_name": ""}))
    assert "the file has conv1.weight, bn1.weight, bn1.bias, ..." in message
    assert "the model has trunk.conv1.weight, trunk.bn1.weight, trunk.bn1.bias, ..." in message
    assert "APPEND_PREFIX" in message


def test_a_key_that_is_not_there_and_a_shape_that_differs_are_one_line_errors(tmp_path, torchvision_resnet18):
    path = save_flat(tmp_path, torchvision_resnet18.state_dict())
    message = one_line_error(lambda: load_initial_weights(resnet(18, seed=0), params_file=path, **DEFAULTS))
    assert "'classy_state_dict' is not in the weights file, whose keys are conv1.weight" in message

    source = resnet(18, seed=1)  # 30 prototypes
    target = resnet(18, seed=2, head_params=[["swav_head", {"dims": [512, 512, 64], "num_clusters": [40]}]])
    path = save_fastssl_checkpoint(tmp_path, source)
    message = one_line_error(lambda: load_initial_weights(target, params_file=path, **DEFAULTS))
    assert message.startswith("heads.0.prototypes.0.weight has shape (30, 64) in ")
    assert message.endswith("but (40, 64) in the model; SKIP_LAYERS can leave it out")
    report = load_initial_weights(target, params_file=path,
                                  **{**DEFAULTS, "skip_layers": ["num_batches_tracked", "prototypes"]})
    assert report.missing == report.unexpected == [] and "heads.0.prototypes.0.weight" in report.skipped


class RunsCodeWhenUnpickled:
    """A pickle payload: unpickling calls open(marker, "w"), i.e. runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_file_that_needs_more_than_tensors_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "code_ran"
    path = save_flat(tmp_path, {"model": {"w": torch.zeros(1)}, "extra": RunsCodeWhenUnpickled(str(marker))})
    message = one_line_error(lambda: read_weights_file(path))
    assert re.search(r"holds more than tensors and plain containers \(\w+\.open\)", message), message
    assert "weights_only=True" in message
    assert not marker.exists()
    (tmp_path / "notes.torch").write_text("not a checkpoint")
    assert one_line_error(lambda: read_weights_file(tmp_path / "notes.torch")).startswith("cannot read weights file")
    one_line_error(lambda: read_weights_file(tmp_path / "absent.torch"), FileNotFoundError)


# ---------------- export --------------------------------------------------------------------------

def eval_features(trunk, images):
    with torch.no_grad():
        return trunk.eval()(images)


def test_export_round_trip_fastssl_torchvision_fastssl_gives_identical_features(tmp_path, capsys):
    source = randomise_batchnorm_statistics(resnet(18, seed=1), seed=1)
    save_fastssl_checkpoint(tmp_path / "run", source)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "resnet18.torch")]) == 0
    assert "wrote 120 tensors in torchvision's layout" in capsys.readouterr().out
    exported = torch.load(tmp_path / "resnet18.torch", weights_only=True)

    reference = torchvision.models.resnet18(weights=None)
    reference.fc = nn.Identity()
    reference.load_state_dict(exported, strict=True)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = eval_features(source.trunk, images)
    torch.testing.assert_close(eval_features(reference, images), expected)  # pooled by torchvision's avgpool

    target = resnet(18, seed=2)
    load_initial_weights(target, params_file=str(tmp_path / "resnet18.torch"),
                         **{**DEFAULTS, "state_dict_key_name": "", "append_prefix": "trunk._feature_blocks."})
    assert torch.equal(eval_features(target.trunk, images), expected)


def test_a_resnet50_export_loads_strictly_into_torchvisions_resnet50_without_fc(tmp_path):
    source = resnet(50, seed=1)
    assert export_main([save_fastssl_checkpoint(tmp_path, source), str(tmp_path / "resnet50.torch")]) == 0
    resnet50 = torchvision.models.resnet50(weights=None)
    del resnet50.fc
    resnet50.load_state_dict(torch.load(tmp_path / "resnet50.torch", weights_only=True), strict=True)
    assert torch.equal(resnet50.layer4[2].conv3.weight, source.trunk.layer4[2].conv3.weight)


def test_vissl_export_has_vissls_layout_and_loads_back(tmp_path, capsys):
    source = randomise_batchnorm_statistics(resnet(18, seed=1, head_params=TWO_HEADS), seed=1)
    path = save_fastssl_checkpoint(tmp_path, source)
    assert export_main([path, str(tmp_path / "vissl.torch"), "--format", "vissl"]) == 0
    written = torch.load(tmp_path / "vissl.torch", weights_only=True)
    model = written["classy_state_dict"]["base_model"]["model"]
    assert set(written) == {"classy_state_dict"} and set(model) == {"trunk", "heads"}
    assert torch.equal(model["trunk"]["_feature_blocks.conv1.weight"], source.trunk.conv1.weight)
    assert torch.equal(model["heads"]["1.prototypes1.weight"], source.heads[1].prototypes[1].weight)
    assert torch.equal(model["heads"]["0.clf.1.running_mean"], source.heads[0][1].running_mean)
    assert len(model["trunk"]) + len(model["heads"]) == len(source.state_dict())
    target = resnet(18, seed=2, head_params=TWO_HEADS)
    report = load_initial_weights(target, params_file=str(tmp_path / "vissl.torch"), **DEFAULTS)
    assert_equal_to(target, source.state_dict())
    assert report.missing == report.unexpected == []
    assert export_main([str(tmp_path / "empty"), str(tmp_path / "x.torch")]) == 2
    assert re.fullmatch(r"fastssl-export: error: weights file \S+ does not exist\n", capsys.readouterr().err)


# ---------------- the run -------------------------------------------------------------------------

def test_weights_init_keys_compose_to_the_loaders_arguments():
    cfg = compose_config(RESNET18 + ["config.MODEL.WEIGHTS_INIT.PARAMS_FILE=/w.torch",
                                     "config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME=",
                                     "config.MODEL.WEIGHTS_INIT.APPEND_PREFIX=trunk._feature_blocks."])
    assert weights_init_options(cfg) == {"params_file": "/w.torch", "state_dict_key_name": None,
                                         "skip_layers": ["num_batches_tracked"], "remove_prefix": "",
                                         "append_prefix": "trunk._feature_blocks."}


def test_fastssl_train_starts_from_a_fastssl_checkpoint_and_reports(tmp_path, capsys):
    assert train_main(CPU + [f"config.CHECKPOINT.DIR={tmp_path / 'first'}", "config.OPTIMIZER.num_epochs=1"]) == 0
    checkpoint = next((tmp_path / "first").glob("checkpoint_step*.torch"))
    capsys.readouterr()
    assert train_main(CPU + [f"config.CHECKPOINT.DIR={tmp_path / 'second'}", "config.OPTIMIZER.num_epochs=1",
                             f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={checkpoint}"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "initial weights" in line]
    assert len(lines) == 1
    assert re.fullmatch(rf"fastssl: initial weights from {re.escape(str(checkpoint))} \[classy_state_dict\]: "
                        r"\d+ tensors loaded, 21 skipped, 0 missing, 0 unexpected", lines[0]), lines[0]


def test_export_refuses_to_overwrite_without_force_and_never_writes_onto_its_input(tmp_path, capsys):
    path = save_fastssl_checkpoint(tmp_path, resnet(18, seed=1, head_params=TWO_HEADS))
    input_bytes = Path(path).read_bytes()
    mine = tmp_path / "mine.torch"
    mine.write_bytes(b"the user's own file")
    assert export_main([path, str(mine)]) == 2
    assert mine.read_bytes() == b"the user's own file"
    assert re.fullmatch(r"fastssl-export: error: \S+ exists: pass --force to replace it\n", capsys.readouterr().err)
    for onto_input in ([path, path, "--force"], [str(tmp_path), path, "--force"]):  # the file, or its run directory
        assert export_main(onto_input) == 2
        assert "is the input" in capsys.readouterr().err and Path(path).read_bytes() == input_bytes
    assert export_main([path, str(mine), "--force"]) == 0
    assert set(torch.load(mine, weights_only=True)) >= {"conv1.weight"}
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_cut_export_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    path = save_fastssl_checkpoint(tmp_path, resnet(18, seed=1, head_params=TWO_HEADS))
    output = tmp_path / "out.torch"
    assert export_main([path, str(output)]) == 0
    before = output.read_bytes()

    def cut(state, f):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", cut)
    assert export_main([path, str(output), "--force"]) == 2
    assert output.read_bytes() == before and [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
