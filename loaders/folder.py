"""The torchvision reference loader (an image folder, per-sample PIL crops in DataLoader workers)
and the evaluation loader (one centre crop per sample, in dataset order, one shard per rank).

The classic design (SwAV's MultiCropDataset): each sample is decoded with PIL and every crop
runs torchvision's functional ops with parameters drawn from a random.Random seeded from
(seed, epoch, dataset index). So a sample's crops depend on nothing else (not the worker
count, not the process state), and resuming a checkpoint mid-epoch replays exactly.

The blur is VISSL's own op, PIL's ImageFilter.GaussianBlur(radius=sigma) (ImgPilGaussianBlur).
Solarize inverts the pixels at or above a fixed threshold of 128: the BYOL paper's (table 6: x -> 1 - x
where x >= 0.5) and DeepMind's, not VISSL's ImgPilRandomSolarize, which draws the threshold at random.
A colour stage listed before the crop (recipe.colour_per_image) jitters the whole image once, then the
crops are cut from it.

Bad files never stop training: a file that fails to decode is replaced by the next readable
index, and the failed path travels back with the sample so the main process counts it and logs
it once (worker processes cannot share a counter).
"""
from __future__ import annotations

import logging
import math
import random
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

from loaders.batch import Batch
from loaders.images import UnreadableImage, list_images, load_rgb
from loaders.recipe import CropAugmentation, MultiCropRecipe
from loaders.sampler import EpochBatchSampler, shard_of
from loaders.sources import resolve_image_folder

log = logging.getLogger(__name__)


class ImageFiles:
    """The files of an image folder with lazy, fault-tolerant decoding."""

    def __init__(self, root: str | Path, *, data_limit: int):
        self.root = str(root)
        self.paths, self.labels, self.classes = list_images(root, data_limit=data_limit)
        self._unreadable: set[int] = set()  # per process: known-bad files are not decoded twice

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        return bool(self.classes)

    def load(self, index: int) -> tuple[Image.Image, int, tuple[str, ...]]:
        """The image at index, or at the next readable index (wrapping around).

        Returns (RGB image, the index actually used, (path at index,) if that file failed else ()).
        Other bad files met on the way are reported when their own index is asked for, so each
        bad file counts once per epoch.
        """
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            if candidate in self._unreadable:
                continue
            try:
                image = load_rgb(self.paths[candidate])
            except UnreadableImage:
                self._unreadable.add(candidate)
                continue
            return image, candidate, (self.paths[index],) if candidate != index else ()
        raise ValueError(f"image folder {self.root}: not one of {len(self.paths)} files could be decoded")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one sample's augmentation, a pure function of its three arguments."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


class MultiCropFolder(torch.utils.data.Dataset):
    """Items are keyed by (dataset index, epoch) so the epoch reaches persistent workers.

    Returns (crops: list of (3, s, s) float32 normalised, in crop order; index used; label;
    paths that failed to decode and were replaced).
    """

    def __init__(self, root: str | Path, *, recipe: MultiCropRecipe, seed: int, data_limit: int):
        self.files = ImageFiles(root, data_limit=data_limit)
        self.recipe = recipe
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int, int, tuple[str, ...]]:
        index, epoch = key
        image, used, failed = self.files.load(index)
        rng = random.Random(sample_seed(self.seed, epoch, index))
        if self.recipe.colour_per_image:  # listed before the crop: the whole image, one draw
            image = distort_colour(image, augmentation=self.recipe.augmentations[0], rng=rng)
        crops = [augment_crop(image, crop=c, recipe=self.recipe, rng=rng) for c in range(self.recipe.total_num_crops)]
        return crops, used, self.files.labels[used], failed


class CenterCropFolder(torch.utils.data.Dataset):
    """Evaluation items: resize the short side to resize_size (None: image_size / 0.875, the
    standard ImageNet evaluation ratio, 256 -> 224), centre-crop image_size. Same item layout as
    MultiCropFolder."""

    def __init__(self, root: str | Path, *, image_size: int, mean, std, data_limit: int,
                 resize_size: int | None = None):
        self.files = ImageFiles(root, data_limit=data_limit)
        self.image_size = image_size
        self.resize = resize_size or round(image_size / 0.875)
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int, int, tuple[str, ...]]:
        index, _ = key
        image, used, failed = self.files.load(index)
        image = TF.resize(image, self.resize, InterpolationMode.BILINEAR, antialias=True)
        image = TF.center_crop(image, self.image_size)
        pixels = np.asarray(image, dtype=np.float32) / 255
        return [to_normalized_tensor(pixels, mean=self.mean, std=self.std)], used, self.files.labels[used], failed


def sample_crop_params(
    height: int, width: int, *, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, h, w): area fraction in scale, log-uniform aspect w / h in
    ratio; the first of 10 draws that fits, else a central crop at the nearest allowed ratio."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    w = round(height * ratio[1]) if in_ratio > ratio[1] else width
    h = round(width / ratio[0]) if in_ratio < ratio[0] else height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_crop(image: Image.Image, *, crop: int, recipe: MultiCropRecipe, rng: random.Random) -> torch.Tensor:
    """Crop number `crop` of the recipe from a PIL RGB image -> (3, s, s) float32 normalised."""
    group = recipe.crop_groups[crop]
    size = recipe.size_crops[group]
    interpolation = InterpolationMode(recipe.interpolation)
    if recipe.center_crop:
        out = TF.resize(image, recipe.resize, interpolation, antialias=True) if recipe.resize else image
        out = TF.center_crop(out, size)
    else:
        top, left, h, w = sample_crop_params(
            image.height, image.width, scale=recipe.crop_scales[group], ratio=recipe.crop_ratio, rng=rng
        )
        out = TF.resized_crop(image, top, left, h, w, [size, size], interpolation, antialias=True)
    augmentation = recipe.augmentations[crop]
    if rng.random() < augmentation.flip_p:
        out = TF.hflip(out)
    if augmentation.distorts_colour and not recipe.colour_per_image:
        out = distort_colour(out, augmentation=augmentation, rng=rng)
    if rng.random() < augmentation.blur_p:
        out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*augmentation.blur_sigma)))  # VISSL's op
    # From here on numpy, not torch: torch's intra-op threads cost far more than they save on
    # one small crop, and in the main process (num_workers=0) they fight the training step.
    pixels = np.asarray(out, dtype=np.float32) / 255  # (s, s, 3)
    if rng.random() < augmentation.solarize_p:
        pixels = np.where(pixels >= 128 / 255, 1 - pixels, pixels)  # the paper's fixed threshold (see above)
    return to_normalized_tensor(pixels, mean=recipe.mean, std=recipe.std)


def distort_colour(image: Image.Image, *, augmentation: CropAugmentation, rng: random.Random) -> Image.Image:
    """The colour stage: the jitter with probability jitter_p, then grayscale with gray_p."""
    if rng.random() < augmentation.jitter_p:
        image = _color_jitter(image, augmentation=augmentation, rng=rng)
    if rng.random() < augmentation.gray_p:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return image


def to_normalized_tensor(pixels: np.ndarray, *, mean, std) -> torch.Tensor:
    """(H, W, 3) float32 in [0, 1] -> (3, H, W) float32 tensor, (x - mean) / std per channel."""
    normalized = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))


def _color_jitter(image: Image.Image, *, augmentation: CropAugmentation, rng: random.Random) -> Image.Image:
    """torchvision's ColorJitter with the augmentation's ranges: the four ops in a random order."""
    ranges = (augmentation.brightness, augmentation.contrast, augmentation.saturation, augmentation.hue)
    brightness, contrast, saturation, hue = (rng.uniform(low, high) for low, high in ranges)
    ops = [
        lambda im: TF.adjust_brightness(im, brightness),
        lambda im: TF.adjust_contrast(im, contrast),
        lambda im: TF.adjust_saturation(im, saturation),
        lambda im: TF.adjust_hue(im, hue),
    ]
    rng.shuffle(ops)
    for op in ops:
        image = op(image)
    return image


class FolderLoader:
    """Batches on the device from a DataLoader over (index, epoch) keys of a folder dataset.

    num_samples: dataset size after DATA_LIMIT. len(): batches of one pass on this rank.
    skipped: {path: times replaced} of files that failed to decode (each logged once).
    """

    def __init__(
        self,
        *,
        dataset: MultiCropFolder | CenterCropFolder,
        batch_sampler: torch.utils.data.Sampler | list[list[tuple[int, int]]],
        num_workers: int,
        device: torch.device,
        dtype: torch.dtype,
        channels_last: bool,
    ):
        self.batch_sampler = batch_sampler
        self.num_samples = len(dataset)
        self.device, self.dtype = device, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.has_labels = dataset.files.has_labels
        self.skipped: dict[str, int] = {}
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            collate_fn=collate_crops,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            worker_init_fn=_ignore_sigterm,
        )

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        try:
            for crops, indices, labels, failed in self.loader:
                for path in failed:
                    if path not in self.skipped:
                        log.warning("skipping an unreadable image (replaced by the next readable one): %s", path)
                    self.skipped[path] = self.skipped.get(path, 0) + 1
                yield Batch(
                    crops=[self._to_device(crop) for crop in crops],
                    indices=indices.to(self.device, non_blocking=True),
                    labels=labels.to(self.device, non_blocking=True) if self.has_labels else None,
                )
        except Exception as error:
            # The persistent workers ignore SIGTERM (_ignore_sigterm), which is how multiprocessing's exit handler
            # ends them: left alive, the process would hang at exit after printing the error. End them now.
            self.close()
            raise _worker_error(error) from None

    def close(self) -> None:
        """End the DataLoader's worker processes (torch's own shutdown: each is told to exit and joined)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def _to_device(self, crop: torch.Tensor) -> torch.Tensor:
        # Copy float32 from pinned memory, then convert on the device (fast there, slow on the host).
        crop = crop.to(self.device, non_blocking=True)
        return crop.to(dtype=self.dtype).contiguous(memory_format=self.memory_format)


class FolderTrainLoader(FolderLoader):
    """The multi-crop training loader of one rank (the torchvision reference backend).
    set_epoch(epoch, start_batch) reproduces an epoch's batches exactly from any batch on."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (its permutation and augmentations) and the batch to start from."""
        self.batch_sampler.set_epoch(epoch, start_batch)


class EvalLoader(FolderLoader):
    """One centre crop per sample of this rank's shard (loaders.sampler.shard_of), in dataset
    order, nothing dropped or repeated. Batch.indices are global dataset indices, so the ranks'
    results gathered in rank order (or placed by index) are in dataset order.

    num_samples: the whole dataset's size (all ranks); shard: this rank's dataset indices.
    """

    def __init__(self, *, shard: range, **loader_args):
        super().__init__(**loader_args)
        self.shard = shard

    @property
    def paths(self) -> list[str]:
        """The image path of every dataset index (all ranks'), in dataset order."""
        return self.loader.dataset.files.paths


def collate_crops(samples: list[tuple]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[str]]:
    """Stack each crop position: [(crops, index, label, failed paths)] -> ([(B, 3, s, s)] per
    crop, (B,) int64 indices, (B,) int64 labels, failed paths of the batch)."""
    crops = [torch.stack(position) for position in zip(*(sample[0] for sample in samples))]
    indices = torch.tensor([sample[1] for sample in samples], dtype=torch.int64)
    labels = torch.tensor([sample[2] for sample in samples], dtype=torch.int64)
    failed = [path for sample in samples for path in sample[3]]
    return crops, indices, labels, failed


def _worker_error(error: Exception) -> Exception:
    """The error a DataLoader worker raised, as its own one-line message: torch re-raises it in the trainer as
    "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback ...\nValueError: <message>"."""
    lines = str(error).strip().splitlines()
    if len(lines) < 2 or not (lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]):
        return error
    prefix = f"{type(error).__name__}: "
    message = lines[-1][len(prefix):] if lines[-1].startswith(prefix) else lines[-1]
    try:
        return type(error)(message)
    except Exception:  # an exception type whose constructor takes something else than a message
        return error


def _ignore_sigterm(worker_id: int) -> None:
    """SLURM preemption signals every process: the workers leave the stop to the trainer, which
    checkpoints at the next step boundary and then shuts them down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_folder_loader(
    *, source: str, data_path: str | None, recipe: MultiCropRecipe, batch_size: int, num_workers: int,
    drop_last: bool, data_limit: int, seed: int, rank: int, world_size: int, device: torch.device | str,
    dtype: torch.dtype, channels_last: bool, synthetic_params: dict[str, Any] | None,
) -> FolderTrainLoader:
    """The torchvision training loader of one rank: per-sample PIL crops in DataLoader workers,
    in the order of loaders.sampler.EpochBatchSampler."""
    folder = resolve_image_folder(source=source, data_path=data_path, split="train", synthetic_params=synthetic_params)
    dataset = MultiCropFolder(folder, recipe=recipe, seed=seed, data_limit=data_limit)
    sampler = EpochBatchSampler(len(dataset), batch_size=batch_size, drop_last=drop_last, shuffle=True, seed=seed,
                                rank=rank, world_size=world_size)
    return FolderTrainLoader(dataset=dataset, batch_sampler=sampler, num_workers=num_workers,
                             device=torch.device(device), dtype=dtype, channels_last=channels_last)


def build_eval_folder_loader(
    *, source: str, data_path: str | None, split: str, image_size: int, batch_size: int, num_workers: int,
    data_limit: int, device: torch.device | str, dtype: torch.dtype, synthetic_params: dict[str, Any] | None,
    mean: tuple[float, float, float], std: tuple[float, float, float], rank: int, world_size: int,
    resize_size: int | None, start_batch: int, max_samples: int = 0,
) -> EvalLoader:
    """The evaluation loader of one rank (see EvalLoader). max_samples > 0: at most that many samples, evenly
    spaced over the dataset order (a fixed subset that keeps every class of a class-sorted folder)."""
    folder = resolve_image_folder(source=source, data_path=data_path, split=split, synthetic_params=synthetic_params)
    dataset = CenterCropFolder(folder, image_size=image_size, mean=mean, std=std, data_limit=data_limit,
                               resize_size=resize_size)
    indices = range(len(dataset))
    if 0 < max_samples < len(dataset):
        indices = indices[::math.ceil(len(dataset) / max_samples)]
    part = shard_of(len(indices), rank=rank, world_size=world_size)
    shard = indices[part.start:part.stop]
    batches = [[(index, 0) for index in shard[start : start + batch_size]]
               for start in range(0, len(shard), batch_size)][start_batch:]
    return EvalLoader(shard=shard, dataset=dataset, batch_sampler=batches, num_workers=num_workers,
                      device=torch.device(device), dtype=dtype, channels_last=True)
