"""The torchvision reference loader: an image folder, per-sample PIL crops, a resumable sampler.

The classic design (SwAV's MultiCropDataset): each sample is decoded with PIL and every crop
runs torchvision's functional ops with parameters drawn from a random.Random seeded from
(seed, epoch, dataset index). So a sample's crops depend on nothing else (not the worker
count, not the process state), and resuming a checkpoint mid-epoch replays exactly.

Bad files never stop training: a file that fails to decode is replaced by the next readable
index, and the failed path travels back with the sample so the main process counts it and logs
it once (worker processes cannot share a counter).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from loaders.recipe import MultiCropRecipe, blur_kernel_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Larger images are decoded at reduced scale (JPEG draft) or reduced after decoding: a 16 MP
# image already holds far more detail than any crop uses.
MAX_DECODED_PIXELS = 1 << 24
# Beyond this a non-JPEG is not decoded at all (a 1 GP RGB image alone is 3 GB).
MAX_UNDRAFTABLE_PIXELS = 1 << 30
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImage(Exception):
    """A file that cannot be decoded into an RGB image."""


def list_images(root: str | Path, *, data_limit: int) -> tuple[list[str], list[int], list[str]]:
    """Image paths, labels and class names of an image folder, sorted.

    root/<class>/**/<image> gives labels 0..C-1 by sorted class name; a flat folder of images
    gives label -1 for all. data_limit > 0 keeps the first data_limit files of the sorted list.
    Raises FileNotFoundError (no such directory) or ValueError (no image inside).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if classes:
        entries = [(path, label) for label, name in enumerate(classes) for path in _image_files(root / name)]
    else:
        entries = [(str(root / e.name), -1) for e in sorted(os.scandir(root), key=lambda e: e.name) if _is_image(e)]
    if not entries:
        raise ValueError(f"image folder {root} holds no image files ({' '.join(IMAGE_EXTENSIONS)})")
    if data_limit > 0:
        entries = entries[:data_limit]
    return [path for path, _ in entries], [label for _, label in entries], classes


def _image_files(directory: Path) -> list[str]:
    """Image files anywhere under directory, sorted. os.walk reads file types from the directory
    listing, so a 1.3M-image ImageNet folder is listed without a stat per file."""
    found = []
    for parent, subdirectories, names in os.walk(directory, followlinks=True):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        found.extend(os.path.join(parent, n) for n in names if _is_image_name(n))
    return sorted(found)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _is_image(entry: os.DirEntry) -> bool:
    return _is_image_name(entry.name) and entry.is_file()


@contextlib.contextmanager
def _no_pixel_limit() -> Iterator[None]:
    """Lift PIL's decompression-bomb check for one open: load_rgb applies its own size policy."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def load_rgb(path: str) -> Image.Image:
    """Decode a file into an 8-bit RGB PIL image, or raise UnreadableImage.

    Converts grayscale, palette, CMYK, alpha (dropped) and 16-bit images (scaled to 8 bits);
    decodes images over MAX_DECODED_PIXELS at reduced scale.
    """
    try:
        with _no_pixel_limit(), Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_DECODED_PIXELS:
                factor = math.sqrt(width * height / MAX_DECODED_PIXELS)
                if image.format == "JPEG":
                    # The JPEG decoder scales by 1/2, 1/4 or 1/8 while decoding: never holds the full image.
                    image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
                elif width * height > MAX_UNDRAFTABLE_PIXELS:
                    raise UnreadableImage(f"{width}x{height} pixels is too large to decode")
            image.load()
            rgb = _to_rgb(image)
        if rgb.width * rgb.height > MAX_DECODED_PIXELS:
            rgb = rgb.reduce(math.ceil(math.sqrt(rgb.width * rgb.height / MAX_DECODED_PIXELS)))
        return rgb
    except UnreadableImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, MemoryError) as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own convert clips 16-bit values at 255 (a white image); scale the range instead.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


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
        crops = [augment_crop(image, crop=c, recipe=self.recipe, rng=rng) for c in range(self.recipe.total_num_crops)]
        return crops, used, self.files.labels[used], failed


class CenterCropFolder(torch.utils.data.Dataset):
    """Evaluation items: resize the short side to image_size / 0.875, centre-crop image_size
    (the standard ImageNet evaluation ratio, 256 -> 224). Same item layout as MultiCropFolder."""

    def __init__(self, root: str | Path, *, image_size: int, mean, std, data_limit: int):
        self.files = ImageFiles(root, data_limit=data_limit)
        self.image_size = image_size
        self.resize = round(image_size / 0.875)
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
    top, left, h, w = sample_crop_params(
        image.height, image.width, scale=recipe.crop_scales[group], ratio=recipe.crop_ratio, rng=rng
    )
    out = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    if rng.random() < recipe.flip_p:
        out = TF.hflip(out)
    if recipe.color_strength is not None:
        if rng.random() < recipe.color_p:
            out = _color_jitter(out, strength=recipe.color_strength, rng=rng)
        if rng.random() < recipe.gray_p:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
    # From here on numpy, not torch: torch's intra-op threads cost far more than they save on
    # one small crop, and in the main process (num_workers=0) they fight the training step.
    pixels = np.asarray(out, dtype=np.float32) / 255  # (s, s, 3)
    if rng.random() < recipe.blur_p[crop]:
        pixels = gaussian_blur(pixels, sigma=rng.uniform(*recipe.blur_sigma), kernel_size=blur_kernel_size(size))
    if rng.random() < recipe.solarize_p[crop]:
        pixels = np.where(pixels >= 128 / 255, 1 - pixels, pixels)  # PIL's solarize at 128
    return to_normalized_tensor(pixels, mean=recipe.mean, std=recipe.std)


def gaussian_blur(pixels: np.ndarray, *, sigma: float, kernel_size: int) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float32 image, reflect padding (torchvision's kernel)."""
    half = kernel_size // 2
    weights = np.exp(-0.5 * ((np.arange(kernel_size) - half) / sigma) ** 2)
    weights = (weights / weights.sum()).astype(np.float32)
    height, width = pixels.shape[:2]
    padded = np.pad(pixels, ((half, half), (half, half), (0, 0)), mode="reflect")
    columns = sum(w * padded[i : i + height] for i, w in enumerate(weights))
    return sum(w * columns[:, i : i + width] for i, w in enumerate(weights))


def to_normalized_tensor(pixels: np.ndarray, *, mean, std) -> torch.Tensor:
    """(H, W, 3) float32 in [0, 1] -> (3, H, W) float32 tensor, (x - mean) / std per channel."""
    normalized = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))


def _color_jitter(image: Image.Image, *, strength: float, rng: random.Random) -> Image.Image:
    """ColorJitter(0.8s, 0.8s, 0.8s, 0.2s): the four ops in a random order (SimCLR appendix A)."""
    jitter = 0.8 * strength
    low = max(0.0, 1.0 - jitter)
    brightness, contrast, saturation = (rng.uniform(low, 1.0 + jitter) for _ in range(3))
    hue = rng.uniform(-0.2 * strength, 0.2 * strength)
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


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (dataset index, epoch) keys for one rank.

    Order: a permutation drawn from (seed, epoch) (or sequential when shuffle is False), the
    same on every rank; rank r takes positions r, r + world_size, ... so ranks never overlap.
    drop_last=True: the tail is dropped so every rank gets len(self) full batches.
    drop_last=False: the order is padded by wrapping around to a multiple of world_size (like
    torch's DistributedSampler; with one rank nothing is repeated) and the last batch may be
    short. set_epoch(epoch, start_batch) skips the first start_batch batches (mid-epoch resume).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        drop_last: bool,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"sampler: rank {rank} is outside world_size {world_size}")
        self.num_samples, self.batch_size, self.drop_last = num_samples, batch_size, drop_last
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch, self.start_batch = 0, 0
        if drop_last and num_samples < batch_size * world_size:
            raise ValueError(
                f"sampler: {num_samples} samples do not fill one batch of {batch_size} on each of {world_size} ranks"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches of a full epoch on this rank (start_batch not subtracted)."""
        if self.drop_last:
            return self.num_samples // (self.batch_size * self.world_size)
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def rank_indices(self) -> np.ndarray:
        """This rank's dataset indices for the current epoch, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        if self.drop_last:
            order = order[: len(self) * self.batch_size * self.world_size]
        else:
            padded = math.ceil(self.num_samples / self.world_size) * self.world_size
            order = np.resize(order, padded)  # np.resize repeats from the start
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = self.rank_indices()
        for start in range(self.start_batch * self.batch_size, len(indices), self.batch_size):
            yield [(int(i), self.epoch) for i in indices[start : start + self.batch_size]]
