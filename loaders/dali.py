"""The DALI backend: an image folder (or a file list) -> multi-crop Batches, in a DALI pipeline.

Per sample, fn.readers.file reads the encoded bytes, fn.decoders.image decodes them ONCE
(device='mixed': nvJPEG / the hardware JPEG decoder on a GPU; 'cpu': libjpeg-turbo), and
every crop is cut from that one decoded image: fn.random_resized_crop (bilinear or bicubic, the
recipe's interpolation; fn.resize + fn.crop for Resize + CenterCrop), colour jitter and
grayscale as one affine colour map per crop (fn.coord_transform, see below), PIL's Gaussian
blur (VISSL's ImgPilGaussianBlur) as PIL computes it, three extended-box fn.filter passes per
axis with edge replication and uint8 output each (loaders/blur.py), solarize as arithmetic,
then fn.crop_mirror_normalize (flip + normalise + cast) writing HWC. A (B, H, W, 3) tensor viewed
as (B, 3, H, W) is exactly channels_last, so the hand-over to torch costs nothing.

Without a GPU (device 'cpu') the same pipeline runs with device_id=None and CPU operators.

The reader's "label" is the dataset index; the real labels live in a side table on the
device, so indices travel with the samples through any shuffling. The order is the reference
loader's (loaders.sampler.EpochBatchSampler, one permutation per epoch from (seed, epoch),
rank r takes positions r, r + W, ...): each epoch builds the reader over this rank's files in
that order, so the shard is chosen here rather than by the reader's shard_id/num_shards, and
set_epoch(epoch, start_batch) resumes exactly.

Bad input: DALI stops the whole pipeline on an undecodable file, so the file list is checked
first (loaders.images.check_images: a parallel PIL decode, JPEGs at 1/8 scale, formats DALI
cannot decode rejected); skipped files are logged once with their names. This costs about
one reduced decode per image at build time. A file that becomes unreadable after that check
(replaced mid-run) stops the pipeline: the loader then checks the rest of the epoch's files,
replaces each bad one by the next readable sample (as the reference loader does), counts it in
`skipped`, and rebuilds the pipeline at the batch that failed; nothing already yielded changes.

Colour: the batched augmentations' colour model (loaders.colour), not fn.color_twist. DALI's
colour ops run brightness, contrast, saturation and hue in one fixed order with contrast
pivoting at mid-grey (128), where torchvision's ColorJitter draws a random order per crop and
pivots at the crop's mean grey: on dark images (a light shape on a dark ground) a contrast
factor below 1 then lifts the background to a grey that torchvision never makes. So the colour
draws are made on the host by loaders.colour (draw_color_jitter: torchvision's ranges, random
op order, jitter and grayscale probabilities; color_transform: their composition into one 3x3
matrix M plus a pivot matrix P applied to the crop's mean colour), one row per crop of each
sample, from a generator seeded by (pipeline seed, iteration), and fed to the graph through
fn.external_source; the graph applies clamp(M @ rgb + P @ mean_rgb, 0, 255) per pixel with
fn.coord_transform and rounds to uint8 (as PIL's ops do). Where the colour stage precedes the
crop (recipe.colour_per_image), the image draws once, its crops share the map and the pivot is
the whole image's mean colour. What remains different from torchvision is loaders.colour's own,
documented there: hue as a rotation about the grey axis and one final clamp.

Tuning arguments of build_dali_loader (their defaults live in its signature):
  prefetch_queue_depth  batches the pipeline prepares ahead (DALI's prefetch_queue_depth).
  device_memory_padding, host_memory_padding  the mixed decoder's nvJPEG buffer padding, in
      bytes, so buffers are not re-allocated as image sizes grow (GPU only).
  preallocate_device_bytes, preallocate_pinned_bytes  grow DALI's device and pinned memory
      pools once up front (nvidia.dali.backend.PreallocateDeviceMemory / PinnedMemory), 0: lazily.
  hw_decoder_load  share of JPEGs sent to the A100/H100 hardware decoder (GPU only).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from loaders.batch import Batch
from loaders.images import ImageList, check_images, list_samples, why_unreadable
from loaders.blur import blur_half_width
from loaders.colour import color_transform, draw_color_jitter
from loaders.recipe import CropAugmentation, MultiCropRecipe
from loaders.sampler import EpochBatchSampler
from loaders.sources import resolve_image_folder

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dali_math
    import nvidia.dali.types as types
    from nvidia.dali import backend as dali_backend
    from nvidia.dali.pipeline import Pipeline
except ImportError:
    DALI_IMPORT_ERROR = "the DALI backend needs `pip install fastssl[dali]` (nvidia-dali-cuda120)"
else:
    DALI_IMPORT_ERROR = None

log = logging.getLogger(__name__)

# What DALI's image decoder reads, in PIL's format names (no GIF).
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"})


def multicrop_pipeline(
    *, files: list[str], dataset_indices: list[int], recipe: MultiCropRecipe, batch_size: int, num_threads: int,
    device_id: int | None, seed: int, half_output: bool, prefetch_queue_depth: int,
    device_memory_padding: int, host_memory_padding: int, hw_decoder_load: float,
):
    """A built DALI pipeline over `files` in the given order (one pass, the last batch padded).

    Outputs: total_num_crops (B, s, s, 3) float32/float16 normalised crops in crop order, then
    (B, 1) int32 dataset indices.
    """
    gpu = device_id is not None
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=prefetch_queue_depth)
    with pipe:
        encoded, indices = fn.readers.file(
            files=files, labels=dataset_indices, random_shuffle=False, pad_last_batch=True, name="Reader"
        )
        if gpu:
            images = fn.decoders.image(
                encoded, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                device_memory_padding=device_memory_padding, host_memory_padding=host_memory_padding,
            )
        else:
            images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        crops = []
        interp_type = types.INTERP_CUBIC if recipe.interpolation == "bicubic" else types.INTERP_LINEAR
        # The colour maps of every crop that distorts colour (one for the image where the colour
        # stage precedes the crop), drawn on the host (ColourDraws) and fed per iteration.
        colour_draws = ColourDraws(recipe, batch_size=batch_size, seed=seed)
        maps = fn.external_source(source=colour_draws, num_outputs=2 * colour_draws.num_maps, batch=True,
                                  batch_info=True) if colour_draws.num_maps else []
        maps = [(maps[2 * k], maps[2 * k + 1]) for k in range(colour_draws.num_maps)]
        image_colour = None
        if recipe.colour_per_image and colour_draws.num_maps:
            image_colour = (*maps[0], _mean_colour(images))  # the whole image's mean: the contrast pivot
        blur_half = blur_half_width(max(a.blur_sigma[1] for a in recipe.augmentations))
        for crop, (size, group) in enumerate(zip(recipe.crop_sizes, recipe.crop_groups)):
            # Every crop reads the one decoded image: decode once, crop many.
            if recipe.center_crop:
                x = images if recipe.resize is None else fn.resize(
                    images, resize_shorter=recipe.resize, interp_type=interp_type, antialias=True)
                x = fn.crop(x, crop=(size, size))  # the centre by default
            else:
                x = fn.random_resized_crop(
                    images, size=(size, size), random_area=list(recipe.crop_scales[group]),
                    random_aspect_ratio=list(recipe.crop_ratio), num_attempts=10, antialias=True,
                    interp_type=interp_type,
                )
            augmentation = recipe.augmentations[crop]
            colour = image_colour
            if colour is None and colour_draws.map_of_crop[crop] is not None:
                matrix, pivot = maps[colour_draws.map_of_crop[crop]]
                colour = (matrix, pivot, _mean_colour(x))  # the crop's own mean: the contrast pivot
            x = _augment(x, augmentation=augmentation, colour=colour, blur_half=blur_half)
            crops.append(
                fn.crop_mirror_normalize(
                    x, mirror=fn.random.coin_flip(probability=augmentation.flip_p),
                    mean=[255 * m for m in recipe.mean], std=[255 * s for s in recipe.std],
                    dtype=types.FLOAT16 if half_output else types.FLOAT, output_layout="HWC",
                )
            )
        pipe.set_outputs(*crops, indices)
    pipe.build()
    return pipe


class ColourDraws:
    """fn.external_source's callback: the colour maps of one batch, drawn on the host.

    Per colour map (one per crop that distorts colour, or one per image where the colour stage
    precedes the crop), two outputs: the matrices M and P (batch_size arrays of (3, 3) float32)
    of loaders.colour.color_transform, so that a crop's colour is clamp(M @ rgb + P @ mean_rgb).
    The draws of iteration i come from a torch.Generator seeded by (seed, i): a pure function of
    the pipeline's seed and the batch, whatever DALI's prefetching does.
    """

    def __init__(self, recipe: MultiCropRecipe, *, batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed
        if recipe.colour_per_image:
            drawn = [0] if recipe.augmentations[0].distorts_colour else []
            self.map_of_crop = [0 if drawn else None] * recipe.total_num_crops
        else:
            drawn = [c for c, a in enumerate(recipe.augmentations) if a.distorts_colour]
            self.map_of_crop = [drawn.index(c) if c in drawn else None for c in range(recipe.total_num_crops)]
        self.augmentations = [recipe.augmentations[c] for c in drawn]
        self.num_maps = len(drawn)

    def __call__(self, batch_info) -> list[list[np.ndarray]]:
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, batch_info.iteration]).generate_state(1, np.uint64)[0] >> 1))
        outputs = []
        for augmentation in self.augmentations:
            outputs += [list(m.numpy()) for m in colour_maps(augmentation, self.batch_size, generator=generator)]
        return outputs


def colour_maps(augmentation: CropAugmentation, rows: int, *, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` random colour distortions of one crop's augmentation (torchvision's ColorJitter, then
    RandomGrayscale) as loaders.colour's affine maps: (M, P), each (rows, 3, 3) float32."""
    ranges = torch.tensor([augmentation.brightness, augmentation.contrast, augmentation.saturation,
                           augmentation.hue]).expand(rows, 4, 2)
    draws = draw_color_jitter(ranges, jitter_p=torch.full((rows,), augmentation.jitter_p),
                              gray_p=torch.full((rows,), augmentation.gray_p), generator=generator)
    matrix, pivot = color_transform(draws)
    return matrix.float().contiguous(), pivot.float().contiguous()


def _mean_colour(x):
    """The (1, 1, 3) mean colour of each HWC image (a DALI graph node), in [0, 255]."""
    return fn.reductions.mean(fn.cast(x, dtype=types.FLOAT), axes=[0, 1], keep_dims=True)


def apply_colour_map(x, matrix, pivot, mean):
    """clamp(matrix @ rgb + pivot @ mean, 0, 255) for every pixel of HWC uint8 images x, rounded
    to uint8 (DALI graph nodes; matrix, pivot: per-sample (3, 3), mean: per-sample (1, 1, 3))."""
    distorted = fn.coord_transform(x, M=matrix, dtype=types.FLOAT) + fn.coord_transform(mean, M=pivot)
    return fn.cast(dali_math.clamp(distorted, 0.0, 255.0), dtype=types.UINT8)


def _augment(x, *, augmentation: CropAugmentation, colour: tuple | None, blur_half: int):
    """Colour jitter and grayscale, blur and solarize of one crop (DALI graph nodes). colour:
    (matrix, pivot, mean colour) of the crop's colour map, or None where its colour is untouched."""
    if colour is not None:
        x = apply_colour_map(x, *colour)
    if augmentation.blur_p > 0:
        x = _random_pil_blur(x, p=augmentation.blur_p, sigma_range=augmentation.blur_sigma, half=blur_half)
    if augmentation.solarize_p > 0:
        solarized = fn.random.coin_flip(probability=augmentation.solarize_p)
        x = fn.cast(x, dtype=types.FLOAT)
        x = x + solarized * (x >= 128) * (255.0 - 2.0 * x)
    return x


def _random_pil_blur(x, *, p: float, sigma_range: tuple[float, float], half: int):
    """PIL's GaussianBlur (VISSL's ImgPilGaussianBlur) with a random sigma, applied with
    probability p: three passes of PIL's extended box filter along each axis, edges replicated,
    each pass rounded to uint8 as PIL's are, with PIL's fixed-point weights (loaders/blur.py gives
    the box's radius). Measured within 2/255 of PIL (1/255 but at exact rounding ties).

    fn.filter passes with a per-sample 1-D kernel: on the CPU, fn.gaussian_blur costs ~25 ms
    per 224 px crop here, the filters almost nothing. An unblurred sample gets the identity
    kernel (a centred delta), so no per-sample branching is needed.
    """
    reach = half // 3  # one box's reach: floor(radius) + 1 of the largest sigma
    distance = types.Constant(np.abs(np.arange(-reach, reach + 1)).astype(np.float32))
    low, high = sigma_range
    sigma = fn.random.uniform(range=[low, high]) if high > low else fn.random.uniform(values=[low])  # a graph node
    variance = sigma * sigma / 3.0  # Gwosdek et al. 2011, eqs. 7, 11, 14, as Pillow's BoxBlur.c
    whole = dali_math.floor((dali_math.sqrt(12.0 * variance + 1.0) - 1.0) / 2.0)
    radius = whole + (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * variance) / (
        6.0 * (variance - (whole + 1.0) * (whole + 1.0)))
    # PIL's fixed-point weights (multiples of 2^-24, exact in float32): ww for the 2 floor(r) + 1
    # inner taps, fw for the two far ones, summing to 1.
    one = float(1 << 24)
    inner = dali_math.floor(one / (2.0 * radius + 1.0))
    far = dali_math.floor((one - (2.0 * whole + 1.0) * inner) / 2.0)
    weights = (fn.cast(distance <= whole, dtype=types.FLOAT) * inner
               + fn.cast(distance == whole + 1.0, dtype=types.FLOAT) * far) / one
    delta = types.Constant((np.arange(-reach, reach + 1) == 0).astype(np.float32))
    blurred = fn.random.coin_flip(probability=p)
    weights = blurred * weights + (1 - blurred) * delta
    for shape in ([1, 2 * reach + 1], [2 * reach + 1, 1]):
        for _ in range(3):
            x = fn.filter(x, fn.reshape(weights, shape=shape), border="clamp")
    return x


class DALITrainLoader:
    """Iterates Batches of one rank; set_epoch(epoch, start_batch) before each epoch."""

    def __init__(self, *, images: ImageList, sampler: EpochBatchSampler, labels: torch.Tensor | None,
                 pipeline_args: dict, device: torch.device, dtype: torch.dtype, channels_last: bool):
        self.images = images
        self.sampler = sampler
        self.labels = labels  # (max dataset index + 1,) int64 on the device, or None
        self.pipeline_args = pipeline_args
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.num_samples = len(images)
        self.epoch, self.start_batch = 0, 0
        self.unreadable: set[int] = set()   # positions whose file failed to decode after the build-time check
        self.skipped: dict[str, int] = {}   # {path: times found unreadable}, as the reference loader counts

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        self.sampler.set_epoch(self.epoch, 0)
        batch_size = self.sampler.batch_size
        positions = self._readable(self.sampler.rank_indices())
        batch = self.start_batch
        while batch * batch_size < len(positions):
            try:
                for item in self._run_epoch(positions[batch * batch_size:], start_batch=batch):
                    yield item
                    batch += 1
            except RuntimeError as error:  # DALI stops on a file it cannot decode
                replaced = self._skip_unreadable(positions[batch * batch_size:])
                if not replaced:
                    raise
                positions = self._readable(positions)
        self.epoch, self.start_batch = self.epoch + 1, 0

    def _readable(self, positions: np.ndarray) -> np.ndarray:
        """``positions`` with each known-unreadable one replaced by the next readable sample (wrapping)."""
        out = np.array(positions, copy=True)
        for i, position in enumerate(out):
            candidate = int(position)
            while candidate in self.unreadable:
                candidate = (candidate + 1) % len(self.images)
            out[i] = candidate
        return out

    def _skip_unreadable(self, positions: np.ndarray) -> int:
        """Check the files at ``positions`` (and the replacements), log and count the unreadable ones."""
        found = 0
        for position in dict.fromkeys(int(p) for p in positions):
            candidate = position
            while candidate not in self.unreadable and why_unreadable(self.images.paths[candidate], DALI_FORMATS):
                path = self.images.paths[candidate]
                log.warning("skipping an unreadable image (replaced by the next readable one): %s", path)
                self.skipped[path] = self.skipped.get(path, 0) + 1
                self.unreadable.add(candidate)
                found += 1
                if len(self.unreadable) == len(self.images):
                    raise ValueError(f"DALI loader: not one of {len(self.images)} files can be decoded any more")
                candidate = (candidate + 1) % len(self.images)
        return found

    def _run_epoch(self, positions: np.ndarray, *, start_batch: int):
        batch_size = self.sampler.batch_size
        pipe = multicrop_pipeline(
            files=[self.images.paths[p] for p in positions],
            dataset_indices=[int(self.images.indices[p]) for p in positions],
            # One augmentation stream per (seed, epoch, rank, start): a resumed epoch differs only
            # in its random draws, never in its samples.
            seed=int(np.random.SeedSequence([self.pipeline_args["seed"], self.epoch, self.sampler.rank,
                                             start_batch]).generate_state(1)[0] >> 1),
            **{k: v for k, v in self.pipeline_args.items() if k != "seed"},
        )
        try:
            for start in range(0, len(positions), batch_size):
                *crops, indices = pipe.run()
                count = min(batch_size, len(positions) - start)  # the reader pads the last batch
                indices = _to_torch(indices, self.device)[:count].view(-1).long()
                crops = [self._as_nchw(_to_torch(crop, self.device)[:count]) for crop in crops]
                yield Batch(crops=crops, indices=indices, labels=None if self.labels is None else self.labels[indices])
        finally:
            del pipe

    def _as_nchw(self, crop: torch.Tensor) -> torch.Tensor:
        # (B, H, W, 3) -> (B, 3, H, W) is a view with channels_last strides.
        crop = crop.permute(0, 3, 1, 2).to(self.dtype)
        return crop if self.channels_last else crop.contiguous()


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A DALI TensorList of uniform shape -> a torch tensor on `device` (one copy)."""
    dense = tensor_list.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(dense)).to(device)


def build_dali_loader(
    *, source: str, data_path: str | None, backend: str, recipe: MultiCropRecipe, batch_size: int, num_workers: int,
    drop_last: bool, data_limit: int, seed: int, rank: int, world_size: int, device: torch.device | str,
    dtype: torch.dtype, channels_last: bool = True, synthetic_params: dict | None = None,
    prefetch_queue_depth: int = 2, device_memory_padding: int = 16 << 20, host_memory_padding: int = 8 << 20,
    preallocate_device_bytes: int = 0, preallocate_pinned_bytes: int = 0, hw_decoder_load: float = 0.65,
) -> DALITrainLoader:
    """The DALI training loader of one rank (see the module docstring for the tuning arguments).

    source 'disk_folder' (data_path: an image folder or a "path label" file list) or 'synthetic'.
    num_workers: DALI's CPU threads. device 'cuda[:n]': mixed decode and GPU crops on GPU n;
    'cpu': the CPU pipeline.
    """
    if DALI_IMPORT_ERROR is not None:
        raise ImportError(DALI_IMPORT_ERROR)
    device = torch.device(device)
    device_id = (device.index or 0) if device.type == "cuda" else None
    if device_id is not None:
        if preallocate_device_bytes:
            dali_backend.PreallocateDeviceMemory(preallocate_device_bytes, device_id)
        if preallocate_pinned_bytes:
            dali_backend.PreallocatePinnedMemory(preallocate_pinned_bytes)
    folder = resolve_image_folder(source=source, data_path=data_path, split="train", synthetic_params=synthetic_params)
    images = check_images(list_samples(folder, data_limit=data_limit), num_workers=max(1, num_workers),
                          progress=False, formats=DALI_FORMATS)
    labels = None
    if images.has_labels:
        table = torch.full((int(images.indices.max()) + 1,), -1, dtype=torch.int64)
        table[torch.from_numpy(images.indices)] = torch.from_numpy(images.labels)
        labels = table.to(device)
    sampler = EpochBatchSampler(len(images), batch_size=batch_size, drop_last=drop_last, shuffle=True,
                                seed=seed, rank=rank, world_size=world_size)
    pipeline_args = dict(
        recipe=recipe, batch_size=batch_size, num_threads=max(1, num_workers), device_id=device_id, seed=seed,
        half_output=dtype == torch.float16, prefetch_queue_depth=prefetch_queue_depth,
        device_memory_padding=device_memory_padding, host_memory_padding=host_memory_padding,
        hw_decoder_load=hw_decoder_load,
    )
    return DALITrainLoader(images=images, sampler=sampler, labels=labels, pipeline_args=pipeline_args,
                           device=device, dtype=dtype, channels_last=channels_last)
