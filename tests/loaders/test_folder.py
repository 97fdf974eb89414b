"""The reference loader's pieces: fault-tolerant decoding, per-sample determinism, PIL's blur, colour order."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from loaders import folder
from loaders.folder import ImageFiles, MultiCropFolder, sample_crop_params
from loaders.recipe import recipe_from_transforms


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_bad_files_are_replaced_by_the_next_readable_one(tmp_path):
    for i in range(4):
        _save(tmp_path / "c" / f"{i}.png", np.full((4, 4, 3), i, np.uint8))
    (tmp_path / "c" / "1.png").write_bytes(b"")
    (tmp_path / "c" / "3.png").write_text("nope")
    files = ImageFiles(tmp_path, data_limit=-1)
    _, used, failed = files.load(1)
    assert used == 2 and failed == (str(tmp_path / "c" / "1.png"),)
    _, used, failed = files.load(3)  # wraps around to the start
    assert used == 0 and failed == (str(tmp_path / "c" / "3.png"),)
    assert files.load(1)[1:] == (2, (str(tmp_path / "c" / "1.png"),))  # remembered, still reported
    assert files.load(2)[1:] == (2, ())
    for i in (0, 2):
        (tmp_path / "c" / f"{i}.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not one of 4 files"):
        ImageFiles(tmp_path, data_limit=-1).load(0)


def test_sample_crop_params_respect_bounds():
    rng = random.Random(0)
    for _ in range(300):
        top, left, h, w = sample_crop_params(50, 70, scale=(0.05, 0.14), ratio=(3 / 4, 4 / 3), rng=rng)
        assert 0 <= top <= 50 - h and 0 <= left <= 70 - w
        assert 0.05 - 0.01 <= h * w / 3500 <= 0.14 + 0.01
    assert sample_crop_params(10, 1000, scale=(0.9, 1), ratio=(3 / 4, 4 / 3), rng=rng) == (0, 493, 10, 13)


def test_sample_augmentation_depends_only_on_seed_epoch_index(tiny_root, small_recipe):
    dataset = MultiCropFolder(tiny_root / "train", recipe=small_recipe, seed=3, data_limit=-1)
    first = dataset[(5, 0)]
    dataset[(9, 0)]  # other work in between must not matter
    again = MultiCropFolder(tiny_root / "train", recipe=small_recipe, seed=3, data_limit=-1)[(5, 0)]
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    assert [tuple(c.shape) for c in first[0]] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 2
    assert first[1:] == (5, dataset.files.labels[5], ())
    next_epoch = dataset[(5, 1)]
    assert not torch.equal(first[0][0], next_epoch[0][0])


def test_the_reference_blur_is_pils_gaussian_blur(tmp_path):
    # VISSL's ImgPilGaussianBlur calls PIL's ImageFilter.GaussianBlur(radius=sigma): so does the reference.
    from dataclasses import replace

    from PIL import ImageFilter

    pixels = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    whole = recipe_from_transforms([dict(name="RandomResizedCrop", size=40, scale=[1.0, 1.0], ratio=[1.0, 1.0])])
    blurred = replace(whole, augmentations=(replace(whole.augmentations[0], blur_p=1.0, blur_sigma=(1.7, 1.7)),))
    result = folder.augment_crop(image, crop=0, recipe=blurred, rng=random.Random(0))
    expected = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=1.7)), dtype=np.float32) / 255
    torch.testing.assert_close(result, torch.from_numpy(expected).permute(2, 0, 1))


def test_each_crop_gets_its_own_probabilities(tmp_path):
    """The reference path reads the recipe's per-crop values: BYOL's solarize p 0.0 / 0.2."""
    for i in range(4):
        _save(tmp_path / "flat" / f"{i}.png", np.full((20, 20, 3), 200, np.uint8))
    recipe = recipe_from_transforms([
        dict(name="ImgReplicatePil", num_times=2),
        dict(name="RandomResizedCrop", size=8),
        dict(name="ImgPilMultiCropRandomApply", prob=[0.0, 0.2], transforms=[dict(name="ImgPilRandomSolarize", p=1.0)]),
    ])
    dataset = MultiCropFolder(tmp_path / "flat", recipe=recipe, seed=0, data_limit=-1)
    crops = [dataset[(index, epoch)][0] for index in range(4) for epoch in range(100)]
    solarized = torch.tensor([[bool((crop < 100 / 255).all()) for crop in pair] for pair in crops])  # (400, 2)
    assert not solarized[:, 0].any()
    assert solarized[:, 1].float().mean().item() == pytest.approx(0.2, abs=4 * (0.2 * 0.8 / 400) ** 0.5)


def test_an_error_inside_a_dataloader_worker_ends_the_process_with_one_line(tmp_path):
    """The persistent workers ignore SIGTERM; without an explicit shutdown, multiprocessing's exit handler
    (which ends daemonic children with SIGTERM, then joins them) waited for them forever."""
    import subprocess
    import sys
    import textwrap
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            (tmp_path / name / f"{i}.jpg").touch()  # 0-byte files: not one decodes
    script = textwrap.dedent(f"""
        import torch
        from loaders.folder import build_folder_loader
        from loaders.recipe import recipe_from_transforms
        recipe = recipe_from_transforms([dict(name="ImgPilToMultiCrop", total_num_crops=1, num_crops=[1],
                                              size_crops=[16], crop_scales=[[0.5, 1]]), dict(name="ToTensor")])
        loader = build_folder_loader(source="disk_folder", data_path={str(tmp_path)!r}, recipe=recipe, batch_size=4,
                                     num_workers=2, drop_last=True, data_limit=-1, seed=0, rank=0, world_size=1,
                                     device="cpu", dtype=torch.float32, channels_last=False, synthetic_params=None)
        loader.set_epoch(0)
        try:
            next(iter(loader))
        except ValueError as error:
            print(error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == [f"image folder {tmp_path}: not one of 8 files could be decoded"]
