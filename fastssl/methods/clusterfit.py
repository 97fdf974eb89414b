"""ClusterFit step 2 (Yan et al. 2020, "ClusterFit: Improving Generalization of Visual Representations"):
train a network from scratch to predict the k-means cluster of each image found in step 1
(fastssl/clusterfit.py). LOSS.name ``clusterfit_loss``; the labels file is DATA.TRAIN.LABEL_PATHS[0].

The labels file holds one integer per training sample, in the order the data source lists them (the
sample's dataset index), as step 1 writes it. It is loaded once into a buffer on the device and indexed
with each batch's dataset indices (Batch.indices), so no loader reads it. The loss is the cross-entropy of
the last head's scores (B, K) against those labels, samples labelled ``ignore_index`` left out, the loss
of VISSL's recipe (cross_entropy_multiple_output_single_target with one output). The buffer is not saved
in checkpoints: a resumed run reads the same file again.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loaders.batch import Batch

from .base import Method, RunInfo


def read_labels(path: str | Path, *, num_samples: int, num_classes: int, ignore_index: int) -> torch.Tensor:
    """A labels .npy as an int64 tensor (num_samples,); a one-line ValueError when it does not fit the run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} (DATA.TRAIN.LABEL_PATHS) does not exist")
    try:  # memory-mapped: a header claiming more labels than the file holds allocates nothing and is refused
        labels = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError) as error:
        raise ValueError(f"labels file {path} is not a numpy array of integers: {error}") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels file {path} holds a {labels.dtype} array of shape {labels.shape}; "
                         "ClusterFit needs one integer per training sample")
    if labels.shape[0] != num_samples:
        raise ValueError(f"labels file {path} has {labels.shape[0]} labels but the training data has {num_samples} "
                         "samples (the same DATA_SOURCES, DATA_PATHS and DATA_LIMIT as step 1 are needed)")
    used = labels[labels != ignore_index]
    if used.size and (used.min() < 0 or used.max() >= num_classes):
        raise ValueError(f"labels file {path} has labels in [{used.min()}, {used.max()}] but the head has "
                         f"{num_classes} outputs (MODEL.HEAD.PARAMS[-1] dims[-1] must be CLUSTERFIT.NUM_CLUSTERS)")
    return torch.from_numpy(np.array(labels, dtype=np.int64))


class ClusterFit(Method):
    def __init__(self, *, labels: torch.Tensor, ignore_index: int, label_path: str):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_path = label_path
        self.register_buffer("labels", labels, persistent=False)  # (N,) the cluster of every training sample

    @classmethod
    def from_config(cls, params: dict, run: RunInfo) -> "ClusterFit":
        """LOSS.clusterfit_loss and the run's DATA.TRAIN.LABEL_PATHS (one .npy)."""
        if len(run.label_paths) != 1:
            raise ValueError("clusterfit_loss needs one labels file: config.DATA.TRAIN.LABEL_PATHS=[<labels.npy>] "
                             f"(ClusterFit step 1's output), got {list(run.label_paths)}")
        if not run.head_params or run.head_params[-1][0] != "mlp":
            raise ValueError("clusterfit_loss needs an mlp head last in MODEL.HEAD.PARAMS (one output per cluster)")
        labels = read_labels(run.label_paths[0], num_samples=run.num_train_samples,
                             num_classes=run.head_params[-1][1]["dims"][-1], ignore_index=params["ignore_index"])
        return cls(labels=labels, ignore_index=params["ignore_index"], label_path=str(run.label_paths[0]))

    def loss(self, outputs, batch: Batch, *, step: int) -> torch.Tensor:
        """Cross-entropy of the scores (C B, K) of every crop against the labels of the batch's samples."""
        targets = self.labels[batch.indices]  # (B,)
        num_crops = outputs.shape[0] // batch.batch_size
        return F.cross_entropy(outputs.float(), targets.repeat(num_crops), ignore_index=self.ignore_index)
