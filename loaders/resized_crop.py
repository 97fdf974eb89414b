"""Crop and resize of the batched augmentations (loaders/augment.py): torchvision's RandomResizedCrop
and Resize + CenterCrop as boxes drawn for a whole batch at once, and the cut of those boxes. Kept
apart from the augmentation pipeline because it is the geometric stage alone: pure functions of
tensors that the pipeline calls once per crop group and that are tested on their own.

Crop and resize (torchvision's RandomResizedCrop, antialiased, the recipe's interpolation):
  CPU: one F.interpolate per crop on the uint8 image, with host-side boxes (no sync): torch's
      uint8 resize kernel, so the crop equals TF.resized_crop(..., antialias=True), bilinear or
      bicubic, 20x faster than roi_align's scalar CPU kernel.
  Accelerators: one roi_align per crop group (sampling_ratio=-1: ceil(box / output) bilinear
      samples per output pixel, a box filter that antialiases down-scaled crops). roi_align is
      bilinear only: a bicubic recipe (interpolation 3) resizes bilinearly there.
  Resize + CenterCrop (evaluation's deterministic crop): the centre box of the original image
      that the two cut out, rounded to whole pixels, resized once (within a pixel of
      torchvision's resize-then-crop).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

# torchvision's RandomResizedCrop tries this many (scale, ratio) draws before its fallback.
_CROP_ATTEMPTS = 10


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, *, image_index: torch.Tensor, flip: torch.Tensor,
                size: int, interpolation: str) -> torch.Tensor:
    """Cut boxes (n, 4) (x0, y0, x1, y1, integer valued) of images (B, 3, H, W) uint8, box r from
    image image_index[r] (n,), resize each to size x size and mirror the rows where flip (n,) bool.
    interpolation: 'bilinear' or 'bicubic' (the CPU's; accelerators resize bilinearly).
    Returns (n, 3, size, size) channels_last, values in [0, 255] (uint8 on the CPU, float else)."""
    if images.device.type == "cpu":
        return _crop_resize_host(images, boxes, image_index=image_index, flip=flip, size=size, mode=interpolation)
    return _crop_resize_batched(images, boxes, image_index=image_index, flip=flip, size=size)


def _crop_resize_host(images: torch.Tensor, boxes: torch.Tensor, *, image_index: torch.Tensor, flip: torch.Tensor,
                      size: int, mode: str) -> torch.Tensor:
    out = torch.empty(boxes.shape[0], size, size, 3, dtype=images.dtype).permute(0, 3, 1, 2)
    # sync: none, the tensors are host memory on the CPU.
    for row, ((x0, y0, x1, y1), image, mirrored) in enumerate(
        zip(boxes.int().tolist(), image_index.tolist(), flip.tolist())
    ):
        crop = images[image : image + 1, :, y0:y1, x0:x1]
        crop = F.interpolate(crop, size=(size, size), mode=mode, antialias=True, align_corners=False)[0]
        out[row] = crop.flip(-1) if mirrored else crop
    return out


def _crop_resize_batched(images: torch.Tensor, boxes: torch.Tensor, *, image_index: torch.Tensor,
                         flip: torch.Tensor, size: int) -> torch.Tensor:
    rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], dim=1)  # (n, 5)
    x = roi_align(images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x).contiguous(memory_format=torch.channels_last)


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


def center_crop_boxes(sizes: torch.Tensor, *, resize: int | None, size: int) -> torch.Tensor:
    """The boxes that torchvision's Resize(resize) (short side; None: no resize) then
    CenterCrop(size) cut out of each image, in the original image's pixels, rounded.

    sizes: (n, 2) int (height, width). Returns (n, 4) float32 boxes (x0, y0, x1, y1).
    """
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()  # (n, 1)
    if resize is None:
        resized_h, resized_w = height, width
    else:  # torchvision: the short side to resize, the long one to int(resize * long / short)
        short = torch.minimum(height, width)
        resized_h = torch.where(height <= width, float(resize), torch.floor(resize * height / short))
        resized_w = torch.where(width <= height, float(resize), torch.floor(resize * width / short))
    top = torch.round((resized_h - size) / 2)  # torchvision's int(round((h - size) / 2))
    left = torch.round((resized_w - size) / 2)
    box = torch.cat([left, top, left + size, top + size], dim=1) * torch.cat(
        [resized_w / width, resized_h / height] * 2, dim=1).reciprocal()
    limits = torch.cat([width, height, width, height], dim=1)
    return torch.round(box).clamp(min=0).minimum(limits).float()
