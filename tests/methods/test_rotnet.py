"""RotNet: the batch rotations against PIL's exact 90-degree turns (VISSL's ImgRotatePil turns PIL images
counter-clockwise), the labels against the rotation actually applied, the loss against a float64
cross-entropy, the seed command lines on meta at full size, and a label-less run through the entry point."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fastssl.config import compose_config
from fastssl.methods.rotnet import RotNet, all_rotations_of, rotate_batch
from fastssl.train import main
from loaders.batch import Batch

from test_memory_methods_cli import TINY, build_on_meta, read_metrics

PIL_TURNS = [None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270]


def pil_turned(image: torch.Tensor, k: int) -> torch.Tensor:
    """(3, H, H) uint8-valued float -> the same turned by k * 90 degrees counter-clockwise, through PIL."""
    pil = Image.fromarray(image.permute(1, 2, 0).byte().numpy())
    turned = pil if k == 0 else pil.transpose(PIL_TURNS[k])
    return torch.from_numpy(np.array(turned)).permute(2, 0, 1).float()


def test_rotations_equal_pils_counter_clockwise_turns():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 5, 5)).float()
    rotated, labels = all_rotations_of(images)
    assert rotated.shape == (12, 3, 5, 5) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for row in range(12):
        assert torch.equal(rotated[row], pil_turned(images[row % 3], int(labels[row])))
    choice = torch.tensor([2, 0, 3])
    for i, k in enumerate(choice.tolist()):
        assert torch.equal(rotate_batch(images, choice)[i], pil_turned(images[i], k))


class CornerDetector(nn.Module):
    """Scores the rotation of an image whose only bright pixel started top-left: 0 top-left, 1 bottom-left,
    2 bottom-right, 3 top-right (where a counter-clockwise turn by k * 90 degrees takes it)."""

    def __init__(self, order=(0, 1, 2, 3)):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))
        self.order = list(order)

    def forward(self, crops):
        x = crops[0][:, 0]
        corners = torch.stack([x[:, 0, 0], x[:, -1, 0], x[:, -1, -1], x[:, 0, -1]], dim=1)  # (N, 4)
        return self.scale * corners[:, self.order]


@pytest.mark.parametrize("all_rotations", [True, False])
def test_labels_name_the_rotation_applied(all_rotations):
    """A model that reads the rotation off the image gets a near-zero loss; one that reads it backwards does not."""
    images = torch.zeros(6, 3, 8, 8)
    images[:, :, 0, 0] = 1.0
    batch = Batch(crops=[images], indices=torch.arange(6))
    method = RotNet(all_rotations=all_rotations)
    torch.manual_seed(1)
    assert method.training_loss(CornerDetector(), batch, step=0).item() < 1e-6
    torch.manual_seed(1)
    loss = method.training_loss(CornerDetector(order=(0, 3, 2, 1)), batch, step=0)  # clockwise
    assert loss.item() > 1.0
    assert method._last_outputs.shape[0] == (24 if all_rotations else 6)


def test_loss_equals_a_float64_cross_entropy():
    torch.manual_seed(0)
    scores = torch.randn(8, 4)
    rotations = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    loss = RotNet(all_rotations=True).loss(scores, None, step=0, rotations=rotations)
    expected = sum(-math.log(math.exp(scores[i, r].double()) / scores[i].double().exp().sum())
                   for i, r in enumerate(rotations.tolist())) / 8
    assert loss.item() == pytest.approx(float(expected), rel=1e-6)


ROTNET = "pretrain/rotnet/rotnet_8gpu_resnet"
SEED_COMMANDS = [(ROTNET, [], 8), (ROTNET, ["config.DISTRIBUTED.NUM_PROC_PER_NODE=1"], 1),
                 (ROTNET, ["config.DISTRIBUTED.NUM_PROC_PER_NODE=8", "config.DISTRIBUTED.NUM_NODES=4"], 32)]


@pytest.mark.parametrize("config,overrides,world", SEED_COMMANDS, ids=["8gpu", "1gpu", "32gpu"])
def test_seed_command_lines_compose_and_build_at_full_size(config, overrides, world):
    cfg = compose_config([f"config={config}"] + overrides)
    model, method = build_on_meta(cfg)
    assert isinstance(method, RotNet) and method.all_rotations
    assert model.trunk.feature_dim == 2048 and model.heads[0][-1].out_features == 4
    assert cfg.OPTIMIZER.num_epochs == 105 and list(cfg.OPTIMIZER.param_schedulers.lr.milestones) == [30, 60, 90, 100]
    assert cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA == 32
    from fastssl.builder import derive
    derived = derive(cfg, world_size=world, num_samples=1281167, iterations_per_epoch=1281167 // (32 * world))
    assert derived.lr_schedule[0] == pytest.approx(0.1 * 32 * world / 256)  # VISSL's linear scaling rule


def test_label_less_folder_trains(tmp_path):
    """RotNet needs no labels: a flat folder of images (Batch.labels None) trains."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    command = TINY + ["config=pretrain/rotnet/rotnet_1node_cpu_resnet18",
                      "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
                      f"config.DATA.TRAIN.DATA_PATHS=[{folder}]", "config.DATA.TRAIN.DATA_LIMIT=8",
                      "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", "config.OPTIMIZER.num_epochs=1",
                      "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 16}, {name: ToTensor}]",
                      f"config.CHECKPOINT.DIR={tmp_path / 'run'}"]
    assert main(command) == 0
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1]
    assert all(0 < r["loss"] < 10 for r in records)


def test_random_rotations_resume_exactly(tmp_path):
    """all_rotations False draws a rotation per image from the run's RNG, which the checkpoint restores."""
    command = TINY + ["config=pretrain/rotnet/rotnet_1node_cpu_resnet18", "config.LOSS.rotnet_loss.all_rotations=False",
                      "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 16}, {name: ToTensor}]"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(command + [f"config.CHECKPOINT.DIR={straight}"]) == 0
    records = read_metrics(straight)
    resumed.mkdir()
    first = sorted(straight.glob("checkpoint_step*.torch"))[0]
    (resumed / first.name).write_bytes(first.read_bytes())
    assert main(command + [f"config.CHECKPOINT.DIR={resumed}"]) == 0
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in records[len(records) // 2:]]
