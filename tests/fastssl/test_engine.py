"""The loop hands the step to the method: a method that overrides ``training_loss`` (here: rotates its
inputs and trains a classifier on a frozen trunk, as RotNet and linear evaluation will) and
``set_train_mode`` needs no change to the loop, and its frozen BatchNorm stays in eval mode all run."""
import numpy as np
import torch
from torch import nn

from fastssl.checkpoint import TrainingCheckpoint, TrainState, latest_checkpoint, load_checkpoint
from fastssl.engine import LoopSettings, train
from fastssl.methods.base import Method
from fastssl.metrics import RunLogger
from loaders.batch import Batch

BATCH, STEPS_PER_EPOCH, EPOCHS = 4, 3, 2


class ListLoader:
    """A resumable loader over fixed batches (the loader interface the loop uses)."""

    def __init__(self, batches):
        self.batches = batches
        self.start = 0

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __iter__(self):
        return iter(self.batches[self.start:])


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.Linear(4, 4)

    def forward(self, crops):
        return self.heads(self.trunk(torch.cat(crops)))


class RotationOnFrozenTrunk(Method):
    """Classifies the rotation of each image from a frozen trunk's features."""

    def __init__(self):
        super().__init__()
        self.trunk_modes, self.steps = [], []

    def bind(self, model):
        self._trunk = (model.trunk,)
        for p in model.trunk.parameters():
            p.requires_grad_(False)

    def set_train_mode(self, model):
        model.train()
        self._trunk[0].eval()

    def training_loss(self, model, batch, *, step):
        self.trunk_modes.append(self._trunk[0].training)
        self.steps.append(step)
        images = batch.crops[0]
        rotated = [torch.rot90(images, k, dims=(2, 3)) for k in range(4)]
        targets = torch.arange(4).repeat_interleave(images.shape[0])
        return nn.functional.cross_entropy(model(rotated), targets)


def test_the_loop_runs_the_methods_own_step_and_train_mode(tmp_path):
    torch.manual_seed(0)
    model = Model()
    method = RotationOnFrozenTrunk()
    method.bind(model)
    bn = model.trunk[1]
    bn_before = (bn.running_mean.clone(), bn.running_var.clone())
    trunk_before = [p.detach().clone() for p in model.trunk.parameters()]
    head_before = model.heads.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batches = [Batch(crops=[torch.randn(BATCH, 3, 8, 8)], indices=torch.arange(BATCH) + i * BATCH)
               for i in range(STEPS_PER_EPOCH)]
    checkpoint = TrainingCheckpoint(directory=tmp_path, rank=0, model=model, optimizer=optimizer, scaler=None,
                                    method=method, extra_state={})
    settings = LoopSettings(num_epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH,
                            lr_schedule=np.full(EPOCHS * STEPS_PER_EPOCH, 0.1), autocast_dtype=None, log_frequency=2,
                            checkpoint_every_epochs=1, checkpoint_every_steps=-1)
    logger = RunLogger(directory=tmp_path, enabled=False, use_tensorboard=False, progress_bar=False,
                       total_steps=EPOCHS * STEPS_PER_EPOCH, start_step=0)
    state = train(model=model, trained_model=model, method=method, optimizer=optimizer, scaler=None,
                  loader=ListLoader(batches), state=TrainState(), settings=settings, checkpoint=checkpoint,
                  logger=logger)

    assert state.step == EPOCHS * STEPS_PER_EPOCH and method.steps == list(range(EPOCHS * STEPS_PER_EPOCH))
    assert method.trunk_modes == [False] * (EPOCHS * STEPS_PER_EPOCH)  # never put back in training mode
    assert model.heads.training  # the rest of the model trains
    assert torch.equal(bn.running_mean, bn_before[0]) and torch.equal(bn.running_var, bn_before[1])
    assert all(torch.equal(p, q) for p, q in zip(model.trunk.parameters(), trunk_before))
    assert not torch.equal(model.heads.weight, head_before)
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == EPOCHS * STEPS_PER_EPOCH


def test_split_state_dict_keeps_rank_local_buffers_apart():
    class WithQueue(Method):
        rank_local_state = ("queue",)

        def __init__(self):
            super().__init__()
            self.register_buffer("queue", torch.zeros(2))
            self.register_buffer("queue_index", torch.zeros(1))  # a name that only starts like "queue"
            self.register_buffer("bank", torch.ones(3))

    shared, local = WithQueue().split_state_dict()
    assert set(local) == {"queue"} and set(shared) == {"queue_index", "bank"}
