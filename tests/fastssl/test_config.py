import re

import pytest

from fastssl.config import ConfigError, compose_config, split_arguments

SWAV = "config=pretrain/swav/swav_8node_resnet"


def test_seed_recipe_values():
    cfg = compose_config([SWAV])
    assert cfg.DISTRIBUTED.NUM_NODES == 8 and cfg.DISTRIBUTED.NUM_PROC_PER_NODE == 8
    assert cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA == 64
    crop = cfg.DATA.TRAIN.TRANSFORMS[0]
    assert list(crop.size_crops) == [224, 96] and list(crop.num_crops) == [2, 6]
    assert [list(s) for s in crop.crop_scales] == [[0.14, 1], [0.05, 0.14]]
    assert cfg.OPTIMIZER.larc_config.eps == pytest.approx(1e-8)
    assert cfg.OPTIMIZER.weight_decay == pytest.approx(1e-6)
    assert cfg.LOSS.swav_loss.epsilon == 0.05 and cfg.LOSS.swav_loss.num_iters == 3
    assert cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP[0][1] == 313


def test_command_line_values_and_groups():
    cfg = compose_config([SWAV, "config.LOSS.swav_loss.temperature=0.2", "config.LOSS.swav_loss.epsilon=0.04",
                          "+config/pretrain/swav/transforms=multicrop_2x224_4x96"])
    assert cfg.LOSS.swav_loss.temperature == 0.2 and cfg.LOSS.swav_loss.epsilon == 0.04
    assert cfg.DATA.TRAIN.TRANSFORMS[0].total_num_crops == 6


def test_unquoted_head_params_are_joined_back():
    # What bash passes for the seed's RegNetY-256GF line when the value is not quoted.
    argv = [SWAV, "config.MODEL.HEAD.PARAMS=[[swav_head,", "{dims:", "[10444,", "10444,", "128],", "use_bn:",
            "False,", "num_clusters:", "[3000]}]]"]
    cfg = compose_config(argv)
    name, params = cfg.MODEL.HEAD.PARAMS[0]
    assert name == "swav_head" and list(params.dims) == [10444, 10444, 128] and params.use_bn is False


def test_old_trunk_params_path_is_an_alias():
    cfg = compose_config([SWAV, "config.MODEL.TRUNK.TRUNK_PARAMS.RESNETS.DEPTH=101"])
    assert cfg.MODEL.TRUNK.RESNETS.DEPTH == 101


@pytest.mark.parametrize("argv, expected", [
    (["config.LOSS.swav_loss.temprature=0.2"], "did you mean config.LOSS.swav_loss.temperature"),
    (["config.OPTIMIZER.num_epoch=3"], "did you mean config.OPTIMIZER.num_epochs"),
    (["config.OPTIMIZER.num_epochs=many"], "config.OPTIMIZER.num_epochs must be an int"),
    (["config.OPTIMIZER.use_larc=3"], "must be a bool"),
    (["config=pretrain/swav/no_such_recipe"], "no_such_recipe"),
    (["LOSS.x=1"], "keys start with config."),
])
def test_bad_input_is_one_line_error(argv, expected):
    with pytest.raises(ConfigError) as error:
        compose_config(argv)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_split_arguments_rewrites_groups():
    groups, assignments = split_arguments([SWAV, "+config/pretrain/swav/transforms=multicrop_2x224",
                                           "config.SEED_VALUE=3"])
    assert groups == ["+config=pretrain/swav/swav_8node_resnet", "+config/pretrain/swav/transforms=multicrop_2x224"]
    assert assignments == [("SEED_VALUE", "3")]


@pytest.mark.parametrize("override,message", [
    ("config.OPTIMIZER.num_epochs=0", "config.OPTIMIZER.num_epochs=0 is out of range: it must be [1, 100000]"),
    ("config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=-4", "BATCHSIZE_PER_REPLICA=-4 is out of range"),
    ("config.LOSS.swav_loss.epsilon=0", "config.LOSS.swav_loss.epsilon=0 is out of range"),
    ("config.LOSS.nce_loss_with_memory.temperature=-0.1", "temperature=-0.1 is out of range"),
    ("config.LOSS.deepclusterv2_loss.num_clusters=[10, 0]", "num_clusters=[10, 0] is out of range"),
    ("config.OPTIMIZER.momentum=1.0", "it must be [0, 1)"),
    ("config.LOSS.swav_loss.queue.queue_length=-512", "queue_length=-512 is out of range"),
    ("config.LOSS.name=swav_los", "did you mean 'swav_loss'"),
])
def test_values_out_of_their_declared_range_are_refused_before_training(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(["config=pretrain/swav/swav_1node_cpu_resnet18", override])


@pytest.mark.parametrize("override", [
    "config.OPTIMIZER.num_epochs=100000000", "config.LOSS.swav_loss.queue.queue_length=10000000",
    "config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=20000", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=10000000",
    "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=10000000", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=10000000",
    "config.DATA.NUM_DATALOADER_WORKERS=100000", "config.DATA.MAX_IMAGE_PIXELS=0",
    "config.LOSS.deepclusterv2_loss.num_clusters=[3000, 100000000]",
])
def test_what_a_config_asks_for_is_bounded_above_before_anything_is_allocated(override):
    """issue 23: each of these took gigabytes or minutes before failing (or not failing)."""
    with pytest.raises(ConfigError, match=r"is out of range: it must be \[\d+, \d+\]"):
        compose_config(["config=pretrain/swav/swav_1node_cpu_resnet18", override])


@pytest.mark.parametrize("word", ["config.LOSS.swav_loss.temperature=.inf", "config.LOSS.swav_loss.epsilon=.Inf",
                                  "config.LOSS.swav_loss.temperature=1e6", "config.LOSS.swav_loss.epsilon=.nan",
                                  "config.OPTIMIZER.param_schedulers.lr.values=[0.1, -0.01, 0.001]",
                                  "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=.inf",
                                  "config.OPTIMIZER.param_schedulers.lr.start_value=1e9"])
def test_infinite_huge_or_negative_values_are_out_of_range(word):
    with pytest.raises(ConfigError, match="out of range"):
        compose_config([SWAV, word])


def test_a_composite_lr_schedule_with_a_negative_or_infinite_part_is_refused():
    from fastssl.optim import check_schedule
    spec = {"name": "composite", "lengths": [0.5, 0.5], "interval_scaling": [], "values": [], "milestones": [],
            "schedulers": [{"name": "linear", "start_value": 0.0, "end_value": float("inf")},
                           {"name": "constant", "value": 0.1}]}
    with pytest.raises(ValueError, match="end_value inf must be a finite number"):
        check_schedule(spec)
    spec["schedulers"][0]["end_value"] = -0.1
    with pytest.raises(ValueError, match="end_value -0.1"):
        check_schedule(spec)


def test_an_interpolation_in_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"config.CHECKPOINT.DIR holds '\$\{'.*refuses OmegaConf interpolations"):
        compose_config([SWAV, "config.CHECKPOINT.DIR=${oc.env:HOME}/x"])
    with pytest.raises(ConfigError, match=r"config.DATA.TRAIN.DATA_PATHS.0 holds"):
        compose_config([SWAV, "config.DATA.TRAIN.DATA_PATHS=['${CHECKPOINT.DIR}']"])


def test_a_huge_value_is_not_echoed_whole():
    with pytest.raises(ConfigError) as caught:
        compose_config([SWAV, "config.LOSS.swav_loss.temperature=" + "x" * 1_000_000])
    assert len(str(caught.value)) < 300 and "1000002 characters" in str(caught.value)


@pytest.mark.parametrize("depth", [40, 5000])
def test_a_deeply_nested_value_is_one_line(depth):
    with pytest.raises(ConfigError, match="nested more than 32 levels"):
        compose_config([SWAV, "config.DATA.TRAIN.DATA_PATHS=" + "[" * depth + "]" * depth])


def test_a_key_given_twice_says_the_last_value_wins(capfd):
    cfg = compose_config([SWAV, "config.LOSS.swav_loss.temperature=0.2", "config.LOSS.swav_loss.temperature=0.3"])
    assert cfg.LOSS.swav_loss.temperature == 0.3
    assert "config.LOSS.swav_loss.temperature is given twice: the last value, '0.3', wins over '0.2'" in \
        capfd.readouterr().err
