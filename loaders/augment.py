"""The SSL augmentations as batched torch ops: the same code on the GPU and on the CPU.

Every random parameter is drawn for the whole batch at once from a torch.Generator on the
images' device, and each per-sample decision (flip or not, blur or not, the order of the
colour ops) is a per-row tensor, so there is no host sync and no Python loop over samples on
an accelerator. Work happens at crop resolution only: the padded full image is read once, by
the crop itself. Output: normalised, in the training dtype, channels_last.

Crop and resize (torchvision's RandomResizedCrop, antialiased bilinear):
  CPU: one F.interpolate per crop on the uint8 image, with host-side boxes, which on the CPU
      are already host memory (no sync). This is torchvision's own resize kernel on uint8
      tensors, so the crop equals TF.resized_crop(..., antialias=True) exactly, and it is
      20x faster than roi_align's scalar CPU kernel.
  Accelerators: one roi_align per crop group (sampling_ratio=-1: ceil(box / output) bilinear
      samples per output pixel, a box filter that antialiases down-scaled crops).

Colour (SimCLR's ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) in a random order per image, then
RandomGrayscale): brightness, contrast, saturation and grayscale are affine maps of RGB, and
the hue shift is approximated by a rotation about the grey axis, so the whole distortion of
one image composes into one 3x3 matrix and offset, applied in one pass with one final clamp.
Two documented differences from torchvision's per-op definitions, both tested:
  - hue: a rotation about the (1, 1, 1) axis, not HSV's hexcone; on photographs, for shifts up
    to 0.2 turn, the mean absolute difference is <= 0.04 and the 99th percentile <= 0.15 (of
    the [0, 1] range). A YIQ rotation, the other standard approximation, is about 2x further.
  - clamping: once at the end, not after each op (values outside [0, 1] between ops, e.g. after
    brightness 1.8, keep their excess until the final clamp).
The single ops otherwise follow torchvision.transforms.functional (brightness, contrast and
saturation blend with black, the mean grey level and the grey image; grey is ITU-R 601-2
luma); blur and solarize are exact (reflect-padded separable Gaussian; invert >= 128/255).
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
        # Normalisation as one multiply-add: (x - mean) / std = x * scale + shift.
        mean = torch.tensor(recipe.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(recipe.std, device=self.device).view(1, 3, 1, 1)
        self.scale, self.shift = 1 / std, -mean / std
        # Per-crop probabilities made once on the device: no host-to-device copy per batch.
        self.blur_p = torch.tensor(recipe.blur_p, device=self.device)
        self.solarize_p = torch.tensor(recipe.solarize_p, device=self.device)

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, *, generator: torch.Generator) -> list[torch.Tensor]:
        """images: (B, 3, H, W) uint8, each image at the top left, padded to a common H, W
        (channels_last memory, e.g. a permuted (B, H, W, 3) buffer, is the fastest on the CPU).
        sizes: (B, 2) int valid (height, width) of each image, on the images' device.
        generator: a torch.Generator on the images' device; it alone decides every random draw.
        Returns total_num_crops tensors (B, 3, s, s) in crop order, normalised, in self.dtype,
        channels_last. On accelerators, bilinear sampling may read up to half a pixel of padding
        at the bottom and right edges of an up-scaled crop: pad by edge replication there.
        """
        if images.device.type != "cpu":
            return self._multicrop(images, sizes, generator=generator)
        # On the CPU, one intra-op thread: the work is many small ops (one resize per crop), and a
        # loader's decode threads use the other cores. On a loaded 2-core machine this is 1.6x
        # faster than two threads alone, more next to decoding.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._multicrop(images, sizes, generator=generator)
        finally:
            torch.set_num_threads(threads)

    def _multicrop(self, images: torch.Tensor, sizes: torch.Tensor, *, generator: torch.Generator
                   ) -> list[torch.Tensor]:
        recipe = self.recipe
        batch = images.shape[0]
        crops: list[torch.Tensor] = []
        first_crop = 0
        for group, (size, count) in enumerate(zip(recipe.size_crops, recipe.num_crops)):
            # All crops of a group at once: rows k*B .. (k+1)*B - 1 are crop first_crop + k.
            rows = count * batch
            boxes = sample_crop_boxes(
                sizes.repeat(count, 1), scale=recipe.crop_scales[group], ratio=recipe.crop_ratio, generator=generator
            )
            flip = _draw(rows, recipe.flip_p, generator)
            x = crop_resize(images, boxes, flip=flip, size=size)  # (rows, 3, s, s) in [0, 255], channels_last
            x = self._augment(x, crop_slice=slice(first_crop, first_crop + count), size=size, generator=generator)
            x = torch.addcmul(self.shift, x, self.scale, out=x).to(self.dtype)  # in place, channels_last
            crops.extend(x.chunk(count))
            first_crop += count
        return crops

    def _augment(self, x: torch.Tensor, *, crop_slice: slice, size: int, generator: torch.Generator) -> torch.Tensor:
        """Colour distortion, blur and solarize of (n, 3, s, s) channels_last crops in [0, 255]
        -> (n, 3, s, s) channels_last float32 in [0, 1]."""
        recipe = self.recipe
        rows = x.shape[0]
        batch = rows // (crop_slice.stop - crop_slice.start)
        pixels = x.permute(0, 2, 3, 1).reshape(rows, size * size, 3).float()  # (n, P, 3): a view before .float()
        if recipe.color_strength is None:
            matrix = torch.eye(3, device=x.device).expand(rows, 3, 3)
            offset = torch.zeros(rows, 3, device=x.device)
        else:
            matrix, offset = color_transform(pixels.mean(dim=1) / 255, strength=recipe.color_strength,
                                             color_p=recipe.color_p, gray_p=recipe.gray_p, generator=generator)
        # The 1/255 of [0, 255] -> [0, 1] rides on the colour matrix: one pass for both.
        pixels = torch.bmm(pixels, matrix.transpose(1, 2) / 255).add_(offset[:, None, :]).clamp_(0, 1)
        hwc = pixels.view(rows, size, size, 3)
        if max(recipe.blur_p[crop_slice]) > 0:  # the recipe's Python floats: no sync
            low, high = recipe.blur_sigma
            sigma = low + (high - low) * torch.rand(rows, generator=generator, device=x.device)
            blur = _draw_per_crop(self.blur_p[crop_slice], batch, generator).view(-1)
            hwc = _blur_rows(hwc, blur=blur, sigma=sigma, kernel_size=blur_kernel_size(size))
        if max(recipe.solarize_p[crop_slice]) > 0:
            solarized = _draw_per_crop(self.solarize_p[crop_slice], batch, generator).view(rows, 1, 1, 1)
            hwc = torch.where(solarized, solarize(hwc), hwc)
        return hwc.permute(0, 3, 1, 2)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, *, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Cut boxes (n, 4) (x0, y0, x1, y1, integer valued) of images (B, 3, H, W) uint8, box r from
    image r mod B, resize each to size x size and mirror the rows where flip (n, 1, 1, 1) bool.
    Returns (n, 3, size, size) channels_last, values in [0, 255] (uint8 on the CPU, float else)."""
    if images.device.type == "cpu":
        return _crop_resize_host(images, boxes, flip=flip, size=size)
    return _crop_resize_batched(images, boxes, flip=flip, size=size)


def _crop_resize_host(images: torch.Tensor, boxes: torch.Tensor, *, flip: torch.Tensor, size: int) -> torch.Tensor:
    batch = images.shape[0]
    out = torch.empty(boxes.shape[0], size, size, 3, dtype=images.dtype).permute(0, 3, 1, 2)
    # sync: none, the tensors are host memory on the CPU.
    for row, ((x0, y0, x1, y1), mirrored) in enumerate(zip(boxes.int().tolist(), flip.view(-1).tolist())):
        crop = images[row % batch : row % batch + 1, :, y0:y1, x0:x1]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out[row] = crop.flip(-1) if mirrored else crop
    return out


def _crop_resize_batched(images: torch.Tensor, boxes: torch.Tensor, *, flip: torch.Tensor, size: int) -> torch.Tensor:
    batch = images.shape[0]
    image_index = torch.arange(boxes.shape[0], device=boxes.device) % batch
    rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], dim=1)  # (n, 5)
    x = roi_align(images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return torch.where(flip, x.flip(-1), x).contiguous(memory_format=torch.channels_last)


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


def color_transform(
    mean_rgb: torch.Tensor, *, strength: float, color_p: float, gray_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's colour distortion of n images as one affine map each: with probability color_p,
    ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with its four ops in a random order per image; then
    grayscale with probability gray_p.

    mean_rgb: (n, 3) mean colour of each image in [0, 1] (contrast's pivot derives from it).
    Returns (matrix (n, 3, 3), offset (n, 3)): the distorted pixel is clamp(matrix @ rgb + offset, 0, 1).
    """
    rows, device = mean_rgb.shape[0], mean_rgb.device
    jitter, hue_jitter = 0.8 * strength, 0.2 * strength
    # Columns: brightness, contrast, saturation factors in [max(0, 1 - j), 1 + j]; hue in [-h, h].
    u = torch.rand(rows, 4, generator=generator, device=device)
    low = max(0.0, 1.0 - jitter)
    factors = low + (1.0 + jitter - low) * u[:, :3]
    hue = (2 * u[:, 3] - 1) * hue_jitter
    order = torch.rand(rows, 4, generator=generator, device=device).argsort(dim=1)  # a permutation per row
    identity = torch.eye(3, device=device).expand(rows, 3, 3)
    grey = grey_matrix(device).expand(rows, 3, 3)
    rotation = hue_matrix(hue)
    matrix, offset = identity, torch.zeros(rows, 3, device=device)
    for position in range(4):
        op = order[:, position].view(rows, 1, 1)
        factor = factors.gather(1, order[:, position : position + 1].clamp(max=2)).view(rows, 1, 1)
        # Brightness and contrast scale by the factor; saturation blends with the grey image;
        # contrast also adds (1 - factor) * the current mean grey level (torchvision's definitions).
        step = torch.where(op == 2, factor * identity + (1 - factor) * grey, factor * identity)
        step = torch.where(op == 3, rotation, step)
        mean_now = (matrix @ mean_rgb[:, :, None])[..., 0] + offset  # (n, 3): linear maps commute with the mean
        mean_grey = (torch.tensor(_LUMA, device=device) * mean_now).sum(dim=1)
        shift = torch.where(op[:, 0] == 1, (1 - factor[:, 0]) * mean_grey[:, None], torch.zeros_like(factor[:, 0]))
        matrix, offset = step @ matrix, (step @ offset[:, :, None])[..., 0] + shift
    jittered = _draw(rows, color_p, generator).view(rows, 1, 1)
    matrix, offset = torch.where(jittered, matrix, identity), torch.where(jittered[:, 0], offset, 0.0)
    greyed = _draw(rows, gray_p, generator).view(rows, 1, 1)
    grey_offset = (grey @ offset[:, :, None])[..., 0]
    return torch.where(greyed, grey @ matrix, matrix), torch.where(greyed[:, 0], grey_offset, offset)


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


def gaussian_blur(x: torch.Tensor, *, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (n,) per image, reflect padding. x (n, C, H, W)."""
    return _blur_hwc(x.permute(0, 2, 3, 1), sigma=sigma, kernel_size=kernel_size).permute(0, 3, 1, 2)


def blur_matrix(sigma: torch.Tensor, *, size: int, kernel_size: int) -> torch.Tensor:
    """(n, size, size): row v holds the normalised Gaussian weights (sigma (n,)) of the pixels
    that output v reads, reflect padding folded in (index -1 reads 1, size reads size - 2)."""
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, device=sigma.device, dtype=sigma.dtype) - half
    weights = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)  # (n, k)
    source = torch.arange(size, device=sigma.device)[:, None] + offsets.long()[None, :]  # (size, k)
    source = torch.where(source < 0, -source, torch.where(source >= size, 2 * (size - 1) - source, source))
    matrix = torch.zeros(sigma.shape[0], size, size, device=sigma.device, dtype=sigma.dtype)
    return matrix.scatter_add_(2, source.expand(sigma.shape[0], size, kernel_size),
                               weights[:, None, :].expand(-1, size, -1))


def _blur_hwc(x: torch.Tensor, *, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """gaussian_blur of x (n, H, W, C). Each pass is a batched matmul with a banded matrix:
    on the CPU 3-8x faster than a depthwise convolution despite the zeros, and exact."""
    rows, height, width, channels = x.shape
    along_h = blur_matrix(sigma, size=height, kernel_size=kernel_size)
    along_w = along_h if width == height else blur_matrix(sigma, size=width, kernel_size=kernel_size)
    x = torch.bmm(along_h, x.reshape(rows, height, width * channels)).view(rows, height, width, channels)
    return torch.einsum("nvw,nhwc->nhvc", along_w, x)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Invert values >= 128/255 (PIL's ImageOps.solarize on the uint8 image). x in [0, 1]."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)


def _blur_rows(x: torch.Tensor, *, blur: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur the rows of x (n, H, W, C) where blur (n,) bool, each with its sigma (n,)."""
    if x.device.type != "cpu":
        return torch.where(blur.view(-1, 1, 1, 1), _blur_hwc(x, sigma=sigma, kernel_size=kernel_size), x)
    # sync: none, host memory on the CPU: blur only the rows that drew a blur (half of them).
    rows = blur.nonzero()[:, 0]
    x[rows] = _blur_hwc(x[rows], sigma=sigma[rows], kernel_size=kernel_size)
    return x


def _draw(rows: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(rows, 1, 1, 1) bool, each True with probability p."""
    return (torch.rand(rows, generator=generator, device=generator.device) < p).view(rows, 1, 1, 1)


def _draw_per_crop(p: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(len(p) * batch, 1, 1, 1) bool: rows k*batch .. (k+1)*batch - 1 True with probability p[k]."""
    probability = p.view(-1, 1).expand(-1, batch).reshape(-1)
    return (torch.rand(probability.shape[0], generator=generator, device=p.device) < probability).view(-1, 1, 1, 1)
