"""The SSL augmentations as batched torch ops: the same code on the GPU and on the CPU.

Every random parameter of a batch is drawn first, for the whole batch at once, from a
torch.Generator on the images' device (`_draw_group`); each per-sample decision (flip or not,
blur or not, the order of the colour ops) is a per-row tensor, so there is no host sync and no
Python loop over samples on an accelerator. The draws are then applied (`_apply`) to all the
rows of a crop group at once on an accelerator, and on the CPU to chunks of rows spread over
torch.get_num_threads() threads with one intra-op thread each: many mid-sized ops (one resize
per crop) parallelise across rows far better than within an op, and a chunk's intermediates
live in per-thread buffers that are reused, not page-faulted in afresh for every batch. The
draws do not depend on the chunking or the thread count, so neither changes the output. Work
happens at crop resolution only, and the result is written straight into each group's
output buffer (on the CPU, a recent batch's once nothing references it): normalised, in the
training dtype, channels_last.

The crop and resize are loaders/resized_crop.py's and the colour distortion is loaders/colour.py's;
each of those docstrings says how closely it follows torchvision. Solarize is exact (invert >=
128/255); the blur is PIL's GaussianBlur (VISSL's ImgPilGaussianBlur) without its per-pass uint8
rounding, within 3/255 of PIL (loaders/blur.py).
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch

from loaders.blur import blur_half_width, blur_rows
from loaders.colour import apply_color, color_transform, draw_color_jitter, image_means
from loaders.recipe import MultiCropRecipe
from loaders.resized_crop import center_crop_boxes, crop_resize, sample_crop_boxes

SOLARIZE_THRESHOLD = 128 / 255
# CPU: rows per chunk, so that a chunk's float32 pixels take about 6 MiB (fewer, larger ops
# measured faster than 1.5-3 MiB chunks that fit the 2 MiB L2 cache better).
_CHUNK_PIXELS = 1 << 19
# CPU: output buffers kept per crop group for reuse; a training loop holds one or two batches.
_SPARE_OUTPUTS = 3


@dataclass(frozen=True)
class _GroupDraws:
    """Every random draw of one crop group's rows (n = count * batch); None: never applies."""

    boxes: torch.Tensor  # (n, 4) (x0, y0, x1, y1)
    flip: torch.Tensor  # (n,) bool
    color_matrix: torch.Tensor | None  # (n, 3, 3) colour distortion of [0, 255] pixels ...
    color_pivot: torch.Tensor | None  # (n, 3, 3) ... plus this times the mean pixel (color_transform)
    color_offset: torch.Tensor | None  # (n, 3) the offset itself, from the whole image (colour_per_image)
    blur: torch.Tensor | None  # (n,) bool
    sigma: torch.Tensor | None  # (n,) blur sigma
    solarize: torch.Tensor | None  # (n,) bool

    def rows(self, index: slice) -> _GroupDraws:
        return _GroupDraws(*(None if draw is None else draw[index] for draw in (
            self.boxes, self.flip, self.color_matrix, self.color_pivot, self.color_offset, self.blur, self.sigma,
            self.solarize)))


class DeviceMultiCrop:
    """The recipe's multi-crop augmentation for a batch of uint8 images already on the device."""

    def __init__(self, recipe: MultiCropRecipe, *, dtype: torch.dtype, device: torch.device | str):
        self.recipe = recipe
        self.dtype = dtype
        self.device = torch.device(device)
        # Normalisation of (..., 3) pixels as one multiply-add: (x - mean) / std = x * scale + shift.
        mean = torch.tensor(recipe.mean, device=self.device)
        std = torch.tensor(recipe.std, device=self.device)
        self.scale, self.shift = 1 / std, -mean / std
        # The recipe's per-crop values, (C, ...) tensors made once on the device: no host-to-device
        # copy per batch.
        crops = recipe.augmentations
        on_device = partial(torch.tensor, device=self.device)
        self.flip_p = on_device([a.flip_p for a in crops])  # (C,)
        self.jitter_p = on_device([a.jitter_p for a in crops])  # (C,)
        self.jitter_ranges = on_device([(a.brightness, a.contrast, a.saturation, a.hue) for a in crops])  # (C, 4, 2)
        self.gray_p = on_device([a.gray_p for a in crops])  # (C,)
        self.blur_p = on_device([a.blur_p for a in crops])  # (C,)
        self.blur_sigma = on_device([a.blur_sigma for a in crops])  # (C, 2)
        self.solarize_p = on_device([a.solarize_p for a in crops])  # (C,)
        # One band width for every crop: the blur of the largest sigma reaches this far.
        self.blur_half = blur_half_width(max(a.blur_sigma[1] for a in crops))
        self.colour_per_image = recipe.colour_per_image and crops[0].distorts_colour
        self._pool: ThreadPoolExecutor | None = None  # the CPU path's threads, made on first use
        self._pool_threads = 0
        self._outputs: dict[int, list[tuple[torch.Tensor, int]]] = {}  # CPU: group -> [(buffer, idle use count)]
        self._buffers = threading.local()

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, *, generator: torch.Generator) -> list[torch.Tensor]:
        """images: (B, 3, H, W) uint8, each image at the top left, padded to a common H, W
        (channels_last memory, e.g. a permuted (B, H, W, 3) buffer, is the fastest on the CPU).
        sizes: (B, 2) int valid (height, width) of each image, on the images' device.
        generator: a torch.Generator on the images' device; it alone decides every random draw.
        Returns total_num_crops tensors (B, 3, s, s) in crop order, normalised, in self.dtype,
        channels_last. On accelerators, bilinear sampling may read up to half a pixel of padding
        at the bottom and right edges of an up-scaled crop: pad by edge replication there.
        """
        recipe, batch = self.recipe, images.shape[0]
        # One (count * B, s, s, 3) buffer per group: row k*B + i is crop k of image i.
        shapes = [(count * batch, size, size, 3) for size, count in zip(recipe.size_crops, recipe.num_crops)]
        if images.device.type == "cpu":
            outputs = [self._idle_output(group, shape) for group, shape in enumerate(shapes)]
            self._apply_on_threads(images, sizes, outputs, generator=generator)
        else:
            outputs = [torch.empty(shape, dtype=self.dtype, device=images.device) for shape in shapes]
            image_colour = self._draw_image_colour(images, sizes, generator=generator)
            for group, out in enumerate(outputs):
                draw = self._draw_group(sizes, group, image_colour=image_colour, generator=generator)
                self._apply(images, draw, first_row=0, out=out, scratch=partial(_new_buffer, device=images.device))
        crops: list[torch.Tensor] = []
        for out, count in zip(outputs, recipe.num_crops):
            crops.extend(out.permute(0, 3, 1, 2).chunk(count))  # channels_last views, no copy
        return crops

    def _draw_image_colour(self, images: torch.Tensor, sizes: torch.Tensor, *, generator: torch.Generator
                           ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The colour distortion of each whole image (B rows), when the recipe draws it per image:
        (matrix (B, 3, 3) of [0, 255] pixels, offset (B, 3) in [0, 1]), else None."""
        if not self.colour_per_image:
            return None
        batch = images.shape[0]
        jitter = draw_color_jitter(self.jitter_ranges[:1].expand(batch, 4, 2), jitter_p=self.jitter_p[:1].expand(batch),
                                   gray_p=self.gray_p[:1].expand(batch), generator=generator)
        matrix, pivot = color_transform(jitter)
        offset = torch.bmm(pivot, image_means(images, sizes)[:, :, None])[..., 0]  # (B, 3) in [0, 255]
        return matrix / 255, offset / 255

    def _draw_group(self, sizes: torch.Tensor, group: int, *, image_colour, generator: torch.Generator
                    ) -> _GroupDraws:
        recipe = self.recipe
        count, batch = recipe.num_crops[group], sizes.shape[0]
        first_crop = sum(recipe.num_crops[:group])
        crop_slice = slice(first_crop, first_crop + count)
        rows = count * batch
        if recipe.center_crop:
            boxes = center_crop_boxes(sizes, resize=recipe.resize, size=recipe.size_crops[0])
        else:
            boxes = sample_crop_boxes(sizes.repeat(count, 1), scale=recipe.crop_scales[group],
                                      ratio=recipe.crop_ratio, generator=generator)
        augmentations = recipe.augmentations[crop_slice]  # Python values, for branching without a sync
        flip = _draw_per_crop(self.flip_p[crop_slice], batch, generator)
        color_matrix = color_pivot = color_offset = None
        if image_colour is not None:  # one draw per image, shared by its crops: row k*B + i is image i
            color_matrix, color_offset = image_colour[0].repeat(count, 1, 1), image_colour[1].repeat(count, 1)
        elif any(augmentation.distorts_colour for augmentation in augmentations):
            jitter = draw_color_jitter(_per_row(self.jitter_ranges[crop_slice], batch),
                                       jitter_p=_per_row(self.jitter_p[crop_slice], batch),
                                       gray_p=_per_row(self.gray_p[crop_slice], batch), generator=generator)
            matrix, pivot = color_transform(jitter)
            # The 1/255 of [0, 255] -> [0, 1] rides on the colour map: one pass for both.
            color_matrix, color_pivot = matrix / 255, pivot / 255
        blur = sigma = solarize = None
        if any(augmentation.blur_p > 0 for augmentation in augmentations):
            sigma_range = _per_row(self.blur_sigma[crop_slice], batch)  # (rows, 2)
            u = torch.rand(rows, generator=generator, device=sizes.device)
            sigma = sigma_range[:, 0] + (sigma_range[:, 1] - sigma_range[:, 0]) * u
            blur = _draw_per_crop(self.blur_p[crop_slice], batch, generator)
        if any(augmentation.solarize_p > 0 for augmentation in augmentations):
            solarize = _draw_per_crop(self.solarize_p[crop_slice], batch, generator)
        return _GroupDraws(boxes=boxes, flip=flip, color_matrix=color_matrix, color_pivot=color_pivot,
                           color_offset=color_offset, blur=blur, sigma=sigma, solarize=solarize)

    def _apply_on_threads(self, images: torch.Tensor, sizes: torch.Tensor, outputs: list[torch.Tensor], *,
                          generator: torch.Generator) -> None:
        """The CPU path: all the draws first, then the groups' rows in chunks, over
        torch.get_num_threads() threads with one intra-op thread each."""
        threads = torch.get_num_threads()

        def apply_chunk(chunk) -> None:
            draw, out, start, stop = chunk
            # A pool thread takes the intra-op thread count on its first op; set it explicitly.
            torch.set_num_threads(1)
            self._apply(images, draw.rows(slice(start, stop)), first_row=start, out=out[start:stop],
                        scratch=self._thread_buffer)

        # One intra-op thread for the draws too: their ops are tiny, and waking (and spinning on)
        # a second OpenMP/MKL thread for each costs milliseconds per op on a busy machine.
        torch.set_num_threads(1)
        try:
            chunks = []
            image_colour = self._draw_image_colour(images, sizes, generator=generator)
            for group, out in enumerate(outputs):
                draw = self._draw_group(sizes, group, image_colour=image_colour, generator=generator)
                rows, size = out.shape[0], out.shape[1]
                step = max(1, _CHUNK_PIXELS // (size * size))
                chunks += [(draw, out, start, min(rows, start + step)) for start in range(0, rows, step)]
            if self._pool is None or self._pool_threads != threads:
                self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="multicrop")
                self._pool_threads = threads
            list(self._pool.map(apply_chunk, chunks))  # re-raises a chunk's exception here
        finally:
            torch.set_num_threads(threads)

    def _idle_output(self, group: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A CPU output buffer for a crop group: one of the last _SPARE_OUTPUTS batches' once
        nothing references it any more (its crops and every view of them are gone), else a new
        one. A fresh buffer's pages are faulted in (and zeroed by the kernel) on first write:
        ~1 ms per image for 2x224 + 6x96 float32 crops, an eighth of the work."""
        if not hasattr(torch._C, "_storage_Use_Count"):  # a torch without the private call: never reuse
            return torch.empty(shape, dtype=self.dtype)
        spares = self._outputs.setdefault(group, [])
        for buffer, idle_uses in spares:
            if buffer.shape == shape and buffer.dtype == self.dtype and _storage_uses(buffer) == idle_uses:
                return buffer
        buffer = torch.empty(shape, dtype=self.dtype)
        spares.append((buffer, _storage_uses(buffer)))
        del spares[:-_SPARE_OUTPUTS]
        return buffer

    def _thread_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU buffer of this thread's, reused from chunk to chunk and batch to batch: a freed
        multi-MiB allocation goes back to the OS, and the next one is page-faulted in afresh."""
        buffers = self._buffers.__dict__
        numel = math.prod(shape)
        if name not in buffers or buffers[name].numel() < numel or buffers[name].dtype != dtype:
            buffers[name] = torch.empty(numel, dtype=dtype)
        return buffers[name][:numel].view(shape)

    def _apply(self, images: torch.Tensor, draw: _GroupDraws, *, first_row: int, out: torch.Tensor,
               scratch) -> None:
        """Crop, colour, blur, solarize and normalise rows first_row.. of a group into out (n, s, s, 3).
        scratch(name, shape, dtype): a buffer for intermediate values."""
        rows, size = out.shape[0], out.shape[1]
        image_index = torch.arange(first_row, first_row + rows, device=images.device) % images.shape[0]
        x = crop_resize(images, draw.boxes, image_index=image_index, flip=draw.flip, size=size,
                        interpolation=self.recipe.interpolation)
        pixels = x.permute(0, 2, 3, 1).reshape(rows, size * size, 3)  # (n, P, 3) in [0, 255]
        if pixels.dtype != torch.float32:  # the CPU's uint8 crops
            pixels = scratch("pixels", pixels.shape, torch.float32).copy_(pixels)
        # The [0, 1] pixels go straight to the output buffer where it is float32, and are
        # normalised there in place.
        work = out.view(rows, -1, 3) if out.dtype == torch.float32 else scratch("work", pixels.shape, torch.float32)
        if draw.color_matrix is None:
            torch.div(pixels, 255, out=work)
        else:
            offset = draw.color_offset
            if offset is None:  # contrast pivots at the crop's own mean grey
                offset = torch.bmm(draw.color_pivot, _mean_pixel(pixels)[:, :, None])[..., 0]  # (n, 3)
            apply_color(pixels, draw.color_matrix, offset, out=work).clamp_(0, 1)
        hwc = work.view(rows, size, size, 3)
        if draw.blur is not None:
            hwc = blur_rows(hwc, blur=draw.blur, sigma=draw.sigma, half=self.blur_half, scratch=scratch)
        if draw.solarize is not None:
            hwc = torch.where(draw.solarize.view(rows, 1, 1, 1), solarize(hwc), hwc)
        # With the channels repeated 16 times, the innermost dimension is 48 wide, not 3: the
        # multiply-add vectorises (4x faster on the CPU). It casts to out's dtype on the way.
        lanes = 3 * math.gcd(size * size, 16)
        torch.addcmul(self.shift.repeat(lanes // 3), hwc.reshape(-1, lanes), self.scale.repeat(lanes // 3),
                      out=out.view(-1, lanes))


def _mean_pixel(pixels: torch.Tensor) -> torch.Tensor:
    """(n, 3) mean of pixels (n, P, 3): summed as rows of 16 pixels (48 wide, vectorised), not 3."""
    rows, num_pixels, _ = pixels.shape
    k = math.gcd(num_pixels, 16)
    return pixels.view(rows, num_pixels // k, 3 * k).sum(dim=1).view(rows, k, 3).sum(dim=1) / num_pixels


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Invert values >= 128/255 (PIL's ImageOps.solarize on the uint8 image). x in [0, 1]."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)


def _storage_uses(tensor: torch.Tensor) -> int:
    """How many tensors (views included) share tensor's memory, plus a constant. The private
    call is the one torch's own CUDA-graph trees use to see whether an output is still alive."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def _new_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, *, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _per_row(per_crop: torch.Tensor, batch: int) -> torch.Tensor:
    """A group's per-crop values (count, ...) -> per row (count * batch, ...): row k*batch + i is crop k."""
    return per_crop.repeat_interleave(batch, dim=0)


def _draw_per_crop(p: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(len(p) * batch,) bool: rows k*batch .. (k+1)*batch - 1 True with probability p[k]."""
    probability = _per_row(p, batch)
    return torch.rand(probability.shape[0], generator=generator, device=p.device) < probability
