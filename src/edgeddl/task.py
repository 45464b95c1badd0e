"""What a run learns and how it is scored: classification, or anomaly detection.

A task says what the training loss compares the model's output with (the class label, or
for anomaly detection the input itself: an autoencoder learns to reconstruct normal data)
and how a held-out set is scored. The simulator and every device of a real fleet evaluate
through `Task.evaluate`, so both write the same metrics: `test_loss` and the task's own
(`test_accuracy`, or `test_auroc`: how well the per-sample reconstruction error ranks
anomalies above normal samples; 0.5 is chance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from edgeddl.config.schema import TaskName

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(model output, target) -> the loss averaged over the batch (the fused pass relies on it)."""


class Task(ABC):
    """The loss's target, the default loss, and the evaluation of a model."""

    name: ClassVar[TaskName]
    metric: ClassVar[str]
    """Key of the task's metric in an evaluation row (higher is better)."""

    def __init__(self, loss_fn: LossFn | None = None) -> None:
        self.loss_fn: LossFn = loss_fn or self.default_loss()

    @staticmethod
    @abstractmethod
    def default_loss() -> LossFn: ...

    @abstractmethod
    def target(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What the loss compares the model's output on `x` with."""

    @abstractmethod
    def output_mismatch(
        self, out_shape: tuple[int, ...], x_shape: tuple[int, ...], num_classes: int, exact: bool
    ) -> str:
        """Why a model's outputs of `out_shape` for a batch of `x_shape` cannot train this
        task ("" if they can); `exact`: `num_classes` is all the classes there are, not only
        those the labels show."""

    @abstractmethod
    def sample_scores(
        self, out: torch.Tensor, x: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """One number per sample that the metric is computed from."""

    @abstractmethod
    def score(self, scores: torch.Tensor, labels: torch.Tensor) -> float:
        """The metric of a whole held-out set from its per-sample scores."""

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, batch: int = 2048
    ) -> dict[str, float]:
        """{"test_loss": mean loss, metric: value} of `model` on a held-out set; the model
        is left in the mode it was in."""
        was_training = model.training
        model.eval()
        total_loss, scores = 0.0, []
        try:
            for i in range(0, len(x), batch):
                xb, yb = x[i : i + batch], labels[i : i + batch]
                out = model(xb)
                total_loss += float(self.loss_fn(out, self.target(xb, yb))) * len(xb)
                scores.append(self.sample_scores(out, xb, yb))
        finally:
            model.train(was_training)
        all_scores = torch.cat(scores) if scores else torch.zeros(0)
        return {
            "test_loss": total_loss / max(len(x), 1),
            self.metric: self.score(all_scores, labels),
        }


class Classification(Task):
    """Class labels; cross-entropy; accuracy."""

    name = "classification"
    metric = "test_accuracy"

    @staticmethod
    def default_loss() -> LossFn:
        return nn.functional.cross_entropy

    def target(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def output_mismatch(
        self, out_shape: tuple[int, ...], x_shape: tuple[int, ...], num_classes: int, exact: bool
    ) -> str:
        n, scores = x_shape[0], out_shape[-1] if out_shape else 0
        fits = scores == num_classes or (not exact and scores > num_classes)
        if len(out_shape) == 2 and out_shape[0] == n and fits:
            return ""
        if exact:
            return f"expected ({n}, {num_classes}): one score per class of the data set"
        return f"expected ({n}, >= {num_classes}): a score per class (labels 0..{num_classes - 1})"

    def sample_scores(
        self, out: torch.Tensor, x: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return out.argmax(1) == labels

    def score(self, scores: torch.Tensor, labels: torch.Tensor) -> float:
        return int(scores.sum()) / max(len(scores), 1)


class AnomalyDetection(Task):
    """Reconstruct the input (mean squared error); score a held-out set, labelled 1 for an
    anomaly, by the AUROC of each sample's reconstruction error."""

    name = "anomaly_detection"
    metric = "test_auroc"

    @staticmethod
    def default_loss() -> LossFn:
        return nn.functional.mse_loss

    def target(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return x

    def output_mismatch(
        self, out_shape: tuple[int, ...], x_shape: tuple[int, ...], num_classes: int, exact: bool
    ) -> str:
        if out_shape == x_shape:
            return ""
        return f"expected {x_shape}: a reconstruction of the input, for anomaly detection"

    def sample_scores(
        self, out: torch.Tensor, x: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return (out - x).square().flatten(1).mean(1)

    def score(self, scores: torch.Tensor, labels: torch.Tensor) -> float:
        return auroc(scores, labels)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` (higher: more anomalous) for 0/1 `labels`."""
    from sklearn.metrics import roc_auc_score

    y = labels.cpu().numpy()
    if len(set(y.tolist())) != 2:
        raise ValueError("AUROC needs a test set with both normal (0) and anomalous (1) samples")
    return float(roc_auc_score(y, scores.float().cpu().numpy()))


TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, AnomalyDetection)}


def build_task(name: TaskName, loss_fn: LossFn | None = None) -> Task:
    """The task `name` (a scenario's `task`), with `loss_fn` instead of its default loss."""
    return TASKS[name](loss_fn)
