"""Every CUDA path of fastssl on a GPU: DALI mixed decode and FFCV ToDevice against the batch contract,
bf16 and fp16 autocast steps finite and close to fp32, SyncBatchNorm over NCCL, torch.compile.
Skipped with the reason where no GPU is visible (see conftest.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastssl.train import main
from loaders.build import build_train_loader
from loaders.recipe import recipe_from_transforms

pytestmark = pytest.mark.gpu

RECIPE = recipe_from_transforms([
    {"name": "ImgPilToMultiCrop", "total_num_crops": 3, "size_crops": [32, 16], "num_crops": [2, 1],
     "crop_scales": [[0.3, 1], [0.1, 0.3]]},
    {"name": "RandomHorizontalFlip", "p": 0.5}, {"name": "ImgPilColorDistortion", "strength": 0.5},
    {"name": "ToTensor"}, {"name": "Normalize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}])
TINY = ["config=pretrain/swav/swav_1node_cpu_resnet18", "config.MACHINE.DEVICE=gpu",
        "config.DATA.TRAIN.SYNTHETIC.IMAGE_SIZE=32", "config.DATA.TRAIN.SYNTHETIC.TRAIN_PER_CLASS=4",
        "config.DATA.TRAIN.SYNTHETIC.VAL_PER_CLASS=2", "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.DATA.TRAIN.DATA_LIMIT=16", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.OPTIMIZER.num_epochs=1",
        "config.LOG_FREQUENCY=1", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / f"class{label}").mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / f"class{label}/{i}.jpg")
    return root


def check_contract(loader, *, dtype):
    loader.set_epoch(0)
    batch = next(iter(loader))
    assert [tuple(c.shape) for c in batch.crops] == [(4, 3, 32, 32), (4, 3, 32, 32), (4, 3, 16, 16)]
    for crop in batch.crops:
        assert crop.is_cuda and crop.dtype == dtype and crop.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(crop.float()).all() and crop.float().abs().max() < 10
    assert batch.indices.is_cuda and batch.indices.dtype == torch.int64


@pytest.mark.parametrize("backend,module,dtype", [("dali", "nvidia.dali", torch.bfloat16),
                                                  ("ffcv", "ffcv", torch.float16)])
def test_gpu_loaders_meet_the_batch_contract(folder, backend, module, dtype):
    # DALI: nvJPEG "mixed" decode; FFCV: ToDevice. Both through the dispatcher a run uses.
    pytest.importorskip(module)
    loader = build_train_loader(source="disk_folder", data_path=str(folder), backend=backend, recipe=RECIPE,
                                batch_size=4, num_workers=2, drop_last=True, data_limit=-1, seed=0, rank=0,
                                world_size=1, device="cuda", dtype=dtype)
    check_contract(loader, dtype=dtype)


def first_loss(directory: Path) -> float:
    return json.loads((directory / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_step_is_finite_and_close_to_fp32(dtype, tmp_path):
    assert main(TINY + [f"config.CHECKPOINT.DIR={tmp_path / 'fp32'}"]) == 0
    assert main(TINY + ["config.MODEL.AMP_PARAMS.USE_AMP=True", f"config.MODEL.AMP_PARAMS.AMP_DTYPE={dtype}",
                        f"config.CHECKPOINT.DIR={tmp_path / dtype}"]) == 0
    reference, mixed = first_loss(tmp_path / "fp32"), first_loss(tmp_path / dtype)
    assert np.isfinite(mixed) and mixed == pytest.approx(reference, rel=0.05)


def test_sync_batchnorm_over_nccl(tmp_path):
    # With two GPUs the 2-rank run equals one process on the same global batch (as the CPU gloo test);
    # with one, a one-rank NCCL group still runs torch's SyncBatchNorm end to end.
    ranks = min(torch.cuda.device_count(), 2)
    argv = TINY + ["config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=True", "config.DISTRIBUTED.BACKEND=nccl",
                   f"config.DISTRIBUTED.NUM_PROC_PER_NODE={ranks}", f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={8 // ranks}",
                   "config.LOSS.swav_loss.queue.queue_length=0"]
    assert main(argv + [f"config.CHECKPOINT.DIR={tmp_path / 'sync'}"]) == 0
    assert main(TINY + ["config.LOSS.swav_loss.queue.queue_length=0", f"config.CHECKPOINT.DIR={tmp_path / 'one'}"]) == 0
    assert first_loss(tmp_path / "sync") == pytest.approx(first_loss(tmp_path / "one"), rel=1e-3)


def test_torch_compile_steps_match_eager(tmp_path):
    assert main(TINY + [f"config.CHECKPOINT.DIR={tmp_path / 'eager'}"]) == 0
    assert main(TINY + ["config.MODEL.TORCH_COMPILE=True", f"config.CHECKPOINT.DIR={tmp_path / 'compiled'}"]) == 0
    assert first_loss(tmp_path / "compiled") == pytest.approx(first_loss(tmp_path / "eager"), rel=1e-3)
