"""Linear evaluation: classifiers trained with cross-entropy on a frozen trunk's features (VISSL's
``cross_entropy_multiple_output_single_target`` with MODEL.FEATURE_EVAL_SETTINGS; the protocol of
Zhang et al. 2016 and Goyal et al. 2019 that SwAV, BYOL and the others report).

The model is fastssl/models/feature_eval.py's: the trunk, frozen by the builder (requires_grad False, so
neither the optimizer nor DDP sees it), and one head per pooled layer (eval_mlp: BatchNorm2d then a
linear layer). Each step runs the trunk in eval mode (BatchNorm with its loaded statistics) without a
graph, then the heads with one; the loss is the sum over heads of the mean cross-entropy with the label
(VISSL's criterion: each head learns as if alone). At the end of training every rank scores its shard of
the held-out split and the top-1 / top-5 counts are summed over ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loaders.batch import Batch

from ..models.feature_eval import FeatureEvalModel
from .base import Method, RunInfo, detached

TOP_K = (1, 5)  # VISSL's accuracy_list_meter topk_values


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """How many samples have their label among the k highest logits, for each k: (N, C), (N,) -> (len(ks),)
    int64. k above C counts every sample."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k_max)
    hits = top == labels[:, None]  # (N, k_max): at most one True per row
    return torch.stack([hits[:, :k].sum() for k in ks])


class LinearEvaluation(Method):
    def __init__(self, *, ignore_index: int, temperature: float, run: RunInfo):
        super().__init__()
        if run.num_crops != 1:
            raise ValueError(f"linear evaluation trains on one crop per image (RandomResizedCrop), the transforms "
                             f"make {run.num_crops}")
        if temperature <= 0:
            raise ValueError(f"cross_entropy_multiple_output_single_target.temperature must be > 0, got {temperature}")
        self.ignore_index = ignore_index
        self.temperature = temperature
        self._run = run
        self._bound: tuple = ()  # (the plain FeatureEvalModel,): kept out of the method's modules and state

    @classmethod
    def from_config(cls, params: dict, run: RunInfo) -> "LinearEvaluation":
        """LOSS.cross_entropy_multiple_output_single_target."""
        return cls(ignore_index=params["ignore_index"], temperature=params["temperature"], run=run)

    def bind(self, model: nn.Module) -> None:
        if not isinstance(model, FeatureEvalModel):
            raise ValueError("cross_entropy_multiple_output_single_target trains classifiers on a frozen trunk: set "
                             "MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON=True and FREEZE_TRUNK_ONLY=True")
        if any(p.requires_grad for p in model.trunk.parameters()):
            raise ValueError("linear evaluation needs a frozen trunk (requires_grad False)")
        self._bound = (model,)

    def set_train_mode(self, model: nn.Module) -> None:
        """The heads train (their BatchNorm on batch statistics); the trunk stays in eval mode all run."""
        model.train()
        self._bound[0].trunk.eval()

    def training_loss(self, model: nn.Module, batch: Batch, *, step: int) -> torch.Tensor:
        """The frozen trunk's pooled features without a graph, then the heads (``model``: DDP over them) with one."""
        if batch.labels is None:
            raise ValueError("linear evaluation needs labels: DATA.TRAIN's images must sit in class folders "
                             "(root/<class>/<image>)")
        with torch.no_grad():
            features = self._bound[0].features(batch.crops[0])
        outputs = model(features)  # [(B, num_classes)] per head
        self._last_outputs = detached(outputs)
        return self.loss(outputs, batch, step=step)

    def loss(self, outputs, batch: Batch, *, step: int) -> torch.Tensor:
        """Sum over heads of the mean cross-entropy of logits / temperature with the label."""
        return sum(F.cross_entropy(logits.float() / self.temperature, batch.labels, ignore_index=self.ignore_index)
                   for logits in outputs)

    @torch.no_grad()
    def evaluate(self, model: FeatureEvalModel, loader) -> tuple[torch.Tensor, int]:
        """(top-k hits summed over ranks: (num_heads, len(TOP_K)) int64, images scored over ranks) of
        ``loader``, this rank's shard of the held-out split. Every rank calls it."""
        if not loader.has_labels:
            raise ValueError("the held-out images (DATA.TEST) have no labels: put them in class folders")
        model.eval()
        device = self._run.device
        counts = torch.zeros(len(model.heads) * len(TOP_K) + 1, dtype=torch.int64, device=device)
        for batch in loader:
            with self._run.autocast():
                outputs = model.classify(batch.crops[0])
            hits = torch.stack([topk_correct(logits.float(), batch.labels, TOP_K) for logits in outputs])
            counts[:-1] += hits.flatten()
            counts[-1] += batch.batch_size
        if self._run.world_size > 1:
            torch.distributed.all_reduce(counts, group=self._run.process_group)
        counts = counts.cpu()  # sync: once, at the end
        return counts[:-1].view(len(model.heads), len(TOP_K)), int(counts[-1])

    def on_train_end(self, *, model: nn.Module, test_loader) -> dict | None:
        """Top-1 and top-5 (%) of every head on the held-out split; keys top1, top5 for one head, top1/<layer>
        (top1/<layer>#<head> for a repeated layer) for several."""
        if test_loader is None:
            return None
        hits, images = self.evaluate(model, test_loader)
        names = model.layer_names
        metrics = {}
        for head, name in enumerate(names):
            suffix = "" if len(names) == 1 else f"/{name}" if names.count(name) == 1 else f"/{name}#{head}"
            for column, k in enumerate(TOP_K):
                metrics[f"top{k}{suffix}"] = 100.0 * int(hits[head, column]) / max(images, 1)
        return {**metrics, "test_images": images}
