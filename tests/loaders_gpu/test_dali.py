"""The DALI backend on bad input and unusable folders (the contract is in test_contract.py)."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import BAD_FOLDER_READABLE, BAD_FOLDER_SKIPPED

pytest.importorskip("nvidia.dali", reason="dali is not installed (pip install fastssl[dali])")

from loaders.images import DatasetError  # noqa: E402
from loaders.dali import build_dali_loader  # noqa: E402


def _build(folder, recipe, **overrides):
    args = dict(source="disk_folder", data_path=str(folder), backend="dali", recipe=recipe, batch_size=4,
                num_workers=2, drop_last=False, data_limit=-1, seed=0, rank=0, world_size=1, device="cpu",
                dtype=torch.float32, synthetic_params=None)
    return build_dali_loader(**dict(args, **overrides))


def test_bad_files_are_skipped_before_dali_sees_them(bad_folder, tiny_recipe, caplog):
    with caplog.at_level(logging.WARNING):
        loader = _build(bad_folder, tiny_recipe)
    names = sorted(BAD_FOLDER_READABLE + BAD_FOLDER_SKIPPED)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(name in warnings[0] for name in BAD_FOLDER_SKIPPED)
    assert loader.num_samples == len(BAD_FOLDER_READABLE)
    for epoch in range(2):  # every epoch runs through, and the skips are not reported again
        loader.set_epoch(epoch)
        indices = [i for batch in loader for i in batch.indices.tolist()]
        assert sorted(names[i] for i in indices) == sorted(BAD_FOLDER_READABLE)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.parametrize("kind", ["missing", "empty", "all_bad"])
def test_unusable_folder_is_a_one_line_error(kind, tmp_path, tiny_recipe):
    folder = tmp_path / "data"
    if kind != "missing":
        (folder / "class0").mkdir(parents=True)
    if kind == "all_bad":
        (folder / "class0" / "a.jpg").write_bytes(b"")
    with pytest.raises((DatasetError, FileNotFoundError, ValueError)) as error:
        _build(folder, tiny_recipe)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def test_file_list_source_carries_its_labels(tiny_folder, tmp_path, tiny_recipe):
    lines = [f"{path} {7 + i % 2}" for i, path in enumerate(sorted(tiny_folder.rglob("*.jpg")))]  # absolute paths
    list_file = tmp_path / "list.txt"
    list_file.write_text("\n".join(lines[:10]) + "\n")
    loader = _build(list_file, tiny_recipe)
    loader.set_epoch(0)
    batches = list(loader)
    indices = torch.cat([b.indices for b in batches])
    assert sorted(indices.tolist()) == list(range(10))
    assert torch.equal(torch.cat([b.labels for b in batches]), 7 + indices % 2)


def _whole_image_crops(folder, recipe, *changes):
    """Pixels (n, 64, 64, 3) float64 in 0..255 of whole-image crops of the 64x64 images in folder,
    one crop per dict of changes to the identity augmentation."""
    from dataclasses import replace

    from loaders.recipe import IDENTITY

    recipe = replace(recipe, size_crops=(64,), num_crops=(len(changes),), crop_scales=((1.0, 1.0),),
                     crop_ratio=(1.0, 1.0), augmentations=tuple(replace(IDENTITY, **c) for c in changes),
                     mean=(0.0,) * 3, std=(1 / 255,) * 3)
    loader = _build(folder, recipe, batch_size=2)
    loader.set_epoch(0)
    batches = list(loader)
    order = torch.cat([b.indices for b in batches]).argsort()
    return [torch.cat([b.crops[crop] for b in batches])[order].permute(0, 2, 3, 1).double().numpy()
            for crop in range(len(changes))]


def _single_crop_outputs(folder, recipe, **changes):
    return _whole_image_crops(folder, recipe, changes)[0]


def test_pipeline_ops_match_float64_references(tmp_path, tiny_recipe):
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    images = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(tmp_path / "c" / f"{i}.png")
    images = images.astype(np.float64)

    identity = _single_crop_outputs(tmp_path, tiny_recipe)
    assert np.abs(identity - images).max() <= 1  # a whole-image crop at the same size is the image

    # Per-crop values: the first crop is never solarized, the second always.
    plain, solarized = _whole_image_crops(tmp_path, tiny_recipe, {}, {"solarize_p": 1.0})
    assert np.abs(plain - images).max() <= 1
    assert np.abs(solarized - np.where(images >= 128, 255 - images, images)).max() <= 1

    grey = _single_crop_outputs(tmp_path, tiny_recipe, gray_p=1.0)
    luma = images @ np.array([0.299, 0.587, 0.114])
    assert np.abs(grey - luma[..., None]).max() <= 2

    # VISSL's ImgPilGaussianBlur is PIL's GaussianBlur: DALI runs PIL's own box passes.
    for sigma in (0.3, 1.0, 1.5, 2.0):  # measured: at most 1, and 2 at sigma 1 (exact ties, 0.13 on average)
        blurred = _single_crop_outputs(tmp_path, tiny_recipe, blur_p=1.0, blur_sigma=(sigma, sigma))
        reference = np.stack([np.asarray(Image.fromarray(image.astype(np.uint8)).filter(ImageFilter.GaussianBlur(sigma)))
                              for image in images]).astype(np.float64)
        assert np.abs(blurred - reference).max() <= 2, sigma
