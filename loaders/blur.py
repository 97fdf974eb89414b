"""PIL's GaussianBlur (VISSL's ImgPilGaussianBlur) of a batch, one sigma per image, as
banded-matrix products.

PIL's ImageFilter.GaussianBlur(radius=sigma) is not a sampled Gaussian: it runs three passes of
an "extended" box filter along each axis (Gwosdek et al. 2011; Pillow's BoxBlur.c), each pass
replicating the edge pixels and rounding to uint8. The box's radius r (a real number: the two
far taps get the fractional weight) makes the three passes' variance exactly sigma^2. Here the
three passes along an axis compose into one (size, size) matrix (`blur_matrix`), exactly, edge
replication included; the only difference from PIL is that PIL rounds to uint8 after each of its
six passes and this path does not. Measured against PIL on photograph-like and noise images at
16-224 px, sigma 0.1-2 (tests/loaders/test_augment.py): at most 3/255 per pixel, 1.1/255 on
average. A sampled Gaussian truncated at 10% of the crop (fastssl's earlier blur) acted like
sigma 1.85 for sigma 2 on 96 px crops.

The blur is separable, so a batch blurs with two batched matmuls. Only the band around the
diagonal is nonzero, so each pass multiplies blocks of _BLUR_BLOCK output rows by the input rows
their taps reach: ~4x fewer multiplies than the full matrix at 224 px.
"""
from __future__ import annotations

import math

import torch

# Output rows (and columns) per banded-matrix block of the blur: ~4x fewer multiplies than the
# full band matrix at 224 px, blocks still large enough for an efficient matmul.
_BLUR_BLOCK = 32
# PIL's GaussianBlur: box passes per axis.
_PASSES = 3


def box_radius(sigma: torch.Tensor) -> torch.Tensor:
    """PIL's extended-box radius for a Gaussian of std sigma (n,) over three passes (Gwosdek et
    al. 2011, eqs. 7, 11, 14): integer part l plus fractional part a."""
    variance = sigma * sigma / _PASSES
    length = torch.sqrt(12 * variance + 1)
    whole = torch.floor((length - 1) / 2)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance) / (6 * (variance - (whole + 1) ** 2))
    return whole + fraction


def blur_half_width(sigma_max: float) -> int:
    """How far (pixels) the blur of any sigma <= sigma_max reaches: three boxes of radius
    floor(r) + 1 (their far taps)."""
    radius = box_radius(torch.tensor([sigma_max], dtype=torch.float64))[0].item()
    return _PASSES * (math.floor(radius) + 1)


def gaussian_blur(x: torch.Tensor, *, sigma: torch.Tensor, half: int) -> torch.Tensor:
    """PIL's GaussianBlur with one sigma (n,) per image of x (n, C, H, W) (values of any scale).
    half: blur_half_width of the largest sigma."""
    hwc = x.permute(0, 2, 3, 1)
    out, between = (torch.empty(hwc.shape, dtype=hwc.dtype, device=hwc.device) for _ in range(2))
    return _blur_hwc(hwc, sigma=sigma, half=half, out=out, between=between).permute(0, 3, 1, 2)


def _box_matrix(sigma: torch.Tensor, *, size: int, half: int) -> torch.Tensor:
    """(n, size, size): one pass of PIL's extended box filter, edge pixels replicated."""
    reach = half // _PASSES
    offsets = torch.arange(-reach, reach + 1, device=sigma.device, dtype=sigma.dtype)  # (k,)
    radius = box_radius(sigma)[:, None]  # (n, 1)
    whole = torch.floor(radius)
    weights = torch.where(offsets.abs() <= whole, 1.0, torch.where(offsets.abs() == whole + 1, radius - whole, 0.0))
    weights = weights / (2 * radius + 1)  # (n, k): sums to 1
    source = (torch.arange(size, device=sigma.device)[:, None] + offsets.long()[None, :]).clamp(0, size - 1)
    matrix = torch.zeros(sigma.shape[0], size, size, device=sigma.device, dtype=sigma.dtype)
    return matrix.scatter_add_(2, source.expand(sigma.shape[0], size, len(offsets)),
                               weights[:, None, :].expand(-1, size, -1))


def blur_matrix(sigma: torch.Tensor, *, size: int, half: int) -> torch.Tensor:
    """(n, size, size): PIL's three box passes along an axis of `size` pixels, composed (sigma (n,)).

    Rows at least `half` from both edges hold the same kernel (the three boxes convolved); only
    the first and last `half` rows see the edge replication of each pass. Both come from the
    cube of a small (2 half + 1)-pixel box matrix, so no size^3 product is needed.
    """
    small = 2 * half + 1
    if size <= 2 * small:
        box = _box_matrix(sigma, size=size, half=half)
        return box @ box @ box
    box = _box_matrix(sigma, size=small, half=half)
    corner = box @ box @ box  # (n, small, small); its rows < half are the edge rows, row half the kernel
    kernel = corner[:, half, :]  # (n, small)
    # Tails below float32's smallest normal (a small sigma's) are denormals, which slow the CPU's
    # matmul ~10x; they are far below the sum's resolution, so they become 0.
    tiny = torch.finfo(sigma.dtype).tiny
    kernel, corner = torch.where(kernel < tiny, 0.0, kernel), torch.where(corner < tiny, 0.0, corner)
    offsets = torch.arange(-half, half + 1, device=sigma.device)
    source = (torch.arange(size, device=sigma.device)[:, None] + offsets[None, :]).clamp(0, size - 1)
    matrix = torch.zeros(sigma.shape[0], size, size, device=sigma.device, dtype=sigma.dtype)
    matrix.scatter_add_(2, source.expand(sigma.shape[0], size, small), kernel[:, None, :].expand(-1, size, -1))
    matrix[:, :half] = 0
    matrix[:, :half, :small] = corner[:, :half]
    matrix[:, size - half :] = 0
    matrix[:, size - half :, size - small :] = corner[:, :half].flip(1, 2)  # the mirror image of the top edge
    return matrix


def _blur_hwc(x: torch.Tensor, *, sigma: torch.Tensor, half: int, out: torch.Tensor,
              between: torch.Tensor) -> torch.Tensor:
    """gaussian_blur of x (n, H, W, C), written to and returned in out (n, H, W, C) contiguous,
    which may be x itself; between (n, H, W, C) contiguous holds the first pass. Each pass is a few batched
    matmuls with blocks of the banded blur matrix (the only nonzero part of a block of output
    lines is the block plus `half` lines on each side): exact, and on the CPU 3-8x faster
    than a depthwise convolution. Along W, whose pixels interleave the channels, a block is
    kron(block^T, I_C), so the image is never transposed."""
    rows, height, width, channels = x.shape
    along_h = blur_matrix(sigma, size=height, half=half)
    along_w = along_h if width == height else blur_matrix(sigma, size=width, half=half)
    x = x.reshape(rows, height, width * channels)
    blurred_h = between.view(rows, height, width * channels)
    for start, stop, low, high in _band_blocks(height, half):
        torch.bmm(along_h[:, start:stop, low:high], x[:, low:high], out=blurred_h[:, start:stop])
    out = out.view(rows, height, width * channels)
    for start, stop, low, high in _band_blocks(width, half):
        block = x.new_zeros(rows, high - low, channels, stop - start, channels)
        for channel in range(channels):
            block[:, :, channel, :, channel] = along_w[:, start:stop, low:high].transpose(1, 2)
        block = block.view(rows, (high - low) * channels, (stop - start) * channels)
        out[:, :, start * channels : stop * channels] = torch.bmm(
            blurred_h[:, :, low * channels : high * channels], block)
    return out.view(rows, height, width, channels)


def _band_blocks(size: int, half: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, low, high): output lines start..stop-1 read input lines low..high-1."""
    return [(start, min(size, start + _BLUR_BLOCK), max(0, start - half), min(size, start + _BLUR_BLOCK + half))
            for start in range(0, size, _BLUR_BLOCK)]


def blur_rows(x: torch.Tensor, *, blur: torch.Tensor, sigma: torch.Tensor, half: int, scratch
               ) -> torch.Tensor:
    """Blur the rows of x (n, H, W, C) where blur (n,) bool, each with its sigma (n,).
    scratch(name, shape, dtype): a buffer for intermediate values. On the CPU, x is blurred in place."""
    if x.device.type != "cpu":
        out, between = scratch("blurred", x.shape, x.dtype), scratch("between", x.shape, x.dtype)
        blurred = _blur_hwc(x, sigma=sigma, half=half, out=out, between=between)
        return torch.where(blur.view(-1, 1, 1, 1), blurred, x)
    # sync: none, host memory on the CPU: blur only the rows that drew a blur (half of them).
    rows = blur.nonzero()[:, 0]
    if len(rows):
        shape = (len(rows), *x.shape[1:])
        selected = torch.index_select(x, 0, rows, out=scratch("selected", shape, x.dtype))
        _blur_hwc(selected, sigma=sigma[rows], half=half, out=selected,
                  between=scratch("between", shape, x.dtype))
        x.index_copy_(0, rows, selected)
    return x
