"""The run builder: inferred LOSS keys (VISSL's semantics, with a notice) and configs of older checkpoints."""
import torch
from omegaconf import OmegaConf

from fastssl.builder import build_method, config_from_checkpoint, derive, run_info
from fastssl.config import compose_config
from fastssl.run_model import resolve_head_params


def test_an_inferred_loss_key_set_in_a_config_is_replaced_with_a_notice(capfd):
    # VISSL's own swav configs carry num_crops / embedding_dim; VISSL overwrites them from the run.
    cfg = compose_config(["config=pretrain/swav/swav_8node_resnet", "config.LOSS.swav_loss.num_crops=2",
                          "config.LOSS.swav_loss.embedding_dim=128"])
    derived = derive(cfg, world_size=64, num_samples=1281167, iterations_per_epoch=312)
    method = build_method(cfg, run_info(cfg, derived, rank=0, device=torch.device("meta"),
                                        head_params=resolve_head_params(cfg)))
    assert method.num_crops == 8
    err = capfd.readouterr().err
    assert "config.LOSS.swav_loss.num_crops=2 is inferred from the run: using 8" in err
    assert "embedding_dim" not in err  # given and equal to the inferred value: nothing to say


def test_a_checkpoint_config_without_newer_keys_takes_their_defaults():
    old = OmegaConf.to_container(compose_config(["config=pretrain/swav/swav_1node_cpu_resnet18"]))
    del old["MODEL"]["TRUNK"]["RESNETS"]["CONV_INIT"]
    cfg = config_from_checkpoint({"config": old})
    assert cfg.MODEL.TRUNK.RESNETS.CONV_INIT == "pytorch"
    assert cfg.MODEL.TRUNK.RESNETS.DEPTH == 18
