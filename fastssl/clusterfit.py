"""ClusterFit step 1 (ENGINE_NAME cluster_features): a trained trunk's features of every training image,
clustered by k-means into labels for step 2 (Yan et al. 2020, section 3; VISSL's
tools/cluster_features_and_label.py).

    fastssl-train config=pretrain/clusterfit/cluster_features_resnet_8gpu_rotation_in1k \\
        config.MODEL.WEIGHTS_INIT.PARAMS_FILE=<weights>

1. Extraction, on every rank over its contiguous shard of the dataset (dataset order): the frozen trunk
   in eval mode, features of CLUSTERFIT.FEATURES.LAYER_NAME, globally average-pooled (VISSL's res5 with
   its 7x7 average pool on 224-pixel inputs). Each rank saves its features every CHUNK_BATCHES batches in a
   chunk file, written atomically; a killed or stopped extraction restarts after its last chunk.
2. Rank 0 reads the chunks of every rank, in rank order: that is dataset order. The features are
   L2-normalised (x / (||x|| + 1e-5), as VISSL) and clustered by faiss' k-means (NUM_CLUSTERS, NUM_ITER,
   SEED_VALUE), on the GPU where there is one and faiss has GPU support; each sample's label is its
   nearest centroid.
3. Output, written atomically to CLUSTERFIT.OUTPUT_DIR (default CHECKPOINT.DIR), named as VISSL names them
   (<DATASET_NAME>_train_<LAYER_NAME>_N<K>_D<dim>): ``_labels.npy`` (int64, one per training sample, in the
   order the data source lists them: step 2's DATA.TRAIN.LABEL_PATHS), ``_images.npy`` (the image path of
   each), ``_centroids.npy`` (K, dim), and ``_summary.json``, whose line is also printed.

The chunks are read from the file system by rank 0, so on several nodes CHECKPOINT.DIR must be shared (as
VISSL's extracted features are). The chunks' folder is named by the dataset, layer, number of samples, number
of ranks and batch size: a run that changes one of them extracts afresh, and a run over a finished
extraction clusters its features again (another NUM_CLUSTERS or NUM_ITER costs no second extraction).
An unreadable image is replaced by the next readable one (the loader's rule), so it takes that image's
features and label.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from loaders.sampler import shard_of
from .models.trunks import global_average_pool


@dataclass
class ClusterFeaturesJob:
    """Everything step 1 needs on one rank, built by builder.build_cluster_features."""

    trunk: nn.Module                  # frozen, in eval mode, on the device
    device: torch.device
    layer_name: str                   # a name of trunk.layer_names (VISSL's)
    make_loader: Callable             # start_batch -> this rank's EvalLoader from that batch on
    num_samples: int                  # the whole dataset (all ranks)
    batch_size: int                   # per rank
    rank: int
    world_size: int
    features_dir: Path                # this extraction's chunk files
    output_dir: Path
    output_prefix: str                # <dataset>_train_<layer>
    num_clusters: int
    num_iter: int
    seed: int
    chunk_batches: int
    max_batches: int                  # -1: all
    autocast_dtype: torch.dtype | None
    progress_bar: bool
    signal_received: Callable         # () -> bool: SIGTERM / SIGUSR1 seen (save the chunk and stop)
    notice: Callable                  # one-line message to the user


# ---------------- extraction ----------------------------------------------------------------------

def chunk_path(features_dir: Path, *, rank: int, chunk: int) -> Path:
    return features_dir / f"rank{rank:05d}_chunk{chunk:06d}.pt"


def rank_chunks(features_dir: Path, *, rank: int) -> list[Path]:
    """This rank's chunk files in order; they cover its batches from 0 without a gap."""
    chunks = []
    while chunk_path(features_dir, rank=rank, chunk=len(chunks)).exists():
        chunks.append(chunk_path(features_dir, rank=rank, chunk=len(chunks)))
    return chunks


def batches_of_rank(num_samples: int, *, rank: int, world_size: int, batch_size: int) -> int:
    return math.ceil(len(shard_of(num_samples, rank=rank, world_size=world_size)) / batch_size)


def write_atomically(path: Path, write: Callable) -> None:
    """write(file) into a temporary file beside ``path``, then rename it: a reader never sees half a file."""
    # A fresh temporary name, created exclusively: a link planted beside ``path`` is never followed.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(descriptor, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def features_of(trunk: nn.Module, images: torch.Tensor, layer_name: str) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C): the layer's output, globally average-pooled where it is a map."""
    features = trunk.forward_features(images, layer_name)
    return (global_average_pool(features) if features.dim() == 4 else features).float()


def readable_chunks(job: ClusterFeaturesJob) -> list[dict]:
    """This rank's saved chunks up to the first damaged one (a disk fault, a copy cut short), which is removed
    with the chunks after it, so that the extraction resumes from there (a notice says so)."""
    paths, chunks = rank_chunks(job.features_dir, rank=job.rank), []
    for number, path in enumerate(paths):
        try:
            chunks.append(read_chunk(path))
        except DamagedChunk as error:
            for later in paths[number:]:  # fastssl's own chunk files, named by chunk_path
                later.unlink(missing_ok=True)
            job.notice(f"rank {job.rank}: {error}; it and the {len(paths) - number - 1} chunk(s) after it were "
                       "removed and are extracted again")
            break
    return chunks


@torch.no_grad()
def extract(job: ClusterFeaturesJob) -> bool:
    """Extract this rank's remaining batches into chunk files; True when the rank's shard is complete."""
    saved = readable_chunks(job)
    chunk, done = len(saved), sum(saved_chunk["num_batches"] for saved_chunk in saved)
    total = batches_of_rank(job.num_samples, rank=job.rank, world_size=job.world_size, batch_size=job.batch_size)
    if done:
        job.notice(f"rank {job.rank}: resuming the extraction at batch {done} of {total} ({chunk} chunks saved)")
    if done >= total:
        return True
    loader = job.make_loader(done)
    bar = progress(job, total=len(loader.shard), initial=min(done * job.batch_size, len(loader.shard)))
    autocast = (contextlib.nullcontext() if job.autocast_dtype is None
                else torch.autocast(device_type=job.device.type, dtype=job.autocast_dtype))
    features, indices, this_run, images, start = [], [], 0, 0, time.perf_counter()
    for batch in loader:
        with autocast:
            features.append(features_of(job.trunk, batch.crops[0], job.layer_name))  # on the device until saved
        indices.append(batch.indices)
        this_run, images = this_run + 1, images + batch.batch_size
        bar.update(batch.batch_size)
        stopping = this_run == job.max_batches or job.signal_received()
        if len(features) == job.chunk_batches or stopping or done + this_run == total:
            save_chunk(job, chunk=chunk, first_batch=done + this_run - len(features), features=features,
                       indices=indices)
            chunk, features, indices = chunk + 1, [], []
            if not job.progress_bar:  # a log file: one line per chunk
                job.notice(f"rank {job.rank}: batch {done + this_run} of {total}, "
                           f"{images / (time.perf_counter() - start):.1f} images/s")
        if stopping:
            break
    bar.close()
    seconds = time.perf_counter() - start
    job.notice(f"rank {job.rank}: extracted {images} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.1f} "
               f"images/s); batch {done + this_run} of {total} done")
    return done + this_run == total


class DamagedChunk(ValueError):
    """A feature chunk that cannot be read or does not hold what save_chunk writes (a one-line message)."""


def read_chunk(path: Path) -> dict:
    """A chunk file, its tensors memory-mapped (counting the batches done reads no features); DamagedChunk when
    it cannot be read or its contents are not a chunk's."""
    try:
        chunk = torch.load(path, weights_only=True, mmap=True)
    except Exception as error:  # torch's zip reader and unpickler raise several types
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise DamagedChunk(f"feature chunk {path} is damaged ({detail})") from None
    valid = (isinstance(chunk, dict) and isinstance(chunk.get("num_batches"), int) and chunk["num_batches"] > 0
             and isinstance(chunk.get("features"), torch.Tensor) and isinstance(chunk.get("indices"), torch.Tensor)
             and chunk["features"].dim() == 2 and chunk["indices"].shape == chunk["features"].shape[:1])
    if not valid:
        raise DamagedChunk(f"feature chunk {path} is damaged (it does not hold a chunk's features and indices)")
    return chunk


def save_chunk(job: ClusterFeaturesJob, *, chunk: int, first_batch: int, features: list, indices: list) -> None:
    # sync: once per chunk, the features come to the host
    state = {"features": torch.cat(features).cpu(), "indices": torch.cat(indices).cpu(), "first_batch": first_batch,
             "num_batches": len(features), "layer_name": job.layer_name}
    write_atomically(chunk_path(job.features_dir, rank=job.rank, chunk=chunk), lambda f: torch.save(state, f))


class _Silent:
    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress(job: ClusterFeaturesJob, *, total: int, initial: int):
    """Rank 0's progress bar in images, with images/s (a terminal only)."""
    if job.rank != 0 or not job.progress_bar:
        return _Silent()
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="img", unit_scale=True, dynamic_ncols=True, file=sys.stdout,
                mininterval=1.0, desc=f"features {job.layer_name}")


# ---------------- gather, k-means, output ---------------------------------------------------------

def gather_features(job: ClusterFeaturesJob) -> tuple[np.ndarray, np.ndarray] | None:
    """Every rank's chunks in rank order: (features (N, D) float32, loaded indices (N,)) in dataset order,
    or None (with a notice) while a rank's shard is incomplete."""
    features, indices = [], []
    for rank in range(job.world_size):
        try:
            chunks = [read_chunk(path) for path in rank_chunks(job.features_dir, rank=rank)]
        except DamagedChunk as error:  # another rank's, damaged since it was written: its extract repairs it
            raise DamagedChunk(f"{error}; the same command extracts it again") from None
        expected = batches_of_rank(job.num_samples, rank=rank, world_size=job.world_size, batch_size=job.batch_size)
        done = sum(chunk["num_batches"] for chunk in chunks)
        if done != expected:
            job.notice(f"the extraction stopped with {done} of {expected} batches of rank {rank} done; the same "
                       "command resumes it")
            return None
        features += [chunk["features"].numpy() for chunk in chunks]
        indices += [chunk["indices"].numpy() for chunk in chunks]
    features, indices = np.concatenate(features), np.concatenate(indices)
    if features.shape[0] != job.num_samples:
        raise ValueError(f"{job.features_dir} holds {features.shape[0]} features for {job.num_samples} samples; "
                         "delete it to extract again")
    replaced = int((indices != np.arange(job.num_samples)).sum())
    if replaced:
        job.notice(f"{replaced} unreadable images took the features of the next readable one")
    return features, indices


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """x / (||x|| + 1e-5) per row, as VISSL's cluster_features_and_label.py."""
    return np.ascontiguousarray(features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-5), dtype=np.float32)


def kmeans_labels(features: np.ndarray, *, num_clusters: int, num_iter: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means of (N, D) float32 rows: (labels (N,) int64: the nearest centroid, centroids (K, D))."""
    import faiss  # faiss-cpu or faiss-gpu; imported only here

    if features.shape[0] < num_clusters:
        raise ValueError(f"CLUSTERFIT.NUM_CLUSTERS={num_clusters} is more than the {features.shape[0]} samples")
    use_gpu = torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(features.shape[1], num_clusters, niter=num_iter, seed=seed, gpu=use_gpu, verbose=False)
    kmeans.train(features)
    _, nearest = kmeans.index.search(features, 1)
    return nearest.reshape(-1).astype(np.int64), kmeans.centroids


def write_outputs(job: ClusterFeaturesJob, *, labels: np.ndarray, centroids: np.ndarray, image_paths: list[str],
                  summary: dict) -> Path:
    """The labels, image list, centroids and summary files, each written atomically; returns the labels path."""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    prefix = job.output_dir / f"{job.output_prefix}_N{job.num_clusters}_D{centroids.shape[1]}"
    paths = {name: Path(f"{prefix}_{name}") for name in ("labels.npy", "images.npy", "centroids.npy", "summary.json")}
    write_atomically(paths["images.npy"], lambda f: np.save(f, np.array(image_paths)))
    write_atomically(paths["centroids.npy"], lambda f: np.save(f, centroids))
    write_atomically(paths["summary.json"], lambda f: f.write((json.dumps(summary) + "\n").encode()))
    write_atomically(paths["labels.npy"], lambda f: np.save(f, labels))  # last: its presence means done
    return paths["labels.npy"]


def cluster_features(job: ClusterFeaturesJob) -> Path | None:
    """Step 1 on this rank: extract, then (rank 0) gather, cluster and write. Returns the labels file on
    rank 0 once written; None on other ranks and while the extraction is incomplete."""
    start = time.perf_counter()
    job.features_dir.mkdir(parents=True, exist_ok=True)
    extract(job)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's chunks are on disk
    if job.rank != 0:
        return None
    gathered = gather_features(job)
    if gathered is None:
        return None
    features, _ = gathered
    clustering_start = time.perf_counter()
    labels, centroids = kmeans_labels(l2_normalize(features), num_clusters=job.num_clusters, num_iter=job.num_iter,
                                      seed=job.seed)
    sizes = np.bincount(labels, minlength=job.num_clusters)
    summary = {"samples": int(labels.shape[0]), "clusters": job.num_clusters, "empty_clusters": int((sizes == 0).sum()),
               "largest_cluster": int(sizes.max()), "feature_dim": int(features.shape[1]),
               "kmeans_seconds": round(time.perf_counter() - clustering_start, 2),
               "seconds": round(time.perf_counter() - start, 2)}
    path = write_outputs(job, labels=labels, centroids=centroids, image_paths=job.make_loader(0).paths,
                         summary=summary)
    job.notice(f"clusterfit: {summary['samples']} samples, {summary['clusters']} clusters, {summary['empty_clusters']} "
               f"empty, largest {summary['largest_cluster']}, {summary['seconds']} s; labels {path}")
    return path
