"""Batched device augmentations: crop statistics, rates, shapes, determinism, and the colour
ops against torchvision.transforms.functional's single-image ops."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torchvision.transforms.functional as TF

from loaders import augment, colour, resized_crop
from loaders.augment import DeviceMultiCrop
from loaders.blur import gaussian_blur
from loaders.recipe import recipe_from_transforms
from loaders.resized_crop import sample_crop_boxes


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_crop_boxes_follow_scale_and_ratio():
    sizes = torch.tensor([[64, 64], [48, 80], [100, 37]]).repeat(1000, 1)
    boxes = sample_crop_boxes(sizes, scale=(0.05, 0.14), ratio=(3 / 4, 4 / 3), generator=_generator())
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.equal(boxes, boxes.round())
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 3] <= sizes[:, 0]).all()
    fraction = width * height / (sizes[:, 0] * sizes[:, 1])
    # Rounding the sides to whole pixels moves the area by up to about one pixel row and column.
    slack = (width + height + 1) / (sizes[:, 0] * sizes[:, 1])
    assert (fraction >= 0.05 - slack).all() and (fraction <= 0.14 + slack).all()
    assert fraction.mean().item() == pytest.approx(0.095, abs=0.005)  # uniform in the scale range
    log_ratio = torch.log(width / height)
    assert log_ratio.abs().max().item() <= math.log(4 / 3) + 0.2  # rounding of small crops
    assert log_ratio.mean().item() == pytest.approx(0.0, abs=0.02)  # log-uniform, symmetric


def test_crop_boxes_fall_back_to_a_central_crop():
    sizes = torch.tensor([[10, 1000], [1000, 10]])
    boxes = sample_crop_boxes(sizes, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), generator=_generator())
    # Too wide: full height, width at the largest ratio, centred; too tall: the mirror image.
    assert boxes.tolist() == [[493.0, 0.0, 506.0, 10.0], [0.0, 493.0, 10.0, 506.0]]


def _only(transforms_after_crop, size=8):
    return recipe_from_transforms([
        dict(name="RandomResizedCrop", size=size, scale=[1.0, 1.0], ratio=[1.0, 1.0]),
        *transforms_after_crop,
    ])


def test_identity_crop_and_flip_rate():
    recipe = _only([dict(name="RandomHorizontalFlip", p=0.3)])
    images = torch.arange(8 * 8 * 3, dtype=torch.uint8).view(1, 3, 8, 8).repeat(2000, 1, 1, 1)
    sizes = torch.tensor([[8, 8]]).repeat(2000, 1)
    (crops,) = DeviceMultiCrop(recipe, dtype=torch.float32, device="cpu")(images, sizes, generator=_generator())
    expected = images.float() / 255
    same = (crops - expected).abs().amax(dim=(1, 2, 3)) < 1e-6
    flipped = (crops - expected.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert (same ^ flipped).all()  # every output is the image or its mirror, exactly
    rate = flipped.float().mean().item()
    assert rate == pytest.approx(0.3, abs=4 * math.sqrt(0.3 * 0.7 / 2000))


def test_grayscale_rate_without_jitter():
    recipe = _only([dict(name="ImgPilColorDistortion", strength=0.0)], size=4)
    images = torch.randint(0, 256, (2000, 3, 4, 4), dtype=torch.uint8)
    sizes = torch.tensor([[4, 4]]).repeat(2000, 1)
    (crops,) = DeviceMultiCrop(recipe, dtype=torch.float32, device="cpu")(images, sizes, generator=_generator(1))
    grey = (crops - crops.mean(dim=1, keepdim=True)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert grey.float().mean().item() == pytest.approx(0.2, abs=4 * math.sqrt(0.2 * 0.8 / 2000))
    # Strength 0 jitter is the identity (an identity colour matrix) on the colour images.
    assert torch.allclose(crops[~grey], images[~grey].float() / 255, atol=1e-5)


def test_output_contract_and_determinism(small_recipe):
    images = torch.randint(0, 256, (5, 3, 40, 48), dtype=torch.uint8)
    sizes = torch.tensor([[40, 48], [32, 32], [20, 48], [40, 10], [1, 1]])
    multicrop = DeviceMultiCrop(small_recipe, dtype=torch.bfloat16, device="cpu")
    crops = multicrop(images, sizes, generator=_generator(7))
    assert [tuple(c.shape) for c in crops] == [(5, 3, 24, 24)] * 2 + [(5, 3, 12, 12)] * 2
    assert all(c.dtype == torch.bfloat16 and c.is_contiguous(memory_format=torch.channels_last) for c in crops)
    again = multicrop(images, sizes, generator=_generator(7))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    other = multicrop(images, sizes, generator=_generator(8))
    assert not torch.equal(crops[0], other[0])
    # Normalised values of [0, 1] images stay within the normalisation's range.
    low = (0 - max(small_recipe.mean)) / min(small_recipe.std)
    high = (1 - min(small_recipe.mean)) / min(small_recipe.std)
    assert all(c.float().min() >= low - 0.05 and c.float().max() <= high + 0.05 for c in crops)


def test_per_crop_solarize_probability():
    recipe = recipe_from_transforms([
        dict(name="ImgReplicatePil", num_times=2),
        dict(name="RandomResizedCrop", size=4, scale=[1.0, 1.0], ratio=[1.0, 1.0]),
        dict(name="ImgPilRandomSolarize", p=[0.0, 1.0]),
    ])
    images = torch.full((50, 3, 4, 4), 200, dtype=torch.uint8)
    first, second = DeviceMultiCrop(recipe, dtype=torch.float32, device="cpu")(
        images, torch.tensor([[4, 4]]).repeat(50, 1), generator=_generator()
    )
    assert torch.allclose(first, torch.full_like(first, 200 / 255))
    assert torch.allclose(second, torch.full_like(second, 55 / 255))


BYOL_VIEWS = [
    dict(name="ImgReplicatePil", num_times=2),
    dict(name="RandomResizedCrop", size=16, scale=[1.0, 1.0], ratio=[1.0, 1.0]),
    dict(name="ImgPilMultiCropRandomApply", prob=[1.0, 0.1],
         transforms=[dict(name="ImgPilGaussianBlur", p=1.0, radius_min=1.0, radius_max=2.0)]),
    dict(name="ImgPilMultiCropRandomApply", prob=[0.0, 0.2], transforms=[dict(name="ImgPilRandomSolarize", p=1.0)]),
]


def test_asymmetric_views_apply_each_crops_own_probabilities():
    """BYOL's per-view blur (1.0 / 0.1) and solarize (0.0 / 0.2), resolved by the recipe, on a fixed seed."""
    multicrop = DeviceMultiCrop(recipe_from_transforms(BYOL_VIEWS), dtype=torch.float32, device="cpu")
    n = 1000
    sizes = torch.tensor([[16, 16]]).repeat(n, 1)
    # A flat image stays flat under blur: only solarize changes it (200 -> 55).
    flat = torch.full((n, 3, 16, 16), 200, dtype=torch.uint8)
    first, second = multicrop(flat, sizes, generator=_generator(11))
    solarized = [(crop - 55 / 255).abs().amax(dim=(1, 2, 3)) < 1e-5 for crop in (first, second)]
    kept = [(crop - 200 / 255).abs().amax(dim=(1, 2, 3)) < 1e-5 for crop in (first, second)]
    assert all((s ^ k).all() for s, k in zip(solarized, kept))  # each crop is one or the other, exactly
    assert not solarized[0].any()  # crop 1: never
    assert solarized[1].float().mean().item() == pytest.approx(0.2, abs=4 * math.sqrt(0.2 * 0.8 / n))
    # A checkerboard shows the blur: crop 1 always, crop 2 at a rate of 0.1.
    checkerboard = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 100 + 20).to(torch.uint8)
    first, second = multicrop(checkerboard.expand(n, 3, 16, 16).contiguous(), sizes, generator=_generator(12))
    blurred = [(crop - checkerboard.float() / 255).abs().amax(dim=(1, 2, 3)) > 1e-3 for crop in (first, second)]
    assert blurred[0].all()
    assert blurred[1].float().mean().item() == pytest.approx(0.1, abs=4 * math.sqrt(0.1 * 0.9 / n))


@pytest.fixture
def colour_batch():
    x = torch.rand(6, 3, 9, 11, generator=_generator(3))
    x[0] = 0.5  # grey: zero chroma
    x[1, :, :2] = 0.0  # black pixels
    x[2, 1] = x[2, 0]  # ties between channels
    return x


@pytest.fixture(scope="module")
def photo():
    """(3, 128, 128) float in [0, 1]: a real photograph (scikit-image ships it)."""
    import skimage.data

    return torch.from_numpy(skimage.data.astronaut()[::4, ::4].copy()).permute(2, 0, 1).float() / 255


def _reference_color_distortion(x, *, strength, seed, clamp_each_op):
    """color_transform's draws replayed, then the four ops one by one from their definitions in
    float64 (brightness, contrast, saturation: blends with black, the mean grey, the grey image).
    clamp_each_op=False: the hue op is a rotation about the grey axis (Rodrigues' formula) and one
    clamp at the end (what color_transform promises). True: torchvision's ops (HSV hue, clamps)."""
    generator = _generator(seed)
    rows = x.shape[0]
    u = torch.rand(rows, 4, generator=generator)
    order = torch.rand(rows, 4, generator=generator).argsort(dim=1)
    low = max(0.0, 1 - 0.8 * strength)
    factors = low + (1 + 0.8 * strength - low) * u[:, :3]
    hues = (2 * u[:, 3] - 1) * 0.2 * strength
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(3, 1, 1)
    axis = torch.ones(3, 1, 1, dtype=torch.float64) / math.sqrt(3)
    out = []
    for image, row_order, (brightness, contrast, saturation), hue in zip(x.double(), order, factors.double(), hues):
        for op in row_order.tolist():
            if clamp_each_op:
                image = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][op](
                    image.float(), [brightness, contrast, saturation, hue][op].item()).double()
                continue
            grey = (luma * image).sum(0, keepdim=True)
            if op == 0:
                image = brightness * image
            elif op == 1:
                image = contrast * image + (1 - contrast) * grey.mean()
            elif op == 2:
                image = saturation * image + (1 - saturation) * grey
            else:
                angle = 2 * math.pi * hue.item()
                cross = torch.cross(axis.expand_as(image), image, dim=0)
                image = (image * math.cos(angle) + cross * math.sin(angle)
                         + axis * (axis * image).sum(0, keepdim=True) * (1 - math.cos(angle)))
        out.append(image.clamp(0, 1))
    return torch.stack(out)


def _distort(x, *, strength, seed):
    (jitter,) = _only([dict(name="ImgPilColorDistortion", strength=strength)]).augmentations
    ranges = torch.tensor([jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]).expand(x.shape[0], 4, 2)
    draws = colour.draw_color_jitter(ranges, jitter_p=torch.ones(x.shape[0]), gray_p=torch.zeros(x.shape[0]),
                                     generator=_generator(seed))
    matrix, pivot = colour.color_transform(draws)
    offset = (pivot.double() @ x.mean(dim=(-2, -1)).double()[:, :, None])[..., 0]
    pixels = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 3).double()
    out = (pixels @ matrix.double().transpose(1, 2) + offset[:, None]).clamp(0, 1)
    return out.view(x.shape[0], x.shape[2], x.shape[3], 3).permute(0, 3, 1, 2)


def test_color_transform_composes_the_four_ops(colour_batch):
    result = _distort(colour_batch, strength=1.0, seed=5)
    expected = _reference_color_distortion(colour_batch, strength=1.0, seed=5, clamp_each_op=False)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)


def test_color_transform_stays_close_to_torchvision_on_photographs(photo):
    # The two documented approximations together (grey-axis hue, one final clamp) against
    # torchvision's ops with their HSV hue and a clamp after each op, at full strength on a real
    # photograph: measured mean |difference| 0.02, 95th percentile 0.10. Bounds with margin.
    images = photo[:, ::2, ::2].expand(32, -1, -1, -1)
    difference = (_distort(images, strength=1.0, seed=2)
                  - _reference_color_distortion(images, strength=1.0, seed=2, clamp_each_op=True)).abs()
    assert difference.mean() < 0.05
    assert difference.flatten().quantile(0.95) < 0.2


@pytest.mark.parametrize("shift", [-0.2, -0.05, 0.02, 0.13, 0.2])
def test_hue_matrix_approximates_hsv_hue(photo, shift):
    rotated = torch.einsum("ij,jhw->ihw", colour.hue_matrix(torch.tensor([shift]))[0], photo).clamp(0, 1)
    difference = (rotated - TF.adjust_hue(photo, shift)).abs()
    # The tolerance accepted in loaders.colour's docstring (measured <= 0.04 mean, <= 0.19 p99).
    assert difference.mean() < 0.05
    assert difference.flatten().quantile(0.99) < 0.25


def test_hue_matrix_exact_cases():
    matrices = colour.hue_matrix(torch.tensor([0.0, 1 / 3, 0.37]))
    torch.testing.assert_close(matrices[0], torch.eye(3))
    # A third of a turn maps red to green and green to blue, as HSV's hue does.
    torch.testing.assert_close(matrices[1], torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(matrices[2] @ torch.ones(3), torch.ones(3))  # grey stays grey
    torch.testing.assert_close(matrices[2] @ matrices[2].T, torch.eye(3), atol=1e-6, rtol=0)  # a rotation


def test_grey_and_solarize_match_references(colour_batch):
    r, g, b = colour_batch.double().unbind(dim=1)
    luma = 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R 601-2, float64
    grey = torch.einsum("ij,njhw->nihw", colour.grey_matrix("cpu"), colour_batch)
    torch.testing.assert_close(grey.double(), luma[:, None].expand_as(grey), atol=1e-6, rtol=0)
    expected_solarized = torch.stack([TF.solarize(image, 128 / 255) for image in colour_batch])
    assert torch.equal(augment.solarize(colour_batch), expected_solarized)


def test_blur_rows_only_touches_the_drawn_rows(colour_batch):
    blur = torch.tensor([True, False, True, False, False, True])
    sigma = torch.linspace(0.5, 2.0, 6)
    hwc = colour_batch.permute(0, 2, 3, 1).contiguous()
    result = augment.blur_rows(hwc.clone(), blur=blur, sigma=sigma, half=6,
                                scratch=partial(augment._new_buffer, device="cpu")).permute(0, 3, 1, 2)
    everywhere = gaussian_blur(colour_batch, sigma=sigma, half=6)
    torch.testing.assert_close(result, torch.where(blur.view(-1, 1, 1, 1), everywhere, colour_batch))


def test_host_crop_is_torchvision_resized_crop_and_batched_crop_is_close(photo):
    images = (photo * 255).round().to(torch.uint8)[None].repeat(3, 1, 1, 1)
    boxes = torch.tensor([[10.0, 20.0, 110.0, 90.0], [0.0, 0.0, 128.0, 128.0], [50.0, 60.0, 70.0, 75.0]])
    flip = torch.tensor([False, True, False])
    image_index = torch.tensor([0, 2, 1])
    for mode in ("bicubic", "bilinear"):  # RandomResizedCrop's interpolation 3 and 2
        host = resized_crop.crop_resize(images, boxes, image_index=image_index, flip=flip, size=32, interpolation=mode)
        assert host.dtype == torch.uint8 and host.is_contiguous(memory_format=torch.channels_last)
        # The reference backend's crop: PIL's resize (torchvision on a PIL image), which torch's uint8
        # kernel follows within one level of rounding (torchvision's float tensor path, bicubic, does not).
        expected = torch.stack([TF.pil_to_tensor(TF.resized_crop(
            TF.to_pil_image(images[0]), int(y0), int(x0), int(y1 - y0), int(x1 - x0), [32, 32],
            TF.InterpolationMode(mode), antialias=True)) for x0, y0, x1, y1 in boxes.tolist()])
        expected[1] = expected[1].flip(-1)
        assert (host.int() - expected.int()).abs().max() <= 1, mode
    # The accelerators' roi_align path: another antialiasing filter, the same crops.
    batched = resized_crop._crop_resize_batched(images, boxes, image_index=image_index, flip=flip, size=32)
    assert (batched - host.float()).abs().mean() < 4  # of 255


def test_cpu_chunks_and_threads_do_not_change_the_output(small_recipe, monkeypatch):
    # The CPU path draws everything first, then applies the draws in chunks of rows over threads:
    # neither the chunking nor the thread count may change a value.
    images = torch.randint(0, 256, (6, 3, 40, 48), dtype=torch.uint8)
    sizes = torch.tensor([[40, 48], [32, 32], [20, 48], [40, 10], [1, 1], [33, 47]])
    multicrop = DeviceMultiCrop(small_recipe, dtype=torch.float32, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = multicrop(images, sizes, generator=_generator(3))
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # restored
    monkeypatch.setattr(augment, "_CHUNK_PIXELS", 1)  # one row per chunk
    torch.set_num_threads(2)
    try:
        row_chunks = multicrop(images, sizes, generator=_generator(3))
    finally:
        torch.set_num_threads(threads)
    # The whole group at once, as on an accelerator (with the CPU's crop).
    generator = _generator(3)
    draws = [multicrop._draw_group(sizes, group, image_colour=None, generator=generator) for group in range(2)]
    whole = []
    for draw, size in zip(draws, small_recipe.size_crops):
        out = torch.empty(2 * 6, size, size, 3)
        multicrop._apply(images, draw, first_row=0, out=out, scratch=partial(augment._new_buffer, device="cpu"))
        whole.extend(out.permute(0, 3, 1, 2).chunk(2))
    for a, b, c in zip(one_thread, row_chunks, whole):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_blur_rate_and_sigma_range():
    recipe = recipe_from_transforms([
        dict(name="RandomResizedCrop", size=16, scale=[1.0, 1.0], ratio=[1.0, 1.0]),
        dict(name="ImgPilGaussianBlur", p=0.3, radius_min=1.0, radius_max=2.0),
    ])
    checkerboard = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 255).to(torch.uint8)
    images = checkerboard.expand(1000, 3, 16, 16).contiguous()
    (crops,) = DeviceMultiCrop(recipe, dtype=torch.float32, device="cpu")(
        images, torch.tensor([[16, 16]]).repeat(1000, 1), generator=_generator(4))
    blurred = (crops - images.float() / 255).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert blurred.float().mean().item() == pytest.approx(0.3, abs=4 * math.sqrt(0.3 * 0.7 / 1000))
    # Sigma >= 1 on a checkerboard: interior contrast falls below a third of its range (sigma 1
    # leaves 0.21 peak to peak), while the unblurred rows keep all of it.
    interior = crops[:, :, 4:12, 4:12]
    spread = interior.amax(dim=(2, 3)) - interior.amin(dim=(2, 3))
    assert (spread[blurred] < 0.3).all() and (spread[~blurred] > 0.99).all()


@pytest.mark.parametrize("num_pixels", [64, 35])  # 16 pixels per matmul row, and 1 (35 is odd)
def test_apply_color_matches_a_float64_reference(num_pixels):
    generator = _generator(5)
    pixels = torch.rand(3, num_pixels, 3, generator=generator) * 255
    matrix = torch.randn(3, 3, 3, generator=generator) / 255
    offset = torch.randn(3, 3, generator=generator)
    out = colour.apply_color(pixels, matrix, offset, out=torch.empty(3, num_pixels, 3))
    expected = torch.stack([torch.stack([m @ p + o for p in image]) for image, m, o in
                            zip(pixels.double(), matrix.double(), offset.double())])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-6)


def test_cpu_output_buffers_are_reused_only_once_released(small_recipe):
    images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8)
    sizes = torch.tensor([[40, 48]]).repeat(4, 1)
    multicrop = DeviceMultiCrop(small_recipe, dtype=torch.float32, device="cpu")
    first = multicrop(images, sizes, generator=_generator(1))
    kept = [crop.clone() for crop in first]
    held_view = first[0][1:3]  # a view of a view keeps the buffer alive too
    second = multicrop(images, sizes, generator=_generator(2))
    assert all(torch.equal(a, b) for a, b in zip(first, kept))  # live crops are never overwritten
    assert torch.equal(held_view, kept[0][1:3])
    addresses = {crop.untyped_storage().data_ptr() for crop in first + second}
    del first, held_view, second
    third = multicrop(images, sizes, generator=_generator(1))
    assert {crop.untyped_storage().data_ptr() for crop in third} <= addresses  # released buffers reused
    assert all(torch.equal(a, b) for a, b in zip(third, kept))


def test_colour_before_the_crop_pivots_at_the_whole_images_mean():
    # ColorJitter listed before the crop (NPID): one draw per image, and contrast pivots at the
    # mean grey of the whole image (its valid region, not the padding), as VISSL's jitter of the
    # whole image does, even for a crop that sees only part of it.
    images = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    sizes = torch.tensor([[20, 24], [10, 7], [16, 24]])
    expected = torch.stack([image[:, :h, :w].double().mean(dim=(1, 2)) for image, (h, w) in zip(images, sizes.tolist())])
    torch.testing.assert_close(colour.image_means(images, sizes).double(), expected, atol=1e-4, rtol=0)
    recipe = recipe_from_transforms([dict(name="ColorJitter", contrast=0.8), dict(
        name="ImgPilToMultiCrop", num_crops=[2, 3], size_crops=[8, 4], crop_scales=[[0.2, 1.0], [0.05, 0.2]])])
    multicrop = DeviceMultiCrop(recipe, dtype=torch.float32, device="cpu")
    matrix, offset = multicrop._draw_image_colour(images, sizes, generator=_generator(1))
    factor = matrix[:, 0, 0] * 255  # contrast only: f * rgb + (1 - f) * the image's mean grey
    torch.testing.assert_close(matrix * 255, factor[:, None, None] * torch.eye(3).expand(3, 3, 3))
    grey = expected.float() @ torch.tensor([0.299, 0.587, 0.114])
    torch.testing.assert_close(offset * 255, ((1 - factor) * grey)[:, None].expand(3, 3), atol=1e-3, rtol=0)
    draws = [multicrop._draw_group(sizes, group, image_colour=(matrix, offset), generator=_generator(2))
             for group in range(2)]
    for draw, count in zip(draws, (2, 3)):  # every crop of image i carries image i's draw
        assert torch.equal(draw.color_offset, offset.repeat(count, 1)) and draw.color_pivot is None
