"""Watching a run (README: Watching a run): the trunk's kNN top-1 on the held-out split every few epochs, and
every log period the embedding's effective rank and spread from the step's own tensors, with a collapse warning.

Neither changes the training: the kNN pass runs the plain trunk in eval mode (no BatchNorm update) with every
random stream saved and restored around it; the embedding figures are read from forward hooks that keep the
step's detached outputs, and computed on the device at the log's existing sync.
"""
from __future__ import annotations

import contextlib
import math
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kernels.collectives import all_gather_cat, all_reduce_max, all_reduce_sum, world_size

RANKME_EPSILON = 1e-7  # Garrido et al. 2023, eq. 1


def effective_rank(embeddings: torch.Tensor) -> torch.Tensor:
    """RankMe (Garrido et al. 2023, eq. 1) of (N, D) rows: exp of the entropy of the singular values
    normalised to sum 1 (each plus epsilon). 1 for rows on one line, min(N, D) for a flat spectrum."""
    singular = torch.linalg.svdvals(embeddings.detach().float())  # (min(N, D),)
    p = singular / singular.sum() + RANKME_EPSILON
    return torch.exp(-(p * p.log()).sum())


def normalised_std(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the std over rows of the L2-normalised (N, D) embedding (Chen & He 2021,
    section 4.1): about 1 / sqrt(D) for a spread embedding, 0 for a collapsed one."""
    return F.normalize(embeddings.detach().float(), dim=1).std(dim=0).mean()


@contextlib.contextmanager
def preserved_random_state(device: torch.device):
    """Every random stream of the process (Python, NumPy, torch's CPU and ``device``'s) as it was on entry."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def preserved_modes(model: nn.Module):
    """Every submodule's train/eval flag as it was on entry."""
    modes = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


class KnnMonitor:
    """The trunk's weighted kNN top-1 (%) on a held-out split, computed as ``fastssl-eval knn`` computes it
    (fastssl/evaluate.py's extract_features and knn_correct), with a bank of a fixed subset of the training
    images. Each rank extracts its shards of the bank and of the held-out split; the bank is gathered, each
    rank scores its held-out shard against it, and the correct counts are summed."""

    def __init__(self, *, bank_loader, test_loader, k: int, temperature: float, every_n_epochs: int,
                 num_epochs: int, group=None):
        self.bank_loader, self.test_loader = bank_loader, test_loader
        self.k, self.temperature = k, temperature
        self.every_n_epochs, self.num_epochs = every_n_epochs, num_epochs
        self.group = group
        self.seconds = 0.0  # spent in evaluate, for the cost share of the run

    def due(self, epochs_done: int) -> bool:
        return epochs_done % self.every_n_epochs == 0 or epochs_done == self.num_epochs

    @torch.no_grad()
    def evaluate(self, trunk: nn.Module) -> tuple[float, int]:
        """(top-1 %, number of held-out images) of ``trunk`` (the plain module, not DDP's wrapper)."""
        from .evaluate import extract_features, knn_correct  # evaluate imports the run builder, which imports this
        start = time.perf_counter()
        device = next(trunk.parameters()).device
        with preserved_random_state(device), preserved_modes(trunk):
            bank_features, bank_labels = self._gathered(*extract_features(trunk, self.bank_loader))
            test_features, test_labels = extract_features(trunk, self.test_loader)
            correct = knn_correct(bank_features, bank_labels, test_features, test_labels, k=self.k,
                                  temperature=self.temperature)
        counts = all_reduce_sum(torch.tensor([correct, test_features.shape[0]], dtype=torch.float64,
                                             device=device), self.group)
        self.seconds += time.perf_counter() - start
        return 100.0 * float(counts[0]) / float(counts[1]), int(counts[1])

    def _gathered(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's rows in rank order; shards differ by at most one row, so each is padded to the
        largest with label -1 and the padding dropped after the gather."""
        if world_size(self.group) == 1:
            return features, labels
        largest = int(all_reduce_max(torch.tensor([features.shape[0]], device=features.device), self.group))
        padding = largest - features.shape[0]
        features = F.pad(features, (0, 0, 0, padding))
        labels = F.pad(labels.to(features.device), (0, padding), value=-1)
        features, labels = all_gather_cat(features, self.group), all_gather_cat(labels, self.group)
        kept = labels >= 0
        return features[kept], labels[kept]


class EmbeddingMonitor:
    """Every log period: RankMe of the trunk's pooled features and of the first head's output (the projector's
    embedding), both over the rows of the step's large crops (the first resolution group), the normalised
    embedding's per-dimension std, and the prototypes in use (SwAV, DeepClusterV2: distinct arg-max prototypes
    over all the step's rows, all ranks).

    Forward hooks keep the latest step's detached outputs (no copy, no sync); ``read`` computes the figures
    on the device and reads them once, at the log's sync. A run whose rank or spread stays below the
    thresholds for ``patience`` periods in a row, or whose samples all go to one prototype, is called
    collapsed: one warning line naming the figure, and with ``stop_on_collapse`` a stop."""

    def __init__(self, *, model: nn.Module, method, min_rank: float, min_std_ratio: float, patience: int,
                 stop_on_collapse: bool, group=None):
        self.method, self.group = method, group
        self.min_rank, self.min_std_ratio, self.patience = min_rank, min_std_ratio, patience
        self.stop_on_collapse = stop_on_collapse
        self.periods_below = 0
        self.warned = False
        self._trunk_outputs: dict[tuple, torch.Tensor] = {}  # input (H, W) -> pooled features (rows, C)
        self._embedding: torch.Tensor | None = None
        model.trunk.register_forward_hook(self._keep_trunk_output)
        self.has_embedding = method.monitors_embedding and len(model.heads) > 0
        if self.has_embedding:
            model.heads[0].register_forward_hook(self._keep_embedding)

    def _keep_trunk_output(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():  # the training step's forward, not an evaluation pass
            self._trunk_outputs[tuple(inputs[0].shape[-2:])] = output.detach()

    def _keep_embedding(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():
            self._embedding = (output[0] if isinstance(output, (tuple, list)) else output).detach()

    @torch.no_grad()
    def read(self) -> dict:
        """The figures of the latest step (the same on every rank: means over ranks), or {} before a step."""
        if not self._trunk_outputs:
            return {}
        trunk = self._trunk_outputs[max(self._trunk_outputs)]  # the largest crops
        device = trunk.device
        figures = [effective_rank(trunk.flatten(1))]
        names = ["rank_trunk"]
        if self.has_embedding and self._embedding is not None:
            embedding = self._embedding[:trunk.shape[0]].flatten(1)  # crop-major rows: the same large crops
            figures += [effective_rank(embedding), normalised_std(embedding) * math.sqrt(embedding.shape[1])]
            names += ["rank_embedding", "embedding_std_ratio"]
        scores = self.method.last_prototype_scores()
        values = torch.stack(figures).to(device, torch.float64) / world_size(self.group)
        if scores is not None:  # (rows, K): how many rows of every rank pick each prototype
            picks = torch.bincount(scores.argmax(dim=1), minlength=scores.shape[1]).to(device, torch.float64)
            values = torch.cat([values, picks])
        values = all_reduce_sum(values, self.group).cpu()  # sync: the log's, once per period
        record = {name: float(value) for name, value in zip(names, values)}
        if scores is not None:
            record["prototypes_in_use"] = int((values[len(names):] > 0).sum())
        self._trunk_outputs.clear()
        return record

    def check(self, record: dict) -> str | None:
        """The collapse warning (once per run) when ``record`` completes the patience, else None."""
        low = [f"{name} {record[name]:.2f} < {limit}" for name, limit in
               (("rank_trunk", self.min_rank), ("rank_embedding", self.min_rank),
                ("embedding_std_ratio", self.min_std_ratio)) if name in record and record[name] < limit]
        one_prototype = record.get("prototypes_in_use") == 1
        self.periods_below = self.periods_below + 1 if low else 0
        if self.warned or not (one_prototype or self.periods_below >= self.patience):
            return None
        self.warned = True
        why = "every sample assigned to one prototype" if one_prototype else \
            f"{', '.join(low)} for {self.periods_below} log periods in a row"
        return f"the embedding looks collapsed at step {record['step']}: {why}"


class RunMonitor:
    """What the loop calls: the embedding figures of each log period (and the collapse check), the kNN
    after every EVERY_N_EPOCHS epochs (in the record of the epoch's last log period). Either part may be off
    (None)."""

    def __init__(self, *, trunk: nn.Module, knn: KnnMonitor | None, embedding: EmbeddingMonitor | None):
        self.trunk, self.knn, self.embedding = trunk, knn, embedding
        self.collapse_stop = False  # set with EmbeddingMonitor.stop_on_collapse once the run looks collapsed

    def log_figures(self) -> dict:
        """The embedding figures to add to this period's record."""
        return self.embedding.read() if self.embedding is not None else {}

    def check_collapse(self, record: dict, logger) -> None:
        warning = self.embedding.check(record) if self.embedding is not None else None
        if warning is None:
            return
        stop = self.embedding.stop_on_collapse
        logger.warn(f"fastssl: warning: {warning}" + ("; stopping (MONITOR.EMBEDDING.STOP_ON_COLLAPSE)" if stop else
                                                      "; MONITOR.EMBEDDING.STOP_ON_COLLAPSE=True stops a run here"))
        self.collapse_stop = stop

    def knn_figures(self, *, epoch: int) -> dict:
        """The kNN figures, when epoch ``epoch`` (0-based) completes a period or the run; else {}."""
        if self.knn is None or not self.knn.due(epoch + 1):
            return {}
        start = time.perf_counter()
        top1, num_images = self.knn.evaluate(self.trunk)
        return {"knn_top1": top1, "knn_images": num_images, "knn_seconds": time.perf_counter() - start}
