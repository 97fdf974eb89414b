"""The SSL augmentations as batched torch ops: the same code on the GPU and on the CPU.

Every random parameter is drawn for the whole batch at once from a torch.Generator on the
images' device, and each per-sample decision (flip or not, blur or not, the order of the
colour ops) is applied with torch.where, so there is no host sync and no Python loop over
samples. Images are float32 in [0, 1] inside; the output is normalised, in the training dtype,
channels_last.

The per-image ops follow torchvision.transforms.functional's definitions (tested against them):
brightness, contrast and saturation blend with black, the mean grey level and the grey image;
hue rotates H in HSV; grey is ITU-R 601-2 luma; solarize inverts values >= 128/255.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from loaders.recipe import MultiCropRecipe, blur_kernel_size

# torchvision's RandomResizedCrop tries this many (scale, ratio) draws before its fallback.
_CROP_ATTEMPTS = 10
_LUMA = (0.299, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128 / 255


class DeviceMultiCrop:
    """The recipe's multi-crop augmentation for a batch of uint8 images already on the device."""

    def __init__(self, recipe: MultiCropRecipe, *, dtype: torch.dtype, device: torch.device | str):
        self.recipe = recipe
        self.dtype = dtype
        self.device = torch.device(device)
        self.mean = torch.tensor(recipe.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(recipe.std, device=self.device).view(1, 3, 1, 1)
        # Per-crop probabilities made once on the device: no host-to-device copy per batch.
        self.blur_p = torch.tensor(recipe.blur_p, device=self.device)
        self.solarize_p = torch.tensor(recipe.solarize_p, device=self.device)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, *, generator: torch.Generator) -> list[torch.Tensor]:
        """images: (B, 3, H, W) uint8, each image at the top left, padded to a common H, W.
        sizes: (B, 2) int valid (height, width) of each image, on the images' device.
        generator: a torch.Generator on the images' device; it alone decides every random draw.
        Returns total_num_crops tensors (B, 3, s, s) in crop order, normalised, in self.dtype,
        channels_last. Bilinear sampling may read up to half a pixel of padding at the bottom and
        right edges of an up-scaled crop: pad by edge replication where that matters.
        """
        recipe = self.recipe
        batch = images.shape[0]
        source = images.float()
        crops: list[torch.Tensor] = []
        first_crop = 0
        for group, (size, count) in enumerate(zip(recipe.size_crops, recipe.num_crops)):
            # All crops of a group in one roi_align: rows k*B .. (k+1)*B - 1 are crop first_crop + k.
            boxes = sample_crop_boxes(
                sizes.repeat(count, 1), scale=recipe.crop_scales[group], ratio=recipe.crop_ratio, generator=generator
            )
            image_index = torch.arange(batch, device=images.device).repeat(count)
            rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], dim=1)  # (count*B, 5)
            # sampling_ratio=-1: ceil(box / output) samples per output pixel, a box filter that
            # antialiases down-scaled crops and samples pixel centres exactly at scale 1.
            x = roi_align(source, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True) / 255
            x = self._augment(x, crop_slice=slice(first_crop, first_crop + count), size=size, generator=generator)
            x = ((x - self.mean) / self.std).to(self.dtype).contiguous(memory_format=torch.channels_last)
            crops.extend(x.chunk(count))
            first_crop += count
        return crops

    def _augment(self, x: torch.Tensor, *, crop_slice: slice, size: int, generator: torch.Generator) -> torch.Tensor:
        """Flip, colour distortion, blur and solarize of (n, 3, s, s) crops in [0, 1]."""
        recipe = self.recipe
        rows = x.shape[0]
        count = crop_slice.stop - crop_slice.start
        x = torch.where(_draw(rows, recipe.flip_p, generator), x.flip(-1), x)
        if recipe.color_strength is not None:
            x = color_distortion(
                x, strength=recipe.color_strength, color_p=recipe.color_p, gray_p=recipe.gray_p, generator=generator
            )
        if max(recipe.blur_p[crop_slice]) > 0:  # the recipe's Python floats: no sync
            low, high = recipe.blur_sigma
            sigma = low + (high - low) * torch.rand(rows, generator=generator, device=x.device)
            blurred = gaussian_blur(x, sigma=sigma, kernel_size=blur_kernel_size(size))
            x = torch.where(_draw_per_crop(self.blur_p[crop_slice], rows // count, generator), blurred, x)
        if max(recipe.solarize_p[crop_slice]) > 0:
            x = torch.where(_draw_per_crop(self.solarize_p[crop_slice], rows // count, generator), solarize(x), x)
        return x


def sample_crop_boxes(
    sizes: torch.Tensor, *, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """RandomResizedCrop boxes for every image at once (torchvision's algorithm, batched).

    sizes: (n, 2) int (height, width). Returns (n, 4) float32 boxes (x0, y0, x1, y1) in pixels,
    integer valued: area fraction in `scale`, aspect ratio w / h in `ratio` (log-uniform); the
    first of 10 draws that fits, else a central crop at the nearest allowed ratio.
    """
    device = sizes.device
    height, width = sizes[:, 0:1].float(), sizes[:, 1:2].float()  # (n, 1)
    u = torch.rand(sizes.shape[0], _CROP_ATTEMPTS, 4, generator=generator, device=device)
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * u[..., 1])
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)  # (n, attempts)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first fitting draw (argmax returns the first max)
    crop_w, crop_h = crop_w.gather(1, first), crop_h.gather(1, first)
    top = torch.floor(u[..., 2].gather(1, first) * (height - crop_h + 1)).clamp(max=height - crop_h)
    left = torch.floor(u[..., 3].gather(1, first) * (width - crop_w + 1)).clamp(max=width - crop_w)
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    has_fit = fits.any(dim=1, keepdim=True)
    crop_w = torch.where(has_fit, crop_w, fallback_w)
    crop_h = torch.where(has_fit, crop_h, fallback_h)
    top = torch.where(has_fit, top, torch.div(height - fallback_h, 2, rounding_mode="floor"))
    left = torch.where(has_fit, left, torch.div(width - fallback_w, 2, rounding_mode="floor"))
    return torch.cat([left, top, left + crop_w, top + crop_h], dim=1)


def color_distortion(
    x: torch.Tensor, *, strength: float, color_p: float, gray_p: float, generator: torch.Generator
) -> torch.Tensor:
    """SimCLR's colour distortion of (n, 3, H, W) images in [0, 1]: with probability color_p,
    ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with its four ops in a random order per image; then
    grayscale with probability gray_p."""
    rows, device = x.shape[0], x.device
    jitter, hue_jitter = 0.8 * strength, 0.2 * strength
    # Columns: brightness, contrast, saturation factors in [max(0, 1 - j), 1 + j]; hue in [-h, h].
    u = torch.rand(rows, 4, generator=generator, device=device)
    low = max(0.0, 1.0 - jitter)
    factors = low + (1.0 + jitter - low) * u[:, :3]
    hue = (2 * u[:, 3] - 1) * hue_jitter
    order = torch.rand(rows, 4, generator=generator, device=device).argsort(dim=1)  # a permutation per row
    jittered = x
    for position in range(4):
        op = order[:, position].view(rows, 1, 1, 1)
        # Brightness, contrast and saturation are one blend with different targets (black, the
        # mean grey level, the grey image): one pass computes whichever this row needs.
        grey = rgb_to_grayscale(jittered)
        target = torch.where(op == 1, grey.mean(dim=(-2, -1), keepdim=True), grey)
        target = torch.where(op == 0, torch.zeros_like(target), target)
        factor = factors.gather(1, order[:, position : position + 1].clamp(max=2)).view(rows, 1, 1, 1)
        blended = _blend(jittered, target, factor)
        jittered = torch.where(op == 3, adjust_hue(jittered, hue), blended)
    x = torch.where(_draw(rows, color_p, generator), jittered, x)
    return torch.where(_draw(rows, gray_p, generator), rgb_to_grayscale(x).expand_as(x), x)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) ITU-R 601-2 luma."""
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) in [0, 1], factor (n,)."""
    return _blend(x, torch.zeros_like(x), factor.view(-1, 1, 1, 1))


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's mean grey level. x (n, 3, H, W) in [0, 1], factor (n,)."""
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor.view(-1, 1, 1, 1))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grey image. x (n, 3, H, W) in [0, 1], factor (n,)."""
    return _blend(x, rgb_to_grayscale(x), factor.view(-1, 1, 1, 1))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by shift (n,) turns in [-0.5, 0.5]. x (n, 3, H, W) in [0, 1]."""
    r, g, b = x.unbind(dim=1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    safe_chroma = torch.where(chroma > 0, chroma, 1.0)
    # Hue in sextants, from whichever channel is the maximum (the HSV hexcone).
    sextant = torch.where(
        value == r, (g - b) / safe_chroma, torch.where(value == g, (b - r) / safe_chroma + 2, (r - g) / safe_chroma + 4)
    )
    sextant = torch.where(chroma > 0, sextant, 0.0) + 6 * shift.view(-1, 1, 1)
    sextant = sextant - 6 * torch.floor(sextant / 6)  # into [0, 6); floor is much faster than % on the CPU
    saturation = chroma / torch.where(value > 0, value, 1.0)
    # Back to RGB: channel = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + sextant) mod 6, n = 5, 3, 1.
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = n + sextant
        k = torch.where(k >= 6, k - 6, k)
        channels.append(value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels, dim=1)


def gaussian_blur(x: torch.Tensor, *, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (n,) per image, reflect padding. x (n, C, H, W)."""
    rows, channels, height, width = x.shape
    offsets = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2
    weights = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)  # (n, k)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (n*C, k)
    half = kernel_size // 2
    planes = F.pad(x.reshape(1, rows * channels, height, width), (half, half, half, half), mode="reflect")
    planes = F.conv2d(planes, weights.view(-1, 1, 1, kernel_size), groups=rows * channels)
    planes = F.conv2d(planes, weights.view(-1, 1, kernel_size, 1), groups=rows * channels)
    return planes.view(rows, channels, height, width)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Invert values >= 128/255 (PIL's ImageOps.solarize on the uint8 image). x in [0, 1]."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)


def _blend(x: torch.Tensor, target: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * target).clamp(0, 1)


def _draw(rows: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(rows, 1, 1, 1) bool, each True with probability p."""
    return (torch.rand(rows, generator=generator, device=generator.device) < p).view(rows, 1, 1, 1)


def _draw_per_crop(p: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(len(p) * batch, 1, 1, 1) bool: rows k*batch .. (k+1)*batch - 1 True with probability p[k]."""
    probability = p.view(-1, 1).expand(-1, batch).reshape(-1)
    return (torch.rand(probability.shape[0], generator=generator, device=p.device) < probability).view(-1, 1, 1, 1)
