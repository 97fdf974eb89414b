"""The colour distortion of the batched augmentations (loaders/augment.py): the draws of a batch,
their composition into one affine map per image, and its application to the pixels. Kept apart from
the augmentation pipeline because it is a self-contained piece of colour maths (pure functions of
tensors) whose closeness to torchvision is measured and tested on its own.

Colour (torchvision's ColorJitter with the recipe's ranges, its ops in a random order per image,
then RandomGrayscale; SimCLR's colour distortion is one setting of them): brightness, contrast,
saturation and grayscale are affine maps of RGB, and the hue shift is approximated by a rotation
about the grey axis, so the whole distortion of one image composes into one 3x3 matrix and
offset, applied in one pass with one final clamp. Where the colour transforms precede the crop
in the recipe (colour_per_image, NPID's ColorJitter), each image draws once and its crops share
the draw, contrast pivoting at the whole image's mean grey, as VISSL's jitter of the whole image.
Two documented differences from torchvision's per-op definitions, both tested:
  - hue: a rotation about the (1, 1, 1) axis, not HSV's hexcone; on photographs, for shifts up
    to 0.2 turn, the mean absolute difference is <= 0.04 and the 99th percentile <= 0.15 (of
    the [0, 1] range). A YIQ rotation, the other standard approximation, is about 2x further.
  - clamping: once at the end, not after each op (values outside [0, 1] between ops, e.g. after
    brightness 1.8, keep their excess until the final clamp).
The single ops otherwise follow torchvision.transforms.functional (brightness, contrast and
saturation blend with black, the mean grey level and the grey image; grey is ITU-R 601-2
luma).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

_LUMA = (0.299, 0.587, 0.114)


class ColorDraws(NamedTuple):
    """The random part of the colour distortion of n images, one row each."""

    factors: torch.Tensor  # (n, 3) brightness, contrast, saturation factors
    hue: torch.Tensor  # (n,) hue shift in turns
    order: torch.Tensor  # (n, 4) permutation of the four ops (0 brightness .. 3 hue)
    jittered: torch.Tensor  # (n,) bool: the jitter applies
    greyed: torch.Tensor  # (n,) bool: grayscale applies


def image_means(images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(B, 3) mean pixel of each image's valid (height, width) = sizes (B, 2) region of images
    (B, 3, H, W) uint8 (the rest is padding), in [0, 255]."""
    rows = torch.arange(images.shape[2], device=images.device)[None, :] < sizes[:, 0:1]  # (B, H)
    columns = torch.arange(images.shape[3], device=images.device)[None, :] < sizes[:, 1:2]  # (B, W)
    mask = (rows[:, :, None] & columns[:, None, :]).to(torch.float32)  # (B, H, W)
    return torch.einsum("bchw,bhw->bc", images.float(), mask) / (sizes[:, 0] * sizes[:, 1])[:, None]


def draw_color_jitter(ranges: torch.Tensor, *, jitter_p: torch.Tensor, gray_p: torch.Tensor,
                      generator: torch.Generator) -> ColorDraws:
    """The colour draws of n images: with probability jitter_p (n,), torchvision's ColorJitter
    with its four ops in a random order per image, each factor uniform in its range; then
    grayscale with probability gray_p (n,). ranges: (n, 4, 2) (min, max) of the brightness,
    contrast and saturation factors and of the hue shift in turns (CropAugmentation's fields)."""
    rows, device = ranges.shape[0], generator.device
    u = torch.rand(rows, 4, generator=generator, device=device)
    values = ranges[..., 0] + (ranges[..., 1] - ranges[..., 0]) * u  # (n, 4)
    order = torch.rand(rows, 4, generator=generator, device=device).argsort(dim=1)  # a permutation per row
    jittered = torch.rand(rows, generator=generator, device=device) < jitter_p
    greyed = torch.rand(rows, generator=generator, device=device) < gray_p
    return ColorDraws(factors=values[:, :3], hue=values[:, 3], order=order, jittered=jittered, greyed=greyed)


def color_transform(draws: ColorDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour distortion `draws` of n images as one affine map each, whose offset is linear
    in the image's mean colour (contrast's pivot, the mean grey level, derives from it).

    Returns (matrix (n, 3, 3), pivot (n, 3, 3)): the distorted pixel of an image of mean colour
    mean_rgb (3,) in [0, 1] is clamp(matrix @ rgb + pivot @ mean_rgb, 0, 1).
    """
    rows, device = draws.hue.shape[0], draws.hue.device
    identity = torch.eye(3, device=device).expand(rows, 3, 3)
    grey = grey_matrix(device).expand(rows, 3, 3)
    rotation = hue_matrix(draws.hue)
    matrix, pivot = identity, torch.zeros(rows, 3, 3, device=device)
    for position in range(4):
        op = draws.order[:, position].view(rows, 1, 1)
        factor = draws.factors.gather(1, draws.order[:, position : position + 1].clamp(max=2)).view(rows, 1, 1)
        # Brightness and contrast scale by the factor; saturation blends with the grey image;
        # contrast also adds (1 - factor) * the current mean grey level (torchvision's definitions),
        # grey @ (matrix @ mean_rgb + offset): linear maps commute with the mean.
        step = torch.where(op == 2, factor * identity + (1 - factor) * grey, factor * identity)
        step = torch.where(op == 3, rotation, step)
        shift = torch.where(op == 1, (1 - factor) * (grey @ (matrix + pivot)), 0.0)
        matrix, pivot = step @ matrix, step @ pivot + shift
    jittered = draws.jittered.view(rows, 1, 1)
    matrix, pivot = torch.where(jittered, matrix, identity), torch.where(jittered, pivot, 0.0)
    greyed = draws.greyed.view(rows, 1, 1)
    return torch.where(greyed, grey @ matrix, matrix), torch.where(greyed, grey @ pivot, pivot)


def apply_color(pixels: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor, *, out: torch.Tensor
                ) -> torch.Tensor:
    """matrix (n, 3, 3) @ rgb + offset (n, 3) for every pixel of pixels (n, P, 3), written to and
    returned in out (n, P, 3) (contiguous).

    k pixels at a time against the block-diagonal kron(I_k, matrix^T) (3k x 3k): with an inner
    dimension of 3 a matmul runs at a few % of its speed; at 3k = 48 it is memory bound, and
    the k-fold multiplies by zero cost less than the time they save (2x on the CPU).
    """
    rows, num_pixels, _ = pixels.shape
    k = math.gcd(num_pixels, 16)
    eye = torch.eye(k, device=pixels.device, dtype=pixels.dtype)
    block = torch.einsum("ij,nab->niajb", eye, matrix.transpose(1, 2)).reshape(rows, 3 * k, 3 * k)
    # bmm then add_: baddbmm would first copy the broadcast offset into out, a slower extra pass.
    torch.bmm(pixels.view(rows, num_pixels // k, 3 * k), block, out=out.view(rows, num_pixels // k, 3 * k))
    return out.view(rows, num_pixels // k, 3 * k).add_(offset.repeat(1, k)[:, None, :]).view(rows, num_pixels, 3)


def grey_matrix(device: torch.device | str) -> torch.Tensor:
    """(3, 3): every output channel is the ITU-R 601-2 luma of the input."""
    return torch.tensor(_LUMA, device=device).expand(3, 3)


def hue_matrix(shift: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) rotations of RGB about the grey axis (1, 1, 1) by shift (n,) turns: the hue
    shift as a linear map (Rodrigues' formula). It approximates HSV's hue shift (the hexcone is
    the RGB cube seen along that axis); see the module docstring for how closely."""
    angle = 2 * math.pi * shift.view(-1, 1, 1)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=shift.device) / math.sqrt(3)
    eye = torch.eye(3, device=shift.device)
    return torch.cos(angle) * eye + (1 - torch.cos(angle)) / 3 + torch.sin(angle) * cross
