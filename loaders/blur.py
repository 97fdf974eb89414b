"""Gaussian blur of a batch, one sigma per image, as banded-matrix products.

The blur is separable: along each axis it is a (size, size) matrix whose rows hold the reflect-
padded Gaussian taps, so a batch blurs with two batched matmuls. Only the band around the
diagonal is nonzero, so each pass multiplies blocks of _BLUR_BLOCK output rows by the input rows
their taps reach: ~4x fewer multiplies than the full matrix at 224 px. Exact against a float64
reference and torchvision's gaussian_blur (tests/loaders/test_augment.py).
"""
from __future__ import annotations

import torch

# Output rows (and columns) per banded-matrix block of the blur: ~4x fewer multiplies than the
# full band matrix at 224 px, blocks still large enough for an efficient matmul.
_BLUR_BLOCK = 32


def gaussian_blur(x: torch.Tensor, *, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (n,) per image, reflect padding. x (n, C, H, W)."""
    hwc = x.permute(0, 2, 3, 1)
    out, between = (torch.empty(hwc.shape, dtype=hwc.dtype, device=hwc.device) for _ in range(2))
    return _blur_hwc(hwc, sigma=sigma, kernel_size=kernel_size, out=out, between=between).permute(0, 3, 1, 2)


def blur_matrix(sigma: torch.Tensor, *, size: int, kernel_size: int) -> torch.Tensor:
    """(n, size, size): row v holds the normalised Gaussian weights (sigma (n,)) of the pixels
    that output v reads, reflect padding folded in (index -1 reads 1, size reads size - 2)."""
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, device=sigma.device, dtype=sigma.dtype) - half
    weights = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)  # (n, k)
    # Weights below float32's smallest normal (the tails of a small sigma) are denormals, which
    # slow the CPU's matmul ~10x; they are far below the sum's resolution, so they become 0.
    weights = torch.where(weights < torch.finfo(weights.dtype).tiny, 0.0, weights)
    source = torch.arange(size, device=sigma.device)[:, None] + offsets.long()[None, :]  # (size, k)
    source = torch.where(source < 0, -source, torch.where(source >= size, 2 * (size - 1) - source, source))
    matrix = torch.zeros(sigma.shape[0], size, size, device=sigma.device, dtype=sigma.dtype)
    return matrix.scatter_add_(2, source.expand(sigma.shape[0], size, kernel_size),
                               weights[:, None, :].expand(-1, size, -1))


def _blur_hwc(x: torch.Tensor, *, sigma: torch.Tensor, kernel_size: int, out: torch.Tensor,
              between: torch.Tensor) -> torch.Tensor:
    """gaussian_blur of x (n, H, W, C), written to and returned in out (n, H, W, C) contiguous,
    which may be x itself; between (n, H, W, C) contiguous holds the first pass. Each pass is a few batched
    matmuls with blocks of the banded blur matrix (the only nonzero part of a block of output
    lines is the block plus the kernel's half on each side): exact, and on the CPU 3-8x faster
    than a depthwise convolution. Along W, whose pixels interleave the channels, a block is
    kron(block^T, I_C), so the image is never transposed."""
    rows, height, width, channels = x.shape
    half = kernel_size // 2
    along_h = blur_matrix(sigma, size=height, kernel_size=kernel_size)
    along_w = along_h if width == height else blur_matrix(sigma, size=width, kernel_size=kernel_size)
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


def blur_rows(x: torch.Tensor, *, blur: torch.Tensor, sigma: torch.Tensor, kernel_size: int, scratch
               ) -> torch.Tensor:
    """Blur the rows of x (n, H, W, C) where blur (n,) bool, each with its sigma (n,).
    scratch(name, shape, dtype): a buffer for intermediate values. On the CPU, x is blurred in place."""
    if x.device.type != "cpu":
        out, between = scratch("blurred", x.shape, x.dtype), scratch("between", x.shape, x.dtype)
        blurred = _blur_hwc(x, sigma=sigma, kernel_size=kernel_size, out=out, between=between)
        return torch.where(blur.view(-1, 1, 1, 1), blurred, x)
    # sync: none, host memory on the CPU: blur only the rows that drew a blur (half of them).
    rows = blur.nonzero()[:, 0]
    if len(rows):
        shape = (len(rows), *x.shape[1:])
        selected = torch.index_select(x, 0, rows, out=scratch("selected", shape, x.dtype))
        _blur_hwc(selected, sigma=sigma[rows], kernel_size=kernel_size, out=selected,
                  between=scratch("between", shape, x.dtype))
        x.index_copy_(0, rows, selected)
    return x
